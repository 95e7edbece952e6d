"""Request and response models of the HTTP API (docs/architecture.md 3).

This module is the API's documentation: FastAPI renders it as /openapi.json
and /docs. A *page* is what the client calls a page: an element of `pages`,
a part of `text` between form feeds (`\\f`, as pdftotext writes), or one
NDJSON line of /v1/classify/stream; text without form feeds is cut into
pages of the model's `page_tokens` tokens.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator


class _Request(BaseModel):
    # Unknown fields are a client bug (e.g. "page" for "pages"): say so (422).
    model_config = ConfigDict(extra="forbid")


def _text_or_pages_schema(schema: dict[str, Any]) -> None:
    """State `_Document._exactly_one` in the JSON schema, so that a generated
    client or a fuzzer sends one of `text` and `pages`: exactly one is
    present, and neither is null (null means absent) nor defaults to null."""
    schema["oneOf"] = [{"required": ["text"]}, {"required": ["pages"]}]
    for name in ("text", "pages"):
        prop = schema["properties"][name]
        prop.pop("default", None)
        (given,) = [s for s in prop.pop("anyOf") if s.get("type") != "null"]
        prop.update(given)


class _Document(_Request):
    # The schema states these rules, the checks stay where they were, and so do
    # the answers: `_exactly_one` refuses both, neither and `[]` (422
    # validation_error), and `""` reaches the model (422 empty_document, as
    # whitespace-only text). Field constraints would change those answers.
    model_config = ConfigDict(json_schema_extra=_text_or_pages_schema)

    text: StrictStr | None = Field(
        default=None, description="the document; form feeds (\\f) separate pages",
        examples=["First page.\fSecond page."], json_schema_extra={"minLength": 1},
    )
    pages: list[StrictStr] | None = Field(
        default=None, description="the document as a list of pages", examples=[["First page.", "Second page."]],
        json_schema_extra={"minItems": 1},
    )

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.text is None) == (self.pages is None):
            raise ValueError("give exactly one of `text` and `pages`")
        if self.pages is not None and len(self.pages) == 0:
            raise ValueError("`pages` is empty")
        return self


class ClassifyRequest(_Document):
    """Classify a whole document in one request (no session)."""

    model: StrictStr = Field(description="a model name from GET /v1/models", examples=["bsbr"])


class SessionCreateRequest(_Request):
    model: StrictStr = Field(description="a model name from GET /v1/models", examples=["bsbr"])
    ttl_s: float | None = Field(
        default=None, gt=0, description="idle time-to-live; at most (and by default) the server's sessions.ttl_s",
    )


class PagesRequest(_Document):
    """Append pages to a session. `seq` numbers the requests of a session
    0, 1, 2, ...: repeating a seq returns its stored answer without applying
    the pages twice; skipping one is a 409."""

    seq: StrictInt = Field(ge=0, description="0 for the session's first request, then +1", examples=[0])


class StreamLine(_Request):
    """One line of the NDJSON body of POST /v1/classify/stream: one page."""

    text: StrictStr


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. seq_gap, too_many_tokens")
    message: str


class ErrorResponse(BaseModel):
    """Every error (400, 404, 409, 413, 422, 429, 503) has this body; 429 and
    503 add a Retry-After header."""

    error: ErrorDetail


class Health(BaseModel):
    status: str = "ok"


class Readiness(BaseModel):
    status: str = Field(description="ready | not_ready")
    models: dict[str, bool] = Field(description="per model deployment: answering")


class ModelInfo(BaseModel):
    name: str
    arch: str = Field(description="bsbr | standard | linear | sliding_window | delta_net")
    labels: list[str]
    chunk_size: int
    max_tokens: int = Field(description="longest document accepted (tokens); beyond: 413")
    page_tokens: int = Field(description="page size for text without form feeds")
    max_length: int | None = Field(description="standard-512 baseline: tokens read; null: all")
    hidden_dim: int
    num_layers: int
    num_heads: int
    vocab_size: int
    backend: str
    device: str
    trained: bool = Field(description="false for random-init development models (bsbr-serve init-models --random)")
    parameters: int
    card: dict = Field(default_factory=dict, description="metrics.json of the checkpoint, if any")


class ModelList(BaseModel):
    models: list[ModelInfo]


class Prediction(BaseModel):
    label: str | None = Field(description="argmax label; null before the first token")
    scores: dict[str, float] = Field(description="softmax probability per label")
    logits: dict[str, float] = Field(description="raw logit per label")
    num_tokens: int
    num_pages: int
    state_bytes: int = Field(description="bytes of the carried state after the last page")


class ClassifyTiming(BaseModel):
    total_ms: float = Field(description="time in the model replica, tokenising included")
    per_page_ms: list[float] = Field(
        description="each page's share of the model's time: the document is read in steps of "
                    "oneshot_segment_tokens tokens (queueing for a batch included), and each step's time is "
                    "divided among the pages it holds by their tokens")


class ClassifyResponse(Prediction):
    model: str
    timing: ClassifyTiming
    peak_memory_bytes: int = Field(
        description="CUDA: torch.cuda.max_memory_allocated; CPU: peak RSS of the replica process (see README)",
    )


class SessionCreated(BaseModel):
    session_id: str = Field(description="128-bit random, hex")
    model: str
    expires_in_s: float = Field(description="idle time-to-live; every request renews it")


class SessionTiming(BaseModel):
    page_ms: list[float] = Field(description="latency of each page of this request")
    total_ms: float


class SessionResult(Prediction):
    """A session's running result: the answer for the document so far."""

    session_id: str
    model: str
    seq: int | None = Field(description="last applied seq; null before the first page")
    timing: SessionTiming
    expires_in_s: float
    final: bool = Field(default=False, description="true on DELETE and on the last line of a stream")
