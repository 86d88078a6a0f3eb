"""Build the embedded default model offline: a byte-level BPE tokenizer trained on a data set's texts and targets,
plus a Llama-architecture model with random weights, both saved in Hugging Face format.

    jsonextract prepare-tiny --data data/snips --out artifacts/tiny-snips/model [--config configs/tiny/snips.yaml]

`AutoTokenizer` / `AutoModelForCausalLM` load the result from the directory, so every job loads it exactly as it
would load `meta-llama/Llama-2-7b-hf`. Deterministic for a given seed and data.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jsonextract.config import core as C
from jsonextract.data.prompt import PromptBuilder, load_dataset_schema
from jsonextract.data.records import read_jsonl
from jsonextract.data.schema import canonical_json
from jsonextract.lazy import lazy

tokenizers = lazy("tokenizers")
torch = lazy("torch")
transformers = lazy("transformers")

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# The chat template every tiny checkpoint carries. The assistant turn is never rendered through it: the prompt
# module renders system+user with add_generation_prompt=True and appends the answer tokens + eos itself, so the
# training prompt and the inference prompt are the same string by construction.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] != 'assistant' %}{{ '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_tokenizer(corpus: list[str], vocab_size: int):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, cfg: C.TinyModelConfig):
    if len(tokenizer) > cfg.vocab_size:
        raise C.ConfigError(f"tokenizer has {len(tokenizer)} tokens > tiny.vocab_size {cfg.vocab_size}")
    mcfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )
    torch.manual_seed(cfg.seed)
    return transformers.LlamaForCausalLM(mcfg)


def build(data_dir: str | Path, out: str | Path, cfg: C.TinyModelConfig, prompt_cfg: C.PromptConfig | None = None,
          max_records: int | None = None) -> Path:
    """Train the tokenizer on `data_dir/train.jsonl` (texts, targets and the prompt text), build and save."""
    data_dir, out = Path(data_dir), Path(out)
    schema = load_dataset_schema(data_dir)
    records = [r for r in read_jsonl(data_dir / "train.jsonl") if r.ok][:max_records]
    prompt = PromptBuilder(prompt_cfg or C.PromptConfig(), schema)
    corpus = [prompt.instruction_text()] + [r.text for r in records] + \
             [canonical_json(r.target) for r in records if r.target is not None]
    tokenizer = train_tokenizer(corpus, cfg.vocab_size)
    model = build_model(tokenizer, cfg)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    (out / "tiny_config.json").write_text(json.dumps({**C.to_dict(cfg), "data": str(data_dir),
                                                      "records": len(records)}, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jsonextract prepare-tiny", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="data set folder with train.jsonl and schema.json")
    ap.add_argument("--out", required=True, help="output folder (Hugging Face format)")
    ap.add_argument("--config", help="YAML with TinyModelConfig keys")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. hidden_size=384")
    args = ap.parse_args(argv)
    cfg = C.load(C.TinyModelConfig, args.config, args.overrides)
    t0 = time.time()
    out = build(args.data, args.out, cfg)
    n = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(out).parameters())
    print(f"tiny model: {n / 1e6:.2f}M parameters, saved to {out} in {time.time() - t0:.1f}s")
    return 0

