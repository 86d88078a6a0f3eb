"""The model deployment: each replica keeps the base model once and up to `max_adapters_per_replica` LoRA adapters
(Serve's @serve.multiplexed: requests name an adapter, Serve routes them to a replica that has it loaded, and a
replica loads one on demand, dropping the least recently used); concurrent requests are decoded together with
@serve.batch, one generate call per adapter."""
from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from jsonextract.config.core import PromptConfig, prompt_budget
from jsonextract.config.serve import ServeConfig
from jsonextract.data.prompt import PromptBuilder
from jsonextract.data.schema import SchemaError, load_schema
from jsonextract.decoding.extractor import Extractor
from jsonextract.lazy import lazy
from jsonextract.models.adapters import Adapter, AdapterRegistry, MultiAdapterModel, UnknownAdapter
from jsonextract.models.loading import ModelLoadError, resolve_device
from jsonextract.models.manifest import temperature_of
from serve.errors import RequestError, public

torch = lazy("torch")


@serve.deployment(ray_actor_options={"num_cpus": 1})
class Model:
    def __init__(self, cfg: ServeConfig):
        device = resolve_device(cfg.device)
        # Ray sets OMP_NUM_THREADS to an actor's CPU reservation (floored, at least 1), so a replica that reserves
        # 1 CPU decodes on one thread even when the machine has more cores idle. Reserving all cores instead leaves
        # no room for the ingress on a small machine.
        if device == "cpu" and cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        self.cfg = cfg
        self.device = device
        self.registry = AdapterRegistry(cfg.adapters, cfg.adapter)
        self.lm = MultiAdapterModel(cfg.model, self.registry, device)
        self.base = Adapter("", PromptBuilder(PromptConfig(), load_schema(cfg.schema) if cfg.schema else None), None)
        self.extractors: dict[str, Any] = {}
        self.evicted: deque = deque()  # adapters Serve dropped from this replica; detached between batches
        self.compile_pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        # Sizes of the last 1000 generate() batches (bounded: a replica runs for weeks) and a running count.
        self.batch_sizes: deque = deque(maxlen=1000)
        self.batch_count = 0
        self.extract_batch.set_max_batch_size(cfg.max_batch_size)
        self.extract_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

        # @serve.multiplexed takes its bound when decorating; the bound is a setting, so decorate here. A plain
        # function (not a bound method): Serve keeps its LRU state as an attribute of the decorated object.
        @serve.multiplexed(max_num_models_per_replica=cfg.max_adapters_per_replica)
        async def get_adapter(name: str):
            return await self._load_adapter(name)
        self.get_adapter = get_adapter

    def extractor(self, adapter) -> Any:
        ex = self.extractors.get(adapter.name)
        if ex is None or ex.prompt is not adapter.prompt:
            shared = next(iter(self.extractors.values()))._compiler if self.extractors else None
            ex = Extractor(self.lm.model, self.lm.tokenizer, adapter.prompt, self.cfg.decoding,
                           max_prompt_tokens=prompt_budget(self.cfg.model, self.cfg.decoding),
                           truncate_input=self.cfg.long_text == "truncate", _compiler=shared,
                           temperature=temperature_of(adapter.manifest))
            self.extractors[adapter.name] = ex
        return ex

    async def _load_adapter(self, name: str):
        """Attach an adapter (on the event loop, between generate calls: never while one runs)."""
        while name in self.evicted:
            self.evicted.remove(name)
        adapter = self.lm.load(name)
        replica = self

        class Held:  # Serve calls __del__ (in a thread) when it drops the adapter from this replica's LRU
            def __init__(self):
                self.adapter = adapter

            def __del__(self):
                replica.evicted.append(adapter.name)
        held = Held()
        if adapter.prompt.schema is not None:
            await self.compile(adapter, adapter.prompt.schema)
        return held

    async def compile(self, adapter, schema: dict) -> None:
        """Compile (or find cached) the grammar of `schema` in a worker thread, within the time limit."""
        ex = self.extractor(adapter)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(self.compile_pool, ex.grammar, schema),
                                   self.cfg.limits.grammar_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(400, f"schema too complex: its grammar did not compile within "
                                    f"{self.cfg.limits.grammar_timeout_s:g} s") from None
        except SchemaError as e:
            raise RequestError(400, public(str(e))) from None

    async def info(self, name: str = "") -> dict:
        adapter = (await self.get_adapter(name)).adapter if name else self.base
        recent = self.batch_sizes
        return {"adapter": name, "schema": adapter.prompt.schema, "manifest": adapter.manifest,
                "loaded_adapters": self.lm.loaded(),
                "batches": {"count": self.batch_count, "mean_size_last_1000": sum(recent) / max(len(recent), 1),
                            "max_batch_size": self.cfg.max_batch_size},
                "replica": {"device": self.device, "cpu_threads": torch.get_num_threads()}}

    async def __call__(self, item: dict) -> dict:
        """One request; errors that are the caller's come back as {'status', 'detail'} (handles carry values)."""
        name = serve.get_multiplexed_model_id()
        try:
            try:
                adapter = (await self.get_adapter(name)).adapter if name else self.base
            except UnknownAdapter as e:
                raise RequestError(404, public(str(e))) from None
            except ModelLoadError as e:
                raise RequestError(400, public(str(e))) from None
            schema = item.get("schema")
            if schema is not None:
                await self.compile(adapter, schema)
            elif adapter.prompt.schema is None:
                raise RequestError(400, "no schema: name an adapter (GET /adapters) or send a schema")
        except RequestError as e:
            return {"status": e.status, "detail": e.detail}
        return await self.extract_batch({**item, "adapter": adapter})

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def extract_batch(self, items: list[dict]) -> list[dict]:
        # Decode on the replica's event loop, blocking it: requests that arrive meanwhile wait in the replica's
        # queue and all join the next batch. Running generate() in a worker thread (asyncio.to_thread) looked
        # better but starved the loop of the GIL: requests arrived one by one and batches stayed small.
        return self._extract_sync(items)

    def _extract_sync(self, items: list[dict]) -> list[dict]:
        self.batch_sizes.append(len(items))
        self.batch_count += 1
        groups: dict[tuple[str, int, str], list[int]] = {}  # one generate call per (adapter, budget, grounding)
        for i, it in enumerate(items):
            key = (it["adapter"].name, it.get("max_new_tokens") or self.cfg.decoding.max_new_tokens,
                   it.get("grounding") or self.cfg.decoding.grounding)
            groups.setdefault(key, []).append(i)
        in_use = {name for name, _, _ in groups}
        while self.evicted:  # detach what Serve dropped, unless this batch still needs it
            name = self.evicted.popleft()
            if name not in in_use:
                self.lm.unload(name)
        out: list[dict | None] = [None] * len(items)
        for (name, budget, grounding), idx in groups.items():
            ex = self.extractor(items[idx[0]]["adapter"])
            with self.lm.active(name) as model:
                ex.model = model
                results = ex.extract([items[i]["text"] for i in idx], [items[i].get("schema") for i in idx],
                                     max_new_tokens=budget, grounding=grounding,
                                     contexts=[items[i].get("context") for i in idx])
            for i, r in zip(idx, results):
                if r.reason == "input_too_long":
                    out[i] = {"status": 413, "detail": f"text too long: {r.error}"}
                else:
                    out[i] = {"output": r.output, "valid": r.valid, "error": r.error, "raw": r.raw, "adapter": name,
                              "input_truncated": r.input_truncated, "grounding": r.grounding,
                              "confidence": r.confidence, "dropped": r.dropped, "snapped": r.snapped,
                              "usage": {"input_tokens": r.input_tokens, "output_tokens": r.output_tokens}}
        return out  # type: ignore[return-value]
