"""Typed errors of the server, each mapped to one HTTP status in one place.

Everything below the HTTP layer (engine, store, deployments) raises these;
`serve.api` turns them into `{"error": {"code", "message"}}` with the status
and, for 429/503, a Retry-After header. Across Ray process boundaries they
travel as plain dicts (`to_wire` / `from_wire`), never as pickled exceptions,
so a caller on another Ray version or language still reads them.
"""
from __future__ import annotations

import math
from typing import Any


class ServeError(Exception):
    """Base of every error a client can cause or be told about."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def to_wire(self) -> dict[str, Any]:
        return {
            "error": {"code": self.code, "message": self.message},
            "status": self.status,
            "retry_after_s": self.retry_after_s,
        }

    @property
    def retry_after_header(self) -> str | None:
        """Retry-After in whole seconds (at least 1), or None."""
        if self.retry_after_s is None:
            return None
        return str(max(1, math.ceil(self.retry_after_s)))


class BadRequest(ServeError):
    status, code = 400, "bad_request"


class InvalidJSON(ServeError):
    status, code = 400, "invalid_json"


class InvalidEncoding(ServeError):
    status, code = 400, "invalid_encoding"


class ValidationFailed(ServeError):
    status, code = 422, "validation_error"


class UnsupportedMediaType(ServeError):
    """A body of a Content-Type the route does not read (JSON and PDF are)."""

    status, code = 415, "unsupported_media_type"


class InvalidPdf(ServeError):
    """A PDF body whose text cannot be extracted: not a PDF, damaged or
    truncated, encrypted with a password, or past the extraction's deadline
    or memory limit (serve/pdf.py). `reason` (one of serve.pdf.FAILURE_REASONS)
    labels bsbr_pdf_failures_total; the message tells the client which."""

    status, code = 422, "invalid_pdf"

    def __init__(self, message: str, retry_after_s: float | None = None, reason: str = "damaged"):
        super().__init__(message, retry_after_s)
        self.reason = reason


class TooManyPdfPages(ServeError):
    """More PDF pages than `http.max_pdf_pages`, refused before any page is parsed."""

    status, code = 413, "too_many_pages"


class EmptyDocument(ServeError):
    status, code = 422, "empty_document"


class UnknownModel(ServeError):
    status, code = 404, "unknown_model"


class SessionNotFound(ServeError):
    status, code = 404, "session_not_found"


class NotFound(ServeError):
    status, code = 404, "not_found"


class MethodNotAllowed(ServeError):
    status, code = 405, "method_not_allowed"


class SeqGap(ServeError):
    status, code = 409, "seq_gap"


class SeqExpired(ServeError):
    """A repeat of a seq so old that its answer is no longer retained."""

    status, code = 409, "seq_not_retained"


class SessionIncompatible(ServeError):
    """The stored state was made by another model (e.g. replaced weights)."""

    status, code = 409, "session_incompatible"


class TooManyTokens(ServeError):
    status, code = 413, "too_many_tokens"


class BodyTooLarge(ServeError):
    status, code = 413, "body_too_large"


class TooManySessions(ServeError):
    status, code = 429, "too_many_sessions"


class StoreFull(ServeError):
    status, code = 429, "store_full"


class Overloaded(ServeError):
    status, code = 429, "overloaded"


class NotReady(ServeError):
    status, code = 503, "not_ready"


class Unavailable(ServeError):
    status, code = 503, "unavailable"


class StoreUnavailable(ServeError):
    """The session store cannot be reached (Redis down or restarting, the
    store actor gone): nothing was applied; the client retries the same seq
    after Retry-After. One-shot requests, which need no store, still work."""

    status, code = 503, "store_unavailable"


class BackendUnsupported(ServeError):
    status, code = 501, "backend_unsupported"


class InternalError(ServeError):
    """A fault of the server (a bug, the machine), never of the request: the
    model failed on input it accepted. Logged with its traceback where it
    happened; the client sees only the exception's type."""

    status, code = 500, "internal_error"


_BY_CODE: dict[str, type[ServeError]] = {
    cls.code: cls
    for cls in (
        BadRequest, InvalidJSON, InvalidEncoding, ValidationFailed, UnsupportedMediaType, InvalidPdf,
        TooManyPdfPages, EmptyDocument,
        UnknownModel, SessionNotFound, NotFound, MethodNotAllowed, SeqGap, SeqExpired,
        SessionIncompatible, TooManyTokens, BodyTooLarge, TooManySessions, StoreFull,
        Overloaded, NotReady, Unavailable, StoreUnavailable, BackendUnsupported, InternalError,
    )
}


def is_wire_error(obj: Any) -> bool:
    return isinstance(obj, dict) and "error" in obj and "status" in obj


def from_wire(obj: dict[str, Any]) -> ServeError:
    """Rebuild the typed error that `ServeError.to_wire` wrote."""
    err = obj["error"]
    cls = _BY_CODE.get(err.get("code"), ServeError)
    e = cls(err.get("message", ""), retry_after_s=obj.get("retry_after_s"))
    if cls is ServeError:
        e.status, e.code = int(obj.get("status", 400)), str(err.get("code", "error"))
    return e
