"""The HTTP routes (FastAPI, served by the `Api` ingress deployment): request checks, then the model deployment.

Routes: POST /extract, POST /extract/batch, POST /v1/chat/completions and GET /v1/models (OpenAI), GET /adapters,
GET /schema, GET /healthz (open without a key), GET / (the web page), OpenAPI docs at /docs. Bad input gets a 4xx
with a reason, never a 5xx; overload and a lost replica get 503 with Retry-After.
"""
# No `from __future__ import annotations` in the modules FastAPI reads: under @serve.ingress a string annotation
# of a request model was not resolved, and FastAPI took the chat body for a required query parameter.
import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from jsonextract.config.serve import ServeConfig
from jsonextract.data.prompt import context_text
from jsonextract.data.records import parse_context
from jsonextract.data.schema import SchemaError, check_limits, check_schema
from jsonextract.models.adapters import NAME, AdapterRegistry
from serve.api_types import ERRORS, ChatRequest, ExtractRequest, ExtractResponse, message_text
from serve.errors import check_unicode, unavailable
from serve.guard import Guard, GuardSettings

PAGE = Path(__file__).with_name("static") / "index.html"


app = FastAPI(title="jsonextract", description="Text -> JSON that validates against a JSON Schema.",
              version="0.1.0")


app.add_middleware(Guard)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    """Malformed JSON bodies and wrong types: 422 with the field and the reason (FastAPI's own detail)."""
    return JSONResponse(status_code=422, content={"detail": [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]})


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
