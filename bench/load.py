"""Load and faults: mixed valid and invalid requests at high concurrency against the Serve app over HTTP on
127.0.0.1, once steady and once with the Model replica killed mid-run (`ray.kill` on its actor), then a
recovery check.

    .venv/bin/python bench/load.py [--requests 1000] [--concurrency 64] [--adapter DIR]
    .venv/bin/python bench/load.py --quick

What it asserts of each phase, and prints: valid requests get 200 with schema-valid output (or a 503 with
Retry-After while the replica is being replaced), invalid ones get a 4xx, nothing else; no request outlives the
server's request timeout; after the kill every request succeeds again. Exit status 1 if any of that fails.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import results

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "snips"
PORT = 8015
REQUEST_TIMEOUT_S = 30.0


def invalid_requests() -> list[tuple[str, object]]:
    """(path, body) pairs that must each get a 4xx."""
    deep: dict = {"type": "string"}
    for _ in range(100):
        deep = {"type": "object", "properties": {"a": deep}}
    return [
        ("/extract", {"text": ""}),
        ("/extract", {"text": 12}),
        ("/extract", {"schema": {"type": "object"}}),
        ("/extract", {"text": "x", "schema": {"type": "objekt"}}),
        ("/extract", {"text": "x", "schema": deep}),
        ("/extract", {"text": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "http://127.0.0.1:9/x"}}}}),
        ("/extract", {"text": "x", "schema": {"type": "object", "properties": {"a": {"enum": list(range(5000))}}}}),
        ("/extract", {"text": "x", "adapter": "../etc"}),
        ("/extract", {"text": "x", "max_new_tokens": 10 ** 6}),
        ("/extract", "{not json"),
        ("/extract/batch", [{"text": "x"}] * 500),
        ("/v1/chat/completions", {"messages": []}),
    ]


async def run_phase(url: str, texts: list[str], schema: dict, n: int, concurrency: int, kill=None) -> dict:
    import aiohttp
    from jsonextract.data.schema import validation_error

    rng = random.Random(0)
    bad = invalid_requests()
    plan = [("valid", "/extract", {"text": rng.choice(texts)}) if rng.random() < 0.8
            else ("invalid",) + rng.choice(bad) for _ in range(n)]
    results: list[dict] = []
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S + 15)

    async def one(session, kind, path, body):
        async with sem:
            data = body if isinstance(body, str) else json.dumps(body)
            t0 = time.perf_counter()
            try:
                async with session.post(url + path, data=data, headers={"content-type": "application/json"}) as r:
                    payload = await r.text()
                    status, retry_after = r.status, r.headers.get("retry-after")
            except asyncio.TimeoutError:
                status, payload, retry_after = -1, "client timeout", None
            seconds = time.perf_counter() - t0
            ok_output = None
            if kind == "valid" and status == 200:
                out = json.loads(payload)
                ok_output = (out["valid"] and validation_error(out["output"], schema) is None) or bool(out["error"])
            results.append({"kind": kind, "status": status, "s": seconds, "ok_output": ok_output,
                            "retry_after": retry_after})

    async with aiohttp.ClientSession(timeout=timeout) as session:
        tasks = []
        for i, (kind, path, body) in enumerate(plan):
            if kill is not None and i == n // 3:
                await asyncio.sleep(1.0)  # let requests pile into the replica, then kill it under them
                await asyncio.get_running_loop().run_in_executor(None, kill)
            tasks.append(asyncio.create_task(one(session, kind, path, body)))
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
    return summarise(results)


def summarise(results: list[dict]) -> dict:
    valid = [r for r in results if r["kind"] == "valid"]
    invalid = [r for r in results if r["kind"] == "invalid"]
    lat = sorted(r["s"] for r in valid if r["status"] == 200)
    pct = (lambda q: lat[min(int(q * len(lat)), len(lat) - 1)] * 1000) if lat else (lambda q: float("nan"))
    return {
        "n": len(results),
        "valid_200": sum(r["status"] == 200 for r in valid), "valid": len(valid),
        "valid_503": sum(r["status"] == 503 for r in valid),
        "retry_after_missing": sum(r["status"] == 503 and not r["retry_after"] for r in results),
        "output_ok": sum(bool(r["ok_output"]) for r in valid if r["status"] == 200),
        "invalid_4xx": sum(400 <= r["status"] < 500 for r in invalid), "invalid": len(invalid),
        "other_5xx": sum(r["status"] >= 500 and r["status"] != 503 for r in results),
        "hung": sum(r["status"] == -1 for r in results),
        "p50": pct(0.50), "p99": pct(0.99), "max_s": max(r["s"] for r in results),
    }


def kill_model_replica() -> None:
    import ray
    from ray.util import list_named_actors
    # Serve names replica actors SERVE_REPLICA::<app>#<deployment>#<id>
    names = [a for a in list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::") and "#Model#" in a["name"]]
    for a in names:
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
    print(f"[load] killed {len(names)} Model replica(s)", flush=True)


def measure() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="160 requests per phase at concurrency 32 (the tests)")
    ap.add_argument("--requests", type=int, default=1000, help="requests per phase")
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    ap.add_argument("--adapter", help="adapter dir (default: an untrained tiny model, which measures the server, "
                                      "not the model)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    n, conc = (160, 32) if args.quick else (args.requests, args.concurrency)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from jsonextract.data.schema import load_schema
    from serve.app import build_app

    texts = [json.loads(line)["text"] for line in (DATA / "test.jsonl").read_text().splitlines()[::7]]
    phases: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.adapter:
            base: dict = {"adapter": args.adapter}
            schema = json.loads((Path(args.adapter) / "manifest.json").read_text())["schema"]
        else:
            from jsonextract.config import core as C
            from jsonextract.models.tiny import build
            model = build(DATA, Path(tmp) / "tiny", C.load(C.TinyModelConfig, ROOT / "configs/tiny/snips.yaml"))
            base = {"model": {"name": str(model)}, "schema": str(DATA / "schema.json")}
            schema = load_schema(DATA / "schema.json")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        try:
            serve.run(build_app({**base, "max_batch_size": 16, "decoding": {"max_new_tokens": args.max_new_tokens},
                                 "limits": {"request_timeout_s": REQUEST_TIMEOUT_S, "max_batch_items": 64}}),
                      name="load", route_prefix="/")
            url = f"http://127.0.0.1:{PORT}"
            asyncio.run(run_phase(url, texts, schema, 16, 8))  # warm-up
            phases["steady"] = asyncio.run(run_phase(url, texts, schema, n, conc))
            t_kill = time.time()
            phases["replica killed"] = asyncio.run(run_phase(url, texts, schema, n, conc, kill=kill_model_replica))
            # recovery: Serve starts a new replica; from then on every valid request succeeds
            deadline = time.time() + 120
            while time.time() < deadline:
                after = asyncio.run(run_phase(url, texts, schema, 8, 4))
                if after["valid_200"] == after["valid"] and after["other_5xx"] == 0:
                    break
                time.sleep(2)
            recovered_s = time.time() - t_kill
            phases["after recovery"] = asyncio.run(run_phase(url, texts, schema, max(n // 4, 40), conc))
        finally:
            serve.shutdown()
            ray.shutdown()
    print(f"\n{n} requests per phase (80% valid, 20% invalid of 12 kinds), concurrency {conc}, one CPU Model replica, "
          f"{'adapter ' + Path(args.adapter).name if args.adapter else 'untrained tiny model'}, "
          f"max_new_tokens {args.max_new_tokens}, server request timeout {REQUEST_TIMEOUT_S:g} s\n")
    print("| phase | requests | valid -> 200 | valid -> 503 | schema-valid or named error | invalid -> 4xx | other 5xx "
          "| hung | p50 ms | p99 ms | slowest s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in phases.items():
        print(f"| {name} | {m['n']} | {m['valid_200']}/{m['valid']} | {m['valid_503']} | {m['output_ok']}/"
              f"{m['valid_200']} | {m['invalid_4xx']}/{m['invalid']} | {m['other_5xx']} | {m['hung']} | {m['p50']:.0f} "
              f"| {m['p99']:.0f} | {m['max_s']:.1f} |")
    failures = []
    for name, m in phases.items():
        if m["other_5xx"] or m["hung"] or m["invalid_4xx"] != m["invalid"] or m["output_ok"] != m["valid_200"]:
            failures.append(name)
        if m["retry_after_missing"]:
            failures.append(f"{name}: 503 without Retry-After")
        if name != "replica killed" and m["valid_200"] != m["valid"]:
            failures.append(f"{name}: valid requests not all 200")
    print(f"\nall requests of a recovery check succeeded {recovered_s:.0f} s after the kill (the rest of that phase included); "
          f"faults: {'none' if not failures else ', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(results.main("load", measure))
