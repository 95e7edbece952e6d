"""A small HTTP client of the API (used by the CLI, the benchmarks and the tests).

Documents are text (form feeds separate pages) or PDFs, sent as they are
(`Content-Type: application/pdf`; the server makes each PDF page a page)."""
from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx

from serve.pdf import PDF_MEDIA_TYPE, looks_like_pdf

DEFAULT_URL = "http://127.0.0.1:8000"


class ApiError(Exception):
    def __init__(self, status: int, body: Any, retry_after: str | None = None):
        err = body.get("error", {}) if isinstance(body, dict) else {}
        self.status = status
        self.code = err.get("code", "http_error")
        self.retry_after = retry_after
        super().__init__(f"HTTP {status} {self.code}: {err.get('message', body)}")


# Answers a request may be repeated after (docs/api.md, "Retries"): the server
# was busy or its store away (429, 503: nothing was applied), or a gateway
# could not reach a replica (502, 504).
RETRY_STATUSES = frozenset({429, 502, 503, 504})


class Client:
    """Requests that are safe to repeat are repeated, up to `retries` times:
    classify (it changes nothing) and a session's pages (the server applies a
    `seq` once and answers a repeat with the stored result), after a dropped
    or refused connection, an answer of RETRY_STATUSES, or a 500 that is not
    the server's own JSON error (a gateway's: HAProxy answers a request whose
    replica just died with a plain-text 500). Waits honour Retry-After (at most
    `max_wait_s`), else back off from `backoff_s`, doubling. Creating and
    deleting sessions are repeated only when the connection was refused (the
    request was never sent); the NDJSON stream never is (its body is read
    once)."""

    def __init__(self, url: str = DEFAULT_URL, timeout: float = 600.0, retries: int = 4, backoff_s: float = 0.25,
                 max_wait_s: float = 10.0):
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
        self.retries, self.backoff_s, self.max_wait_s = retries, backoff_s, max_wait_s
        self.retried = 0  # requests repeated, over this client's life

    def _request(self, method: str, path: str, repeatable: bool, **kw) -> httpx.Response:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            wait = self.backoff_s * (2 ** attempt)
            try:
                r = self.http.request(method, path, **kw)
            except httpx.ConnectError:  # never reached the server: always safe to repeat
                if last:
                    raise
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):  # dropped mid-request
                if last or not repeatable:
                    raise
            else:
                if last or not repeatable or not _worth_repeating(r):
                    return r
                wait = _retry_after(r, wait)
            self.retried += 1
            time.sleep(min(wait, self.max_wait_s))
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _json(self, r: httpx.Response) -> Any:
        try:
            body = r.json()
        except ValueError:
            body = {"error": {"code": "http_error", "message": r.text[:200]}}
        if r.status_code >= 400:
            raise ApiError(r.status_code, body, r.headers.get("retry-after"))
        return body

    def models(self) -> list[dict[str, Any]]:
        return self._json(self._request("GET", "/v1/models", True))["models"]

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def classify(self, model: str, text: str | None = None, pages: list[str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model}
        body.update({"text": text} if pages is None else {"pages": pages})
        return self._json(self._request("POST", "/v1/classify", True, json=body))

    def classify_pdf(self, model: str, pdf: bytes) -> dict[str, Any]:
        """POST /v1/classify?model= with the PDF as the body: one page per PDF page."""
        return self._json(self._request("POST", "/v1/classify", True, params={"model": model}, content=pdf,
                                        headers={"content-type": PDF_MEDIA_TYPE}))

    def create_session(self, model: str) -> dict[str, Any]:
        return self._json(self._request("POST", "/v1/sessions", False, json={"model": model}))

    def append(self, session_id: str, seq: int, text: str | None = None, pages: list[str] | None = None) -> dict:
        body: dict[str, Any] = {"seq": seq}
        body.update({"text": text} if pages is None else {"pages": pages})
        return self._json(self._request("POST", f"/v1/sessions/{session_id}/pages", True, json=body))

    def append_pdf(self, session_id: str, seq: int, pdf: bytes) -> dict[str, Any]:
        """POST /v1/sessions/{id}/pages?seq= with a PDF body: its pages are the next pages."""
        return self._json(self._request("POST", f"/v1/sessions/{session_id}/pages", True, params={"seq": seq},
                                        content=pdf, headers={"content-type": PDF_MEDIA_TYPE}))

    def session(self, session_id: str) -> dict[str, Any]:
        return self._json(self._request("GET", f"/v1/sessions/{session_id}", True))

    def delete(self, session_id: str) -> dict[str, Any]:
        return self._json(self._request("DELETE", f"/v1/sessions/{session_id}", False))

    def stream(self, model: str, pages: Iterable[str]) -> Iterator[dict[str, Any]]:
        """POST /v1/classify/stream: pages go up as NDJSON (chunked), results come back per line."""

        def body():
            for p in pages:
                yield (json.dumps({"text": p}) + "\n").encode()

        with self.http.stream("POST", "/v1/classify/stream", params={"model": model}, content=body(),
                              headers={"content-type": "application/x-ndjson"}) as r:
            if r.status_code >= 400:
                r.read()
                self._json(r)
            for line in r.iter_lines():
                if line.strip():
                    obj = json.loads(line)
                    if "error" in obj:
                        raise ApiError(200, obj)
                    yield obj


def _worth_repeating(r: httpx.Response) -> bool:
    if r.status_code in RETRY_STATUSES:
        return True
    if r.status_code != 500:
        return False
    try:  # the server's own 500 (a model that failed on the input) would fail again
        body = r.json()
    except ValueError:
        return True
    return not (isinstance(body, dict) and isinstance(body.get("error"), dict))


def _retry_after(r: httpx.Response, default: float) -> float:
    try:
        return max(0.0, float(r.headers.get("retry-after", "")))
    except ValueError:
        return default


def read_input(path: str | Path) -> str | bytes:
    """A document file as the client sends it: a PDF's bytes (by its header,
    whatever the file's name), else its text (UTF-8; undecodable bytes become
    U+FFFD; form feeds kept)."""
    data = Path(path).read_bytes()
    return data if looks_like_pdf(data) else data.decode("utf-8", errors="replace")


def client_pages(text: str, page_chars: int = 4000) -> list[str]:
    """Pages for streaming: form-feed pages if any, else cuts of about
    page_chars characters at line ends (the server cuts tokens only within a request)."""
    if "\f" in text:
        parts = text.split("\f")
        if parts and parts[-1] == "":
            parts.pop()
        return [p for p in parts if p.strip()] or [text]
    pages, start = [], 0
    while start < len(text):
        end = min(len(text), start + page_chars)
        if end < len(text):
            nl = text.rfind("\n", start + page_chars // 2, end)
            end = nl + 1 if nl != -1 else end
        pages.append(text[start:end])
        start = end
    return [p for p in pages if p.strip()] or [text]


_WS = re.compile(r"\s+")


def excerpt(text: str, n: int = 60) -> str:
    t = _WS.sub(" ", text).strip()
    return t if len(t) <= n else t[: n - 1] + "…"
