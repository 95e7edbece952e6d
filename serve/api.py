"""HTTP API (docs/architecture.md 3): FastAPI routes behind `@serve.ingress`.

The ingress knows nothing of tensors: it validates requests (schemas),
enforces body limits, turns PDF bodies into pages (serve.pdf: worker
processes with a deadline and a memory limit per document, 3.6), picks the
model (for a session: the model that owns it, asked of the store once and
cached), calls it through its typed `serve.engine_client.EngineClient`
(over Ray: a Serve handle per method with the session id in the request
metadata, so `serve.router` sends it to the replica holding the session; a
deadline for getting a replica; retries while replicas die) and maps typed
errors to statuses in one place (`_error_response`).

`ApiServer` is the routes' class; `Api` is its Serve deployment. With
`local_app(clients, config)` the same routes serve in-process engines under
FastAPI's TestClient, no Ray (tests/test_serve_api_inprocess.py).
"""
import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.constants import REF_TEMPLATE
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import schemas
from serve.config import AppConfig, HttpConfig
from serve.engine_client import EngineClient, RayEngineClient, Reply
from serve.errors import (
    BodyTooLarge,
    EmptyDocument,
    InternalError,
    InvalidEncoding,
    InvalidJSON,
    MethodNotAllowed,
    NotFound,
    NotReady,
    ServeError,
    SessionNotFound,
    UnknownModel,
    UnsupportedMediaType,
    ValidationFailed,
)
from serve.metrics import EngineMetrics, RayServeMetrics
from serve.pdf import PDF_MEDIA_TYPE, PdfExtractor, PdfLimits
from serve.store import make_store

logger = logging.getLogger("ray.serve")

STREAM_ROUTE = "/v1/classify/stream"
NDJSON = "application/x-ndjson"
JSON = "application/json"

DESCRIPTION = """\
Classify long documents with BSBR (block sparse attention with block
retrieval) and a standard-transformer baseline, in one request, page by page
through a session whose state is carried between requests, or as one NDJSON
stream. A document is JSON (text with form feeds, or a list of pages) or a
PDF (`Content-Type: application/pdf`, one page per PDF page). Errors:
`{"error": {"code", "message"}}`; 429 and 503 carry Retry-After.
"""


def _ref(model: type[BaseModel]) -> dict[str, str]:
    """A $ref to `model` in the OpenAPI document's components."""
    return {"$ref": REF_TEMPLATE.format(model=model.__name__)}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route: these statuses, and any other (405, ...), carry ErrorResponse."""
    return {**{k: {"model": schemas.ErrorResponse} for k in statuses},
            "default": {"model": schemas.ErrorResponse, "description": "Any other error"}}


def _json_or_pdf(model: type[BaseModel], pdf_params: str) -> dict[str, Any]:
    """`openapi_extra=` of a route whose body is `model` as JSON or a PDF (the
    route reads the body itself, `_json_body`, so FastAPI declares none)."""
    return {"requestBody": {"required": True, "content": {
        JSON: {"schema": _ref(model)},
        PDF_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary",
                                    "description": f"a PDF, one page per PDF page; {pdf_params} in the query"}},
    }}}


class _Ingress(FastAPI):
    """FastAPI whose OpenAPI document also holds the models of the bodies routes read themselves.

    FastAPI adds to `components.schemas` only the models of the JSON bodies
    it parses and of responses. The stream route names the models of its
    NDJSON lines by `_ref`, the document routes (JSON or PDF) their JSON
    models, and those are added here, so that every $ref resolves inside the
    document."""

    body_models: tuple[tuple[type[BaseModel], JsonSchemaMode], ...] = (
        (schemas.StreamLine, "validation"), (schemas.SessionResult, "serialization"),
        (schemas.ErrorResponse, "serialization"), (schemas.ClassifyRequest, "validation"),
        (schemas.PagesRequest, "validation"),
    )

    def openapi(self) -> dict[str, Any]:
        if not self.openapi_schema:
            doc = super().openapi()
            _, defs = models_json_schema(self.body_models, ref_template=REF_TEMPLATE)
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in defs.get("$defs", {}).items():
                components.setdefault(name, schema)
        return self.openapi_schema


app = _Ingress(title="bsbr-serve", version="0.1.0", description=DESCRIPTION)


class _Runtime:
    """What the exception handlers and the middleware need from the Api replica.

    Serve serialises the ingress class by value, with its own copy of this
    module's globals, so the class reaches this (the real module's) object
    only through `configure_runtime`, a function imported by reference."""

    metrics: EngineMetrics = EngineMetrics()
    known_models: frozenset[str] = frozenset()
    max_body_bytes: int = HttpConfig().max_body_bytes


def configure_runtime(metrics: EngineMetrics, known_models: set[str], max_body_bytes: int) -> None:
    _Runtime.metrics = metrics
    _Runtime.known_models = frozenset(known_models)
    _Runtime.max_body_bytes = max_body_bytes


def _metric_model(name: str | None) -> str:
    """Model label for metrics: only known names (user input must not create series)."""
    return name if name in _Runtime.known_models else "unknown"


def _error_response(request: Request | None, e: ServeError) -> JSONResponse:
    model = getattr(request.state, "model", None) if request is not None else None
    _Runtime.metrics.error(e.code, model=_metric_model(model))
    headers = {"Retry-After": e.retry_after_header} if e.retry_after_header else None
    return JSONResponse({"error": {"code": e.code, "message": e.message}}, status_code=e.status, headers=headers)


@app.exception_handler(ServeError)
async def _serve_error(request: Request, e: ServeError):
    return _error_response(request, e)


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


@app.exception_handler(RequestValidationError)
async def _request_validation(request: Request, e: RequestValidationError):
    errors = e.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return _error_response(request, InvalidJSON(f"request body is not valid JSON: {_validation_message(errors)}"))
    missing_body = any(err.get("type") == "missing" and tuple(err.get("loc", ())) == ("body",) for err in errors)
    if missing_body:
        return _error_response(request, InvalidJSON("request body is missing; send a JSON object"))
    return _error_response(request, ValidationFailed(_validation_message(errors)))


@app.exception_handler(StarletteHTTPException)
async def _http_exception(request: Request, e: StarletteHTTPException):
    if e.status_code == 404:
        err: ServeError = NotFound(f"no route {request.method} {request.url.path}")
    elif e.status_code == 405:
        err = MethodNotAllowed(f"method {request.method} is not allowed on {request.url.path}")
    elif e.status_code == 400:
        # FastAPI answers 400 when the body cannot even be decoded (e.g. not UTF-8).
        err = InvalidEncoding("request body is not UTF-8 JSON")
    else:
        err = ServeError(str(e.detail))
        err.status, err.code = e.status_code, "http_error"
    return _error_response(request, err)


@app.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception):
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return _error_response(request, InternalError(f"internal error: {type(e).__name__}"))


class LimitsAndTiming:
    """ASGI middleware: body byte limit (413) and bsbr_request_latency_seconds.

    The limit is checked on Content-Length up front and on the bytes
    actually received (chunked uploads). The NDJSON stream route has no
    total limit (documents are long by design), only one per line and
    `max_tokens`.
    """

    def __init__(self, asgi):
        self.asgi = asgi

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.asgi(scope, receive, send)
        t0 = time.perf_counter()
        limit = None if scope.get("path") == STREAM_ROUTE else _Runtime.max_body_bytes
        if limit is not None:
            for k, v in scope.get("headers", []):
                if k == b"content-length":
                    try:
                        n = int(v)
                    except ValueError:
                        n = 0
                    if n > limit:
                        resp = _error_response(None, BodyTooLarge(f"request body of {n} bytes exceeds {limit}"))
                        return await resp(scope, receive, send)
            # Read the body here (the app would buffer it anyway) so an oversized
            # chunked upload is refused before FastAPI turns any error into a 400.
            chunks, seen, more = [], 0, True
            while more:
                msg = await receive()
                if msg["type"] != "http.request":
                    break
                body = msg.get("body", b"")
                seen += len(body)
                if seen > limit:
                    resp = _error_response(None, BodyTooLarge(f"request body exceeds {limit} bytes"))
                    return await resp(scope, receive, send)
                chunks.append(body)
                more = msg.get("more_body", False)
            replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
            inner = receive

            async def receive():
                return replay.pop() if replay else await inner()

        try:
            await self.asgi(scope, receive, send)
        finally:
            route = scope.get("route")
            model = (scope.get("state") or {}).get("model")
            if route is not None and model is not None:
                _Runtime.metrics.request(getattr(route, "path", "?"), time.perf_counter() - t0, model=_metric_model(model))


class NdjsonStream(StreamingResponse):
    """A StreamingResponse that never reads `receive`: the route's generator
    is still reading the request body (pages) while it answers, and
    Starlette's disconnect listener would swallow those body messages.

    The media type is set per response, not on the class: as the route's
    `response_class` the class then adds no body schema of its own to the
    OpenAPI document (the route declares its lines), and the route's error
    responses stay application/json."""

    def __init__(self, content: AsyncIterator[bytes], status_code: int = 200) -> None:
        super().__init__(content, status_code=status_code, media_type=NDJSON)

    async def __call__(self, scope, receive, send):
        await self.stream_response(send)


app.add_middleware(LimitsAndTiming)


def _is_session_id(s: str) -> bool:
    return len(s) == 32 and all(c in "0123456789abcdef" for c in s)


# --- document bodies: JSON or PDF ---------------------------------------------------------------


def _body_type(request: Request) -> str:
    """JSON or PDF_MEDIA_TYPE by Content-Type (none: JSON, as FastAPI reads a
    body); any other type is 415."""
    raw = request.headers.get("content-type") or JSON
    media = raw.split(";", 1)[0].strip().lower()
    if media == PDF_MEDIA_TYPE:
        return PDF_MEDIA_TYPE
    if media == JSON or (media.startswith("application/") and media.endswith("+json")):
        return JSON
    raise UnsupportedMediaType(f"Content-Type {media!r} is not read here: send {JSON} (the document as JSON) "
                               f"or {PDF_MEDIA_TYPE} (a PDF, one page per PDF page)")


async def _json_body(request: Request, model: type[BaseModel]) -> Any:
    """The body validated as `model`, refused exactly as FastAPI refuses a JSON
    body parameter (the handlers above turn these into the usual answers)."""
    body = await request.body()
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": e.msg}}]) from None
    except ValueError:  # not UTF-8 (or UTF-16/32)
        raise InvalidEncoding("request body is not UTF-8 JSON") from None
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None


def _for_pdf(value: Any, name: str) -> Any:
    """A query parameter that a PDF body needs (a JSON body carries it inside)."""
    if value is None:
        raise ValidationFailed(f"query.{name}: required with a PDF body (?{name}=...)")
    return value


def _not_for_json(value: Any, name: str) -> None:
    if value is not None:
        raise ValidationFailed(f"query.{name}: only for PDF bodies; a JSON body gives `{name}` inside")


def _parse_stream_line(line: bytes, limit: int) -> str:
    if len(line) > limit:
        raise BodyTooLarge(f"a stream line exceeds {limit} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidEncoding("a stream line is not UTF-8") from None
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise InvalidJSON(f"a stream line is not JSON: {e}") from None
    try:
        return schemas.StreamLine.model_validate(obj).text
    except ValidationError as e:
        raise ValidationFailed(f"a stream line must be {{\"text\": \"...\"}}: {_validation_message(e.errors())}") from None


# --- the deployment ---------------------------------------------------------------------


class ApiServer:
    """The ingress: the routes above, over one EngineClient per model."""

    def __init__(self, models: dict[str, Any], config: dict[str, Any],
                 clients: dict[str, EngineClient] | None = None):
        """`models`: name -> the model deployment's DeploymentHandle (in Serve);
        or `clients`: name -> EngineClient (in-process, `local_app`)."""
        self.cfg = AppConfig.model_validate(config)
        h = self.cfg.http
        if clients is None:
            clients = {name: RayEngineClient(name, handle, replica_timeout_s=h.replica_timeout_s, retry_s=h.retry_s)
                       for name, handle in models.items()}
        self.models: dict[str, EngineClient] = clients
        try:
            self.metrics: EngineMetrics = RayServeMetrics(model="")
        except Exception:  # noqa: BLE001 - outside Ray (unit tests)
            self.metrics = EngineMetrics()
        configure_runtime(self.metrics, set(self.models), h.max_body_bytes)
        # PDF bodies become pages here, in worker processes (started with the first PDF).
        self.pdf = PdfExtractor(PdfLimits(max_pages=h.max_pdf_pages, timeout_s=h.pdf_timeout_s,
                                          memory_bytes=h.pdf_memory_bytes, workers=h.pdf_workers,
                                          max_queued=h.pdf_max_queued), metrics=self.metrics)
        s = self.cfg.sessions
        # Only to find which model owns a session; the model replicas own the sessions.
        self.store = make_store(s)
        self._session_model: OrderedDict[str, str] = OrderedDict()
        self._info: dict[str, dict[str, Any]] = {}

    def __del__(self):
        pdf = getattr(self, "pdf", None)
        if pdf is not None:
            pdf.close()

    # --- calling the models ------------------------------------------------------------

    def _client(self, model: str, request: Request | None = None) -> EngineClient:
        if request is not None:
            request.state.model = model
        c = self.models.get(model)
        if c is None:
            raise UnknownModel(f"unknown model {model!r}; available: {sorted(self.models)}")
        return c

    @staticmethod
    def _result(reply: Reply, request: Request | None = None) -> dict[str, Any]:
        """The engine's answer; its replica goes into the response header."""
        if request is not None and reply.replica:
            request.state.replica = reply.replica
        return reply.result

    async def _model_of(self, session_id: str, request: Request, for_page: bool = False) -> str:
        """The model that owns a session (sessions never change model); `for_page`:
        for a page request, which will resume the session where it is not hot."""
        if not _is_session_id(session_id):
            raise SessionNotFound(f"session {session_id!r} not found (ids are 32 hex characters)")
        model = self._session_model.get(session_id)
        if model is None:
            model = await self._lookup_model(session_id, for_page)
            self._session_model[session_id] = model
            while len(self._session_model) > 100_000:
                self._session_model.popitem(last=False)
        request.state.model = model
        return model

    async def _lookup_model(self, session_id: str, for_page: bool = False) -> str:
        if self.cfg.sessions.store != "memory":
            return (await self.store.head(session_id))["model"]
        # A per-replica store: only the model replicas know their sessions.
        for name, c in self.models.items():
            try:
                await c.get(session_id)
                return name
            except SessionNotFound:
                continue
        raise SessionNotFound(f"session {session_id} not found (unknown, deleted or expired)")

    @staticmethod
    def _with_replica(body: dict[str, Any], request: Request, status: int = 200) -> JSONResponse:
        replica = getattr(request.state, "replica", None)
        headers = {"X-Bsbr-Replica": replica} if replica else None
        return JSONResponse(body, status_code=status, headers=headers)

    # --- routes ---------------------------------------------------------------------

    @app.get("/healthz", response_model=schemas.Health, tags=["health"])
    async def healthz(self) -> dict[str, str]:
        """200 while the process lives."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=schemas.Readiness, tags=["health"], responses=_errors(503))
    async def readyz(self):
        """200 when every model deployment answers, else 503."""
        async def ping(c: EngineClient) -> bool:
            try:
                return bool(await asyncio.wait_for(c.ready(), self.cfg.http.ready_timeout_s))
            except Exception:  # noqa: BLE001 - any failure means not ready
                return False

        names = sorted(self.models)
        ok = await asyncio.gather(*(ping(self.models[n]) for n in names))
        status = dict(zip(names, ok))
        if all(ok):
            return {"status": "ready", "models": status}
        down = [n for n, o in status.items() if not o]
        e = NotReady(f"model deployments not ready: {down}", retry_after_s=2.0)
        return JSONResponse({"error": {"code": e.code, "message": e.message}, "models": status},
                            status_code=503, headers={"Retry-After": e.retry_after_header})

    @app.get("/v1/models", response_model=schemas.ModelList, tags=["models"], responses=_errors(429, 503))
    async def list_models(self):
        """The served models, their labels and limits."""
        out = []
        for name in self.models:
            if name not in self._info:
                self._info[name] = self._result(await self._client(name).info())
            out.append(self._info[name])
        return {"models": out}

    async def _pdf_pages(self, request: Request) -> list[str]:
        """The text of each page of the PDF body (InvalidPdf, TooManyPdfPages, Overloaded)."""
        return (await self.pdf.extract(await request.body())).pages

    @app.post("/v1/classify", response_model=schemas.ClassifyResponse, tags=["classify"],
              responses=_errors(400, 404, 413, 415, 422, 429, 503),
              openapi_extra=_json_or_pdf(schemas.ClassifyRequest, "`model`"))
    async def classify(self, request: Request,
                       model: str | None = Query(None, description="the model, with a PDF body (JSON names it inside)")):
        """Classify a whole document in one request: JSON (text with form feeds, or
        pages), or a PDF (`Content-Type: application/pdf`, `?model=`), one page per PDF page."""
        if _body_type(request) == PDF_MEDIA_TYPE:
            client = self._client(_for_pdf(model, "model"), request)
            pages = await self._pdf_pages(request)
            result = self._result(await client.classify(None, pages), request)
        else:
            _not_for_json(model, "model")
            body = await _json_body(request, schemas.ClassifyRequest)
            client = self._client(body.model, request)
            result = self._result(await client.classify(body.text, body.pages), request)
        return self._with_replica(result, request)

    @app.post("/v1/sessions", status_code=201, response_model=schemas.SessionCreated, tags=["sessions"],
              responses=_errors(400, 404, 422, 429, 503))
    async def create_session(self, body: schemas.SessionCreateRequest, request: Request):
        """Open a session: its pages arrive in later requests; the state is carried between them."""
        result = self._result(await self._client(body.model, request).create_session(body.ttl_s), request)
        self._session_model[result["session_id"]] = body.model
        return self._with_replica(result, request, status=201)

    @app.post("/v1/sessions/{session_id}/pages", response_model=schemas.SessionResult, tags=["sessions"],
              responses=_errors(400, 404, 409, 413, 415, 422, 429, 503),
              openapi_extra=_json_or_pdf(schemas.PagesRequest, "`seq`"))
    async def append_pages(self, session_id: str, request: Request,
                           seq: int | None = Query(None, ge=0, description="with a PDF body: the request's seq "
                                                                           "(JSON gives it inside)")):
        """Append the next page(s), JSON or a PDF (`?seq=`, one page per PDF page); the
        same seq again returns its stored answer; a gap is 409."""
        if _body_type(request) == PDF_MEDIA_TYPE:
            seq = _for_pdf(seq, "seq")
            model = await self._model_of(session_id, request, for_page=True)
            text, pages = None, await self._pdf_pages(request)
        else:
            _not_for_json(seq, "seq")
            body = await _json_body(request, schemas.PagesRequest)
            model = await self._model_of(session_id, request, for_page=True)
            seq, text, pages = body.seq, body.text, body.pages
        result = self._result(await self._client(model).append(session_id, seq, text, pages, "session"), request)
        return self._with_replica(result, request)

    @app.get("/v1/sessions/{session_id}", response_model=schemas.SessionResult, tags=["sessions"],
             responses=_errors(404))
    async def get_session(self, session_id: str, request: Request):
        """The session's current result."""
        model = await self._model_of(session_id, request)
        result = self._result(await self._client(model).get(session_id), request)
        return self._with_replica(result, request)

    @app.delete("/v1/sessions/{session_id}", response_model=schemas.SessionResult, tags=["sessions"],
                responses=_errors(404))
    async def delete_session(self, session_id: str, request: Request):
        """The final result; the session is gone."""
        model = await self._model_of(session_id, request)
        result = self._result(await self._client(model).close(session_id), request)
        self._session_model.pop(session_id, None)
        return self._with_replica(result, request)

    @app.post(
        STREAM_ROUTE, tags=["classify"], response_class=NdjsonStream,
        responses={200: {"content": {NDJSON: {"schema": {"anyOf": [_ref(schemas.SessionResult),
                                                                   _ref(schemas.ErrorResponse)]}}},
                         "description": "NDJSON, each line: the running result after a page, the last one "
                                        "with final: true, or an error that ends the stream"},
                   **_errors(400, 404, 413, 415, 422, 429, 503)},
        openapi_extra={"requestBody": {"required": True, "description": "NDJSON, each line: one page",
                                       "content": {NDJSON: {"schema": _ref(schemas.StreamLine)}}}},
    )
    async def classify_stream(self, request: Request, model: str = Query(..., description="model name")):
        """Stream a document: request body NDJSON, one `{"text": ...}` per page (chunked
        transfer); response NDJSON, the running result after each page, then the final
        result with `"final": true`. An error after the first page ends the stream with
        one `{"error": ...}` line."""
        client = self._client(model, request)
        if (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower() == PDF_MEDIA_TYPE:
            raise UnsupportedMediaType("the stream reads NDJSON pages; send a PDF to /v1/classify or to a "
                                       "session's pages (bsbr-serve stream FILE.pdf does the latter, page by page)")
        lines = self._stream_pages(request)
        first = await anext(lines, None)
        if first is None:
            raise EmptyDocument("the stream holds no page (send one {\"text\": ...} per line)")
        session_id = self._result(await client.create_session(), request)["session_id"]
        try:
            r0 = self._result(await client.append(session_id, 0, None, [first], "stream"), request)
        except BaseException:
            await self._close_quietly(client, session_id)
            raise
        return NdjsonStream(self._stream_results(model, client, session_id, r0, lines))

    async def _stream_pages(self, request: Request) -> AsyncIterator[str]:
        """Pages of an NDJSON body as they arrive; blank lines are skipped."""
        limit = self.cfg.http.max_line_bytes
        buf = b""
        async for chunk in request.stream():
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    yield _parse_stream_line(line, limit)
            if len(buf) > limit:
                raise BodyTooLarge(f"a stream line exceeds {limit} bytes")
        if buf.strip():
            yield _parse_stream_line(buf, limit)

    async def _stream_results(self, model: str, client: EngineClient, session_id: str, first: dict,
                              lines: AsyncIterator[str]):
        def dump(obj) -> bytes:
            return (json.dumps(obj, separators=(",", ":")) + "\n").encode()

        closed = False
        try:
            yield dump(first)
            seq = 1
            async for text in lines:
                r = (await client.append(session_id, seq, None, [text], "stream")).result
                yield dump(r)
                seq += 1
            final = (await client.close(session_id)).result
            closed = True
            yield dump(final)
        except ServeError as e:
            self.metrics.error(e.code, model=_metric_model(model))
            yield dump({"error": {"code": e.code, "message": e.message}})
        finally:
            if not closed:
                await self._close_quietly(client, session_id)

    async def _close_quietly(self, client: EngineClient, session_id: str) -> None:
        try:
            await client.close(session_id)
        except Exception as e:  # noqa: BLE001 - best effort; the TTL collects it otherwise
            logger.info("could not close stream session %s: %s", session_id, e)


Api = serve.deployment(name="api", max_ongoing_requests=256)(serve.ingress(app)(ApiServer))


class FusedApiServer(ApiServer):
    """The ingress with every model's engine in its own process (`topology: fused`).

    A page request is then one hop, proxy -> this replica, instead of proxy ->
    ingress -> model replica: no handle call, no copy of the text or the
    result between processes, and one Serve replica's request overhead
    instead of two (docs/architecture.md 3.7). Each engine keeps its own
    worker thread, batcher and connection to the session store; with several
    replicas the proxy routes a session's requests by its id
    (serve.router.session_of_request)."""

    def __init__(self, config: dict[str, Any]):
        import torch

        from serve.deployments import make_engine, replica_name, torch_threads
        from serve.engine_client import InProcessEngineClient

        cfg = AppConfig.model_validate(config)
        torch.set_num_threads(max(torch_threads(m) for m in cfg.models))
        self.replica = replica_name()
        self.engines = {m.name: make_engine(m.name, m, cfg.sessions) for m in cfg.models}
        super().__init__({}, config, clients={n: InProcessEngineClient(e, self.replica) for n, e in self.engines.items()})
        self._upkeep: list[asyncio.Task] = []

    def _start_upkeep(self) -> None:
        """Sweeps and gauges, on the loop the replica runs requests on (not there yet
        in __init__): started by the first health check or request."""
        if not self._upkeep:
            from serve.deployments import engine_upkeep

            loop = asyncio.get_running_loop()
            self._upkeep = [loop.create_task(engine_upkeep(e)) for e in self.engines.values()]
            # The ingress's own store client (which model owns a session) opens its connection now too.
            self._upkeep.append(loop.create_task(self.store.warm()))

    def _client(self, model: str, request: Request | None = None) -> EngineClient:
        self._start_upkeep()
        return super()._client(model, request)

    async def _lookup_model(self, session_id: str, for_page: bool = False) -> str:
        """For a page: one store load instead of a head, handed to the engine that owns
        the session (Engine.preloaded), which would otherwise load it again to resume."""
        if not for_page or self.cfg.sessions.store == "memory":
            return await super()._lookup_model(session_id, for_page)
        meta, chain = await self.store.load(session_id)
        engine = self.engines.get(meta["model"])
        if engine is not None:
            engine.preloaded(session_id, (meta, chain))
        return meta["model"]

    async def check_health(self) -> None:
        self._start_upkeep()


FusedApi = serve.deployment(name="api", max_ongoing_requests=256, health_check_period_s=5)(
    serve.ingress(app)(FusedApiServer))


def local_app(clients: dict[str, EngineClient], config: dict[str, Any] | None = None) -> FastAPI:
    """The HTTP API over these clients in this process (FastAPI's TestClient, no
    Ray): the routes' `self` is one ApiServer instead of the Serve replica."""
    server = ApiServer({}, config or {"sessions": {"store": "memory"}}, clients=clients)

    async def this_server() -> ApiServer:  # async, as Serve's is: FastAPI runs a sync one in a worker thread
        return server

    for dep in _self_dependencies(app):
        app.dependency_overrides[dep] = this_server
    return app


def _self_dependencies(router) -> set:
    """The dependency `@serve.ingress` gives the routes' `self` (Serve's replica
    instance, `self=Depends(...)` in each endpoint's signature), under included
    routers too (FastAPI >= 0.137 nests them)."""
    import inspect

    out = set()
    for route in getattr(router, "routes", ()):
        endpoint = getattr(route, "endpoint", None)
        if endpoint is not None:
            param = inspect.signature(endpoint).parameters.get("self")
            dependency = getattr(getattr(param, "default", None), "dependency", None)
            if dependency is not None:
                out.add(dependency)
        inner = getattr(route, "original_router", None)
        if inner is not None:
            out |= _self_dependencies(inner)
    return out
