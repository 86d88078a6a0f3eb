"""Online extraction on Ray Serve: the application builder. A FastAPI ingress (`Api`, serve/routes.py, behind the
guard in serve/guard.py) in front of the model deployment (`Model`, serve/model.py).

    jsonextract serve configs/serve/cpu.yaml     # or Ray's own: serve run / serve deploy configs/serve/cpu.yaml
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ray import serve

from jsonextract.config.core import build
from jsonextract.config.serve import ServeConfig
from serve.guard import key_hashes
from serve.model import Model
from serve.routes import Api


def build_app(args: dict) -> serve.Application:
    """Application builder for `serve run` / `serve deploy` (import path `serve.app:build_app`)."""
    cfg = build(ServeConfig, dict(args), source="serve application args")
    for key in ("adapter", "adapters", "schema", "api_keys_file"):
        p = getattr(cfg, key)
        if p and "://" not in p and Path(p).exists():
            cfg = dataclasses.replace(cfg, **{key: str(Path(p).resolve())})
    if cfg.model.name and Path(cfg.model.name).exists():
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=str(Path(cfg.model.name).resolve())))
    # Serve's default max_ongoing_requests (5) would cap every batch at 5 requests and the ingress at 5 in
    # flight: let each model replica hold two full batches (one decoding, one filling) and the ingress many more.
    # Beyond that, max_queued_requests bounds the wait: more requests get a fast 503, not an unbounded queue.
    model = Model.options(max_ongoing_requests=2 * cfg.max_batch_size,
                          max_queued_requests=cfg.limits.max_queued_requests)
    return Api.options(max_ongoing_requests=64 * cfg.max_batch_size).bind(model.bind(cfg), cfg, key_hashes(cfg))
