"""Online extraction on Ray Serve: a FastAPI ingress (`Api`) in front of a model deployment (`Model`). Each Model
replica keeps the base model once and up to `max_adapters_per_replica` LoRA adapters (Serve's
@serve.multiplexed: requests name an adapter, Serve routes them to a replica that has it loaded, and a replica
loads one on demand, dropping the least recently used); concurrent requests are decoded together with
@serve.batch, one generate call per adapter.

    serve run configs/serve/cpu.yaml          # or: serve deploy configs/serve/cpu.yaml

Routes: POST /extract, POST /extract/batch, POST /v1/chat/completions and GET /v1/models (OpenAI), GET /adapters,
GET /schema, GET /healthz (open without a key), OpenAPI docs at /docs. Bad input gets a 4xx with a reason, never
a 5xx; overload and a lost replica get 503 with Retry-After.

No `from __future__ import annotations` here: under @serve.ingress the string annotation of a request model
was not resolved, and FastAPI took the chat body for a required query parameter (every OpenAI call got 422).
"""

import asyncio
import dataclasses
import hashlib
import hmac
import json
import os
import re
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from jsonextract.config.core import PromptConfig, build
from jsonextract.config.serve import LimitsConfig, ServeConfig
from jsonextract.data.prompt import PromptBuilder, context_text
from jsonextract.data.records import parse_context
from jsonextract.data.schema import SchemaError, check_limits, check_schema, load_schema
from jsonextract.decoding.extractor import Extractor
from jsonextract.lazy import lazy
from jsonextract.models.adapters import NAME, Adapter, AdapterRegistry, MultiAdapterModel, UnknownAdapter
from jsonextract.models.loading import ModelLoadError, resolve_device
from jsonextract.models.manifest import temperature_of

torch = lazy("torch")

# ---------------------------------------------------------------------------------------------- API types


class ExtractRequest(BaseModel):
    text: str = Field(..., description="the document to extract from")
    context: Optional[Union[dict[str, Any], str]] = Field(
        None, description='what the text answers, shown to the model beside it (e.g. {"requested_slots": ["time"]} '
                          'for a reply to "what time?"); an object or a string; grounding points into text only')
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema", description="JSON Schema (default: the adapter's)")
    adapter: Optional[str] = Field(None, description="adapter name from GET /adapters (default: the deployment's)")
    max_new_tokens: Optional[int] = Field(None, ge=1, description="generation budget for this request")
    grounding: Optional[Literal["off", "annotate", "drop_ungrounded"]] = Field(
        None, description="locate each value in the text (annotate), and also remove free-text values not found "
                          "there (drop_ungrounded); default: the deployment's decoding.grounding")

    model_config = {"populate_by_name": True}


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int


class ExtractResponse(BaseModel):
    output: Optional[dict[str, Any]] = Field(None, description="the schema-valid object, or null")
    valid: bool
    error: Optional[str] = Field(None, description="why there is no output: truncated, invalid_json, ...")
    adapter: str = Field("", description="the adapter that answered (empty: the base model)")
    usage: Usage
    latency_ms: float
    input_truncated: bool = False
    grounding: Optional[dict[str, Optional[dict[str, Any]]]] = Field(
        None, description='per value path: {"start", "end", "match": exact|normalized|fuzzy} (offsets into text), '
                          '{"match": "label"} for enum/number/boolean values, or null: not found in the text')
    confidence: Optional[dict[str, float]] = Field(
        None, description="per value path: geometric-mean probability of the tokens that wrote it (constrained)")
    dropped: Optional[list[str]] = Field(None, description="paths removed by grounding=drop_ungrounded")


class ErrorResponse(BaseModel):
    detail: Any = Field(..., description="why the request was refused")


PAGE = Path(__file__).with_name("static") / "index.html"
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 503)}


class ChatMessage(BaseModel):
    role: str
    content: Any


class ChatRequest(BaseModel):
    model: Optional[str] = Field(None, description="adapter name (GET /v1/models); default: the deployment's")
    messages: list[ChatMessage]
    response_format: Optional[dict[str, Any]] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = None

    model_config = {"extra": "allow"}  # OpenAI clients send fields we ignore (n, stream=False, seed, ...)


def message_text(content: Any) -> Any:
    """A chat message's text: a string, or content parts [{"type": "text", "text": ...}] joined."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text", ""), str))
    return content


class RequestError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


INTERNALS = re.compile(r"(\S*/)+\S+\.(cc|cpp|h|hpp|py)(:\d+)?:?|\[\d\d:\d\d:\d\d\]|Check failed: \(.*?\) is false:")


def public(message: str) -> str:
    """An error message without source paths, log timestamps or assertion text (xgrammar's C++ errors carry all
    three), at most 500 characters."""
    return re.sub(r"\s+", " ", INTERNALS.sub("", message)).strip()[:500]


def check_unicode(value: Any, what: str) -> None:
    """400 for a lone surrogate (JSON allows "\\udc50"; the tokenizer and the grammar compiler cannot take it)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise HTTPException(400, f"{what} is not valid Unicode (it holds a lone surrogate code point)") from None


# ---------------------------------------------------------------------------------------------- model replica


@serve.deployment(ray_actor_options={"num_cpus": 1})
class Model:
    def __init__(self, cfg: ServeConfig):
        device = resolve_device(cfg.device)
        # Ray sets OMP_NUM_THREADS to an actor's CPU reservation (floored, at least 1), so a replica that reserves
        # 1 CPU decodes on one thread even when the machine has more cores idle (measured: 1.1 requests/s vs 2.3
        # rows/s on 2 threads). Reserving all cores instead leaves no room for the ingress on a small machine.
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
                           max_prompt_tokens=self.cfg.model.max_length - self.cfg.decoding.max_new_tokens,
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
        # better but starved the loop of the GIL: measured mean batch 2.7 of 32 and 4.2 req/s, against mean
        # batch 16 and 14 req/s this way (96 requests at concurrency 32, one CPU replica).
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
                              "confidence": r.confidence, "dropped": r.dropped,
                              "usage": {"input_tokens": r.input_tokens, "output_tokens": r.output_tokens}}
        return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- HTTP ingress

app = FastAPI(title="jsonextract", description="Text -> JSON that validates against a JSON Schema.",
              version="0.1.0")


class GuardSettings:
    """What Guard enforces in this replica process; set by Api.__init__ (Serve builds the ASGI app itself)."""
    key_hashes: list[bytes] = []
    max_body: int = LimitsConfig.max_body_bytes


class Guard:
    """Access and size checks before FastAPI reads a byte of the body: API keys (401) and body size (413).
    Pure ASGI, so a refused body is never read, parsed or tokenised."""

    OPEN = {"/healthz", "/"}  # liveness, and the page (static; the calls it makes need the key)

    def __init__(self, asgi_app):
        self.app = asgi_app

    @property
    def key_hashes(self) -> list[bytes]:
        return GuardSettings.key_hashes

    @property
    def max_body(self) -> int:
        return GuardSettings.max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.key_hashes and scope.get("path") not in self.OPEN and not self.authorised(headers):
            return await refuse(send, 401, "missing or invalid API key (send Authorization: Bearer <key>)",
                                [(b"www-authenticate", b"Bearer")])
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await refuse(send, 413, f"request body over this deployment's limit of {self.max_body} bytes")
        if length is None and scope.get("method") in ("POST", "PUT", "PATCH"):  # chunked: count as it arrives
            body, more = b"", True
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                body += msg.get("body", b"")
                more = msg.get("more_body", False)
                if len(body) > self.max_body:
                    return await refuse(send, 413, f"request body over this deployment's limit of "
                                                   f"{self.max_body} bytes")
            replayed = False

            async def receive_again():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()
            return await self.app(scope, receive_again, send)
        return await self.app(scope, receive, send)

    def authorised(self, headers: dict) -> bool:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            return False
        digest = hashlib.sha256(key.strip().encode()).digest()
        # compare against every key, in constant time each: timing tells nothing about which key or how much
        return sum(hmac.compare_digest(digest, h) for h in self.key_hashes) > 0


async def refuse(send, status: int, detail: str, extra: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                + (extra or [])})
    await send({"type": "http.response.body", "body": body})


app.add_middleware(Guard)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    """Malformed JSON bodies and wrong types: 422 with the field and the reason (FastAPI's own detail)."""
    return JSONResponse(status_code=422, content={"detail": [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]})


def key_hashes(cfg: ServeConfig) -> list[bytes]:
    """SHA-256 of each API key (from $JSONEXTRACT_API_KEYS and api_keys_file): the deployment's arguments, which
    Ray shows on its dashboard, never hold a key itself."""
    keys = [k.strip() for k in os.environ.get("JSONEXTRACT_API_KEYS", "").split(",")]
    if cfg.api_keys_file:
        keys += [k.strip() for k in Path(cfg.api_keys_file).read_text().splitlines()]
    return [hashlib.sha256(k.encode()).digest() for k in keys if k and not k.startswith("#")]


def unavailable(detail: str) -> HTTPException:
    return HTTPException(503, detail, headers={"Retry-After": "1"})


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class Api:
    def __init__(self, model, cfg: ServeConfig, hashes: list[bytes]):
        self.model, self.cfg, self.limits = model, cfg, cfg.limits
        self.registry = AdapterRegistry(cfg.adapters, cfg.adapter)
        names = self.registry.names()
        self.default = cfg.default_adapter or (names[0] if len(names) == 1 else "")
        GuardSettings.key_hashes, GuardSettings.max_body = hashes, cfg.limits.max_body_bytes

    def adapter_name(self, requested: Optional[str]) -> str:
        name = requested if requested else self.default
        if name and (not NAME.match(name) or name not in self.registry.names()):
            self.registry.refresh()
            if name not in self.registry.names():
                raise HTTPException(404, f"unknown adapter {name[:80]!r}; this deployment has: "
                                         f"{', '.join(self.registry.names()) or 'none'}")
        return name

    async def _one(self, req: ExtractRequest) -> dict:
        if not req.text.strip():
            raise HTTPException(400, "text must be a non-empty string")
        check_unicode(req.text, "text")
        check_unicode(req.schema_, "schema")
        check_unicode(req.context, "context")
        context, _ = parse_context(req.context)  # the type is checked by the request model (422)
        chars = len(req.text) + len(context_text(context) or "")
        if chars > self.limits.max_text_chars:
            raise HTTPException(413, f"text too long: {chars} characters (text and context), over this deployment's "
                                     f"limit of {self.limits.max_text_chars}")
        budget = req.max_new_tokens or self.cfg.decoding.max_new_tokens
        if budget > self.limits.max_new_tokens:
            raise HTTPException(400, f"max_new_tokens {budget} is over this deployment's limit "
                                     f"{self.limits.max_new_tokens}")
        if req.schema_ is not None:
            try:
                check_limits(req.schema_, self.limits.schema)  # first: the checks below walk the schema
                check_schema(req.schema_, "schema")
            except SchemaError as e:
                raise HTTPException(400, str(e)) from None
            if req.schema_.get("type") != "object":  # as OpenAI's strict structured output: answers are objects
                raise HTTPException(400, 'the schema\'s root must be an object schema ({"type": "object", ...})')
        name = self.adapter_name(req.adapter)
        t0 = time.perf_counter()
        res = await self.call_model(name, {"text": req.text, "context": context, "schema": req.schema_,
                                           "max_new_tokens": budget,
                                           "grounding": req.grounding or self.cfg.decoding.grounding})
        if "status" in res:
            raise HTTPException(res["status"], res["detail"])
        res["latency_ms"] = (time.perf_counter() - t0) * 1000
        return res

    async def call_model(self, name: str, item: dict) -> dict:
        """The model's answer, or 503 + Retry-After when the replicas are full, gone, or too slow."""
        handle = self.model.options(multiplexed_model_id=name) if name else self.model
        response = handle.remote(item)
        try:
            return await asyncio.wait_for(response, self.limits.request_timeout_s)
        except BackPressureError:
            raise unavailable("overloaded: too many requests waiting for a model replica; retry later") from None
        except asyncio.TimeoutError:
            response.cancel()
            raise unavailable(f"no answer within {self.limits.request_timeout_s:g} s; retry later") from None
        except RayActorError:
            raise unavailable("the model replica serving this request stopped; retry") from None

    @app.post("/extract", response_model=ExtractResponse, responses=ERRORS, summary="Extract JSON from one text")
    async def extract(self, req: ExtractRequest) -> dict:
        return await self._one(req)

    @app.post("/extract/batch", response_model=list[ExtractResponse], responses=ERRORS,
              summary="Extract JSON from several texts")
    async def extract_many(self, reqs: list[ExtractRequest]) -> list[dict]:
        if not reqs:
            raise HTTPException(400, "empty batch")
        if len(reqs) > self.limits.max_batch_items:
            raise HTTPException(413, f"{len(reqs)} items, over this deployment's limit of "
                                     f"{self.limits.max_batch_items} per batch")
        return list(await asyncio.gather(*(self._one(r) for r in reqs)))

    @app.post("/v1/chat/completions", responses=ERRORS,
              summary="OpenAI-compatible structured output (response_format json_schema)")
    async def chat(self, req: ChatRequest) -> dict:
        users = [i for i, m in enumerate(req.messages) if m.role == "user"]
        if not users:
            raise HTTPException(400, "messages must contain a user message with the text")
        content = message_text(req.messages[users[-1]].content)
        # The assistant turn the text answers (the question a dialogue system asked) is its context.
        asked = [m for m in req.messages[:users[-1]] if m.role == "assistant"]
        context = message_text(asked[-1].content) if asked else None
        schema = None
        rf = req.response_format or {}
        if rf.get("type") == "json_schema":
            schema = (rf.get("json_schema") or {}).get("schema") if isinstance(rf.get("json_schema"), dict) else None
            if not isinstance(schema, dict):
                raise HTTPException(400, "response_format.json_schema.schema must be a JSON Schema object")
        elif rf and rf.get("type") not in ("json_object", "text"):
            raise HTTPException(400, f"unsupported response_format type {str(rf.get('type'))[:40]!r}")
        model = req.model if req.model not in (None, "", "jsonextract") else None
        res = await self._one(ExtractRequest(text=content if isinstance(content, str) else "", schema=schema,
                                             adapter=model, context=context if isinstance(context, str) else None,
                                             max_new_tokens=req.max_completion_tokens or req.max_tokens))
        if not res["valid"] and not (res["error"] or "").startswith("truncated"):
            raise HTTPException(422, f"the model's output did not validate: {res['error']}")
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": res["adapter"] or "jsonextract",
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                 "content": json.dumps(res["output"], ensure_ascii=False)
                                                 if res["valid"] else res.get("raw", "")},
                         "finish_reason": "stop" if res["valid"] else "length", "logprobs": None}],
            "usage": {"prompt_tokens": res["usage"]["input_tokens"], "completion_tokens": res["usage"]["output_tokens"],
                      "total_tokens": res["usage"]["input_tokens"] + res["usage"]["output_tokens"]},
        }

    @app.get("/v1/models", summary="OpenAI model list: the adapters this deployment serves")
    async def models(self) -> dict:
        self.registry.refresh()
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "jsonextract"}
                                           for n in self.registry.names()]}

    @app.get("/adapters", summary="Adapter names, and the one used when a request names none")
    async def adapters(self) -> dict:
        self.registry.refresh()
        return {"adapters": self.registry.names(), "default": self.default}

    @app.get("/", include_in_schema=False)
    async def page(self):
        """The web page: paste a text, extract, see each value highlighted in the text (no external assets)."""
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/healthz", summary="Liveness (open without an API key)")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/schema", responses=ERRORS, summary="An adapter's schema and manifest (default: the deployment's)")
    async def schema(self, adapter: Optional[str] = None) -> dict:
        name = self.adapter_name(adapter)
        handle = self.model.info.options(multiplexed_model_id=name) if name else self.model.info
        return await handle.remote(name)


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
