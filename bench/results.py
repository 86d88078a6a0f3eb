"""Benchmark results files, and docs/benchmarks.md made from them.

Each benchmark run outside --quick writes what it printed to `bench/results/<cpu>-<isa>-<bench>.md`, headed by the
command, the commit and the CPU, and regenerates docs/benchmarks.md, so a new figure needs no hand edit of prose.

    .venv/bin/python bench/results.py        # regenerate docs/benchmarks.md from the files in bench/results/
"""
from __future__ import annotations

import contextlib
import datetime
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"

# bench -> what it measures (one paragraph of docs/benchmarks.md)
BENCHES = {
    "train": "The training job against the previous job (`data.length_group_steps=0 parallel.attention=sdpa "
             "optim.loss=logits parallel.lora_kernel=peft`), 2 FSDP2 workers of one thread each, and the defaults with "
             "one worker of 2 threads; where a worker's step goes (clock and profiler; the defaults also with peft's "
             "LoRA layers), and a roofline line from `jsonextract/hardware.py`'s probe. "
             "Last line: `speedup: training job tokens/s vs the previous job on the same machine`.",
    "extract": "The decoding loop against step-by-step `generate()` over the NF4 base + LoRA (the previous path), each "
               "measure added in turn, in one process; then the Ray Data job on both paths. Every row says how many "
               "outputs are identical to the previous path's. Last line: `speedup: job rows/s vs step-by-step decoding`.",
    "serving": "Ray Serve over HTTP at rising concurrency: requests/s and latency percentiles, batched vs one at a time.",
    "load": "The Serve app under hostile load (valid and invalid requests, bursts over the queue limit, a replica "
            "killed): counts by status, latency percentiles, whether every 503 carries Retry-After.",
    "grounding": "The cost of grounding: extraction with `decoding.grounding=annotate` against `off`.",
    "cluster": "The jobs on a local multi-node Ray cluster (nodes sharing this machine's cores): training tokens/s with "
               "2 workers on one node vs two nodes, and the batch job's rows/s undisturbed vs with a node removed "
               "mid-job (every row still out once).",
    "adapt": "QLoRA vs LoRA vs full weights: dev quality per step of the three modes on the same base and data.",
}


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def cpu_flags() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        return ""
    have = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX512-BF16", "avx512_bf16"),
                                    ("AMX", "amx_tile")) if f" {flag}" in flags]
    return ", ".join(have)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def cpu_kind() -> str:
    """The results file's CPU part: the model name and the widest of the flags above. Machines of one vendor's
    name differ in what their kernels can use (an AMD EPYC Zen 3 has AVX2 only, a Zen 5 AVX512-BF16), and their
    figures must not overwrite each other."""
    flags = cpu_flags().split(", ")
    return slug(f"{cpu_name()} {flags[-1] if flags[-1] else 'flags unknown'}")


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+changes" if dirty else "") if sha else "unknown"
    except OSError:
        return "unknown"


def write(bench: str, text: str, argv: list[str] | None = None) -> Path:
    """Write a run's output to bench/results/<cpu>-<isa>-<bench>.md and regenerate docs/benchmarks.md."""
    argv = sys.argv[1:] if argv is None else argv
    head = [f"# bench/{bench}.py on {cpu_name()} ({os.cpu_count()} CPUs; {cpu_flags() or 'flags unknown'})", "",
            f"`.venv/bin/python bench/{bench}.py {' '.join(argv)}` at commit {commit()}, "
            f"{datetime.date.today().isoformat()}.", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{cpu_kind()}-{bench}.md"
    out.write_text("\n".join(head) + "\n" + text.strip() + "\n")
    render()
    print(f"\nwritten to {out.relative_to(ROOT)} and {DOC.relative_to(ROOT)}", file=sys.stderr)
    return out


@contextlib.contextmanager
def recorded(bench: str, enabled: bool):
    """Everything the block prints also goes to the bench's results file (when `enabled`: not in --quick)."""
    if not enabled:
        yield
        return
    buf = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s):
            sys.__stdout__.write(s)
            buf.write(s)
            return len(s)

        def flush(self):
            sys.__stdout__.flush()

    with contextlib.redirect_stdout(Tee()):
        yield
    write(bench, buf.getvalue())


def main(bench: str, measure: Callable[[], int]) -> int:
    """A benchmark's entry point: run `measure`; what it prints also goes to bench/results/<cpu>-<isa>-<bench>.md and
    docs/benchmarks.md, except under --quick (the tests' mode)."""
    with recorded(bench, enabled="--quick" not in sys.argv):
        return measure()


def render() -> str:
    """docs/benchmarks.md: what each benchmark measures and how to run it, then every results file."""
    lines = ["# Benchmarks", "",
             "Generated by `bench/results.py` from the files in `bench/results/` (do not edit by hand). Each benchmark",
             "runs its variants side by side in one run, so the machine's own speed cancels in the ratios; each has",
             "a `--quick` mode the test suite runs, which writes no results file. A file names the command, the commit",
             "and the CPU that produced it; figures from different CPUs are not comparable.", ""]
    files = sorted(RESULTS.glob("*.md"))
    for bench, what in BENCHES.items():
        mine = [f for f in files if f.stem.endswith("-" + bench)]
        lines += [f"## bench/{bench}.py", "", what, "", f"    .venv/bin/python bench/{bench}.py --help", ""]
        if not mine:
            lines += ["No results file yet: run it without `--quick`.", ""]
        for f in mine:
            body = f.read_text().strip().splitlines()
            lines += [f"### [{f.name}](../bench/results/{f.name})", ""]
            lines += [("##" + l) if l.startswith("#") else l for l in body[1:]] + [""]
    DOC.write_text("\n".join(lines).rstrip() + "\n")
    return str(DOC)


if __name__ == "__main__":
    print(render())
