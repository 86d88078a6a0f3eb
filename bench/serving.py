"""Online serving throughput and latency: requests/s and p50/p99 latency at concurrency 1, 8 and 32, over real
HTTP on 127.0.0.1, in one run: @serve.batch batching (max_batch_size 32) with the default decoding, the same with
the previous decoding path (transformers' generate() over the NF4 base: `decoding.engine=generate
model.inference_weights=nf4 model.inference_attention=sdpa`), max_batch_size 1 with the default decoding, (`--modes one-thread`) the
replica on one torch thread, Ray's default for a replica that reserves 1 CPU, and (`--modes fp32`) the defaults
with fp32 weights where `model.inference_dtype=auto` chose bf16 (bf16 products measured faster on this CPU).

    .venv/bin/python bench/serving.py [--adapter artifacts/adapters/snips] [--requests 96] [--modes batched,one-thread]
    .venv/bin/python bench/serving.py --quick

It prints, at concurrency 32, each mode's requests/s and p99 against the batched defaults.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import results

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "snips"
PORT = 8012


def load_level(url: str, texts: list[str], concurrency: int, n: int, max_new: int) -> dict:
    import requests

    def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = requests.post(url, json={"text": texts[i % len(texts)], "max_new_tokens": max_new}, timeout=300)
        return time.perf_counter() - t0, r.status_code

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        res = list(pool.map(one, range(n), timeout=1800))
    wall = time.perf_counter() - t0
    lat = sorted(x[0] for x in res)
    p = lambda q: lat[min(int(q * len(lat)), len(lat) - 1)] * 1000  # noqa: E731
    return {"rps": n / wall, "p50": p(0.50), "p99": p(0.99), "errors": sum(1 for x in res if x[1] != 200)}


def modes(threads: int) -> list:
    """(--modes name, label, max_batch_size, (decoding, model) overrides, cpu_threads)."""
    previous = {"engine": "generate"}, {"inference_weights": "nf4", "inference_attention": "sdpa"}
    return [("batched", "batched (max_batch_size 32)", 32, ({}, {}), threads),
            ("previous", "batched, previous decoding path", 32, previous, threads),
            ("unbatched", "unbatched (max_batch_size 1)", 1, ({}, {}), threads),
            ("one-thread", "batched, replica on 1 thread (Ray's default for num_cpus 1)", 32, ({}, {}), 0),
            ("fp32", "batched, fp32 weights (model.inference_dtype=float32)", 32,
             ({}, {"inference_dtype": "float32"}), threads)]


def measure() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few requests per level (used by the tests)")
    ap.add_argument("--requests", type=int, default=96, help="requests per concurrency level")
    ap.add_argument("--adapter", help="adapter dir (default: artifacts/adapters/snips if present, else the base)")
    ap.add_argument("--max-new-tokens", type=int, help="default 64; under --quick 24 (the untrained tiny model "
                                                   "writes to the limit, so this sets most of the quick run's time)")
    ap.add_argument("--cpu-threads", type=int, default=2,
                    help="torch threads of the Model replica (configs/serve/cpu.yaml: 2; 0 = Ray's default, 1)")
    ap.add_argument("--modes", default="batched,previous,unbatched",
                    help="comma-separated: batched, previous, unbatched, one-thread, fp32")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from serve.app import build_app

    n = 16 if args.quick else args.requests
    if args.max_new_tokens is None:
        args.max_new_tokens = 24 if args.quick else 64
    levels = (1, 8, 32)
    adapter = args.adapter
    if adapter is None and not args.quick and (ROOT / "artifacts/adapters/snips/manifest.json").is_file():
        adapter = str(ROOT / "artifacts/adapters/snips")
    texts = [json.loads(l)["text"] for l in (DATA / "test.jsonl").read_text().splitlines()[::7]]
    results: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base: dict = {"adapter": adapter} if adapter else {}
        if not adapter:
            from jsonextract.config import core as C
            from jsonextract.models.tiny import build
            model = build(DATA, Path(tmp) / "tiny", C.load(C.TinyModelConfig, ROOT / "configs/tiny/snips.yaml"))
            base = {"model": {"name": str(model)}, "schema": str(DATA / "schema.json")}
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        try:
            for mode, label, mbs, (dec, mod), threads in modes(args.cpu_threads):
                if mode not in args.modes.split(","):
                    continue
                serve.run(build_app({**base, "max_batch_size": mbs, "batch_wait_timeout_s": 0.01,
                                     "cpu_threads": threads,
                                     "model": {**base.get("model", {}), **mod},
                                     "decoding": {"max_new_tokens": args.max_new_tokens, **dec}}),
                          name="bench", route_prefix="/")
                url = f"http://127.0.0.1:{PORT}/extract"
                load_level(url, texts, 4, 8, args.max_new_tokens)  # warm-up
                results[mode, label] = {c: load_level(url, texts, c, max(n, c), args.max_new_tokens) for c in levels}
                serve.delete("bench")
        finally:
            serve.shutdown()
            ray.shutdown()
    print(f"\nPOST /extract, {n} requests per level, max_new_tokens {args.max_new_tokens}, one CPU replica on {args.cpu_threads or 1} threads, "
          f"{'adapter ' + Path(adapter).name if adapter else 'untrained tiny model'}\n")
    print("| mode | concurrency | requests/s | p50 ms | p99 ms | non-200 |")
    print("|---|---:|---:|---:|---:|---:|")
    for (_, label), by_c in results.items():
        for c, m in by_c.items():
            print(f"| {label} | {c} | {m['rps']:.1f} | {m['p50']:.0f} | {m['p99']:.0f} | {m['errors']} |")
    at32 = {mode: by_c[32] for (mode, _), by_c in results.items()}
    b = at32.get("batched")
    if b is None:
        return 0
    line = [f"batched p99 / p50 = {b['p99'] / b['p50']:.2f}"]
    for mode, what in (("unbatched", "batched / unbatched"), ("previous", "defaults / previous decoding path"),
                       ("one-thread", f"{args.cpu_threads} threads / 1 thread"),
                       ("fp32", "defaults / fp32 weights")):
        if mode in at32:
            o = at32[mode]
            line.append(f"{what} requests/s = {b['rps'] / o['rps']:.2f}x (p99 {b['p99'] / 1000:.1f} s vs "
                        f"{o['p99'] / 1000:.1f} s)")
    print("\nat concurrency 32: " + "; ".join(line))
    return 0


if __name__ == "__main__":
    sys.exit(results.main("serving", measure))
