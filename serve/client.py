"""A small HTTP client of the API (used by the CLI, the benchmarks and the tests).

Documents are text (form feeds separate pages) or PDFs, sent as they are
(`Content-Type: application/pdf`; the server makes each PDF page a page)."""
from __future__ import annotations

import json
import re
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


class Client:
    def __init__(self, url: str = DEFAULT_URL, timeout: float = 600.0):
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)

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
        return self._json(self.http.get("/v1/models"))["models"]

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def classify(self, model: str, text: str | None = None, pages: list[str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model}
        body.update({"text": text} if pages is None else {"pages": pages})
        return self._json(self.http.post("/v1/classify", json=body))

    def classify_pdf(self, model: str, pdf: bytes) -> dict[str, Any]:
        """POST /v1/classify?model= with the PDF as the body: one page per PDF page."""
        return self._json(self.http.post("/v1/classify", params={"model": model}, content=pdf,
                                         headers={"content-type": PDF_MEDIA_TYPE}))

    def create_session(self, model: str) -> dict[str, Any]:
        return self._json(self.http.post("/v1/sessions", json={"model": model}))

    def append(self, session_id: str, seq: int, text: str | None = None, pages: list[str] | None = None) -> dict:
        body: dict[str, Any] = {"seq": seq}
        body.update({"text": text} if pages is None else {"pages": pages})
        return self._json(self.http.post(f"/v1/sessions/{session_id}/pages", json=body))

    def append_pdf(self, session_id: str, seq: int, pdf: bytes) -> dict[str, Any]:
        """POST /v1/sessions/{id}/pages?seq= with a PDF body: its pages are the next pages."""
        return self._json(self.http.post(f"/v1/sessions/{session_id}/pages", params={"seq": seq}, content=pdf,
                                         headers={"content-type": PDF_MEDIA_TYPE}))

    def session(self, session_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/sessions/{session_id}"))

    def delete(self, session_id: str) -> dict[str, Any]:
        return self._json(self.http.delete(f"/v1/sessions/{session_id}"))

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
