"""The HTTP API's request and response bodies (pydantic), as OpenAPI documents them at /docs."""
# No `from __future__ import annotations` in the modules FastAPI reads: under @serve.ingress a string annotation
# of a request model was not resolved, and FastAPI took the chat body for a required query parameter.
from typing import Any, Optional, Union

from pydantic import BaseModel, Field

from jsonextract.config.core import GroundingPolicy


class ExtractRequest(BaseModel):
    text: str = Field(..., description="the document to extract from")
    context: Optional[Union[dict[str, Any], str]] = Field(
        None, description='what the text answers, shown to the model beside it (e.g. {"requested_slots": ["time"]} '
                          'for a reply to "what time?"); an object or a string; grounding points into text only')
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema", description="JSON Schema (default: the adapter's)")
    adapter: Optional[str] = Field(None, description="adapter name from GET /adapters (default: the deployment's)")
    max_new_tokens: Optional[int] = Field(None, ge=1, description="generation budget for this request")
    grounding: Optional[GroundingPolicy] = Field(
        None, description="locate each value in the text (annotate), and also remove free-text values not found "
                          "there (drop_ungrounded), or first replace a value not copied from the text by the "
                          "nearest span of whole words (snap); default: the deployment's decoding.grounding")

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
    dropped: Optional[list[str]] = Field(None, description="paths removed by grounding=drop_ungrounded or snap")
    snapped: Optional[dict[str, str]] = Field(
        None, description="grounding=snap: per path replaced by a span of the text, the value the model wrote")

class ErrorResponse(BaseModel):
    detail: Any = Field(..., description="why the request was refused")


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
