"""PDF documents over HTTP (docs/architecture.md 3.6) on the shared test
application: one page per PDF page, in one request and in sessions, every
page's text reaching the model, each broken or hostile PDF a JSON error with
the replica still serving, and the PDF metrics."""
from __future__ import annotations

import os
import time

import httpx
import pytest
from conftest_pdf import page_tokens
from conftest_serve import LOGIT_TOL, MAX_BODY_BYTES, MAX_PDF_PAGES, PDF_TIMEOUT_S, document
from pdf_helpers import (
    encrypted_pdf,
    memory_bomb_pdf,
    pdfinfo_pages,
    slow_pdf,
    text_pdf,
)

from serve.pdf import extract_pages

pytest_plugins = ["conftest_serve", "conftest_pdf"]
pytestmark = pytest.mark.slow

PDF = {"content-type": "application/pdf"}
# Manuals under the test app's 1 MiB body limit, from each producer (dvipdfmx, pdfTeX).
SMALL_MANUALS = ("cnfsat.pdf", "glpk.pdf", "asy-latex.pdf", "CAD.pdf")


def assert_error(r: httpx.Response, status: int, code: str, says: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"code", "message"} and err["code"] == code, err
    if says:
        assert says in err["message"], err


def test_a_pdf_is_read_page_by_pdf_page(client, manuals, dev_tokenizer):
    """Page counts as pdfinfo counts them; the tokens the model read are those of
    every page's text; the answer equals the same pages sent as JSON."""
    for name in SMALL_MANUALS:
        data = manuals[name].read_bytes()
        assert len(data) <= MAX_BODY_BYTES
        r = client.post("/v1/classify", params={"model": "bsbr"}, content=data, headers=PDF)
        assert r.status_code == 200, r.text
        body = r.json()
        pages = extract_pages(data, 10_000).pages
        assert body["num_pages"] == len(pages) == pdfinfo_pages(manuals[name]) == len(body["timing"]["per_page_ms"])
        assert body["num_tokens"] == sum(page_tokens(dev_tokenizer, pages)) > 0
        as_json = client.post("/v1/classify", json={"model": "bsbr", "pages": pages}).json()
        assert as_json["logits"] == body["logits"] and as_json["num_pages"] == body["num_pages"]
    # A page without text is a page of 0 tokens; the standard model reads PDFs too.
    r = client.post("/v1/classify", params={"model": "standard"}, content=text_pdf(["one", "", "three"]), headers=PDF)
    assert r.status_code == 200, r.text
    assert r.json()["num_pages"] == 3 and r.json()["model"] == "standard"


def test_sessions_take_pdf_pages_with_seq(client, manuals):
    sid = client.post("/v1/sessions", json={"model": "bsbr"}).json()["session_id"]
    first = manuals["cnfsat.pdf"].read_bytes()
    r0 = client.post(f"/v1/sessions/{sid}/pages", params={"seq": 0}, content=first, headers=PDF)
    assert r0.status_code == 200, r0.text
    assert r0.json()["num_pages"] == 6 and r0.json()["seq"] == 0
    again = client.post(f"/v1/sessions/{sid}/pages", params={"seq": 0}, content=first, headers=PDF)
    assert again.json() == r0.json()  # a repeated seq: the stored answer, not the pages twice
    more = text_pdf(["appendix one", "appendix two"])
    r1 = client.post(f"/v1/sessions/{sid}/pages", params={"seq": 1}, content=more, headers=PDF).json()
    r2 = client.post(f"/v1/sessions/{sid}/pages", json={"seq": 2, "text": "a JSON page"}).json()
    assert (r1["num_pages"], r2["num_pages"]) == (8, 9)
    assert_error(client.post(f"/v1/sessions/{sid}/pages", params={"seq": 5}, content=more, headers=PDF),
                 409, "seq_gap")
    assert_error(client.post(f"/v1/sessions/{sid}/pages", content=more, headers=PDF), 422, "validation_error", "seq")
    final = client.delete(f"/v1/sessions/{sid}").json()
    pages = extract_pages(first, 100).pages + ["appendix one", "appendix two", "a JSON page"]
    oneshot = client.post("/v1/classify", json={"model": "bsbr", "pages": pages}).json()
    # The same logits to round-off: the session stepped page by page, the one-shot in long segments.
    assert final["logits"] == pytest.approx(oneshot["logits"], abs=LOGIT_TOL)
    assert final["num_tokens"] == oneshot["num_tokens"]


def test_broken_and_hostile_pdfs_are_json_errors_and_the_server_keeps_serving(client, manuals):
    glpk = manuals["glpk.pdf"].read_bytes()
    gnuplot = manuals["gnuplot.pdf"].read_bytes()
    assert len(gnuplot) > MAX_BODY_BYTES

    def classify(body: bytes, headers=PDF, model: str | None = "bsbr") -> httpx.Response:
        return client.post("/v1/classify", params={"model": model} if model else None, content=body, headers=headers)

    cases = [
        (classify(gnuplot), 413, "body_too_large", None),
        (classify(os.urandom(20_000)), 422, "invalid_pdf", "not a PDF"),
        (classify(b'{"model": "bsbr", "text": "json, not a PDF"}'), 422, "invalid_pdf", "not a PDF"),
        (classify(glpk[: len(glpk) // 2]), 422, "invalid_pdf", "truncated"),
        (classify(glpk[:30] + bytes(len(glpk) - 30)), 422, "invalid_pdf", "damaged"),
        (classify(encrypted_pdf(["behind a password"])), 422, "invalid_pdf", "encrypted"),
        (classify(text_pdf([""] * (MAX_PDF_PAGES + 1))), 413, "too_many_pages", f"at most {MAX_PDF_PAGES}"),
        (classify(slow_pdf()), 422, "invalid_pdf", f"deadline of {PDF_TIMEOUT_S:g} s"),
        (classify(memory_bomb_pdf()), 422, "invalid_pdf", None),  # the memory limit, or the deadline first
        (classify(manuals["pixel.pdf"].read_bytes()), 422, "empty_document", None),  # an image, no text
        (classify(glpk, headers={"content-type": "text/plain"}), 415, "unsupported_media_type", "application/pdf"),
        (classify(glpk, model=None), 422, "validation_error", "?model="),
        (classify(glpk, model="no-such-model"), 404, "unknown_model", None),
        (client.post("/v1/classify", params={"model": "bsbr"}, json={"model": "bsbr", "text": "x"}),
         422, "validation_error", "only for PDF bodies"),
        (client.post(f"/v1/sessions/{'0' * 32}/pages", params={"seq": 0}, content=glpk, headers=PDF),
         404, "session_not_found", None),
        (client.post("/v1/classify/stream", params={"model": "bsbr"}, content=glpk, headers=PDF),
         415, "unsupported_media_type", "NDJSON"),
    ]
    for r, status, code, says in cases:
        assert_error(r, status, code, says)
    assert client.get("/readyz").status_code == 200
    r = classify(text_pdf(["the replica is still here"]))
    assert r.status_code == 200 and r.json()["num_pages"] == 1
    assert client.post("/v1/classify", json={"model": "bsbr", "pages": document(2)}).status_code == 200


def test_pdf_extraction_metrics(client, serve_cluster):
    """Pages extracted, per-page extraction latency and failures by reason, in
    Ray's export (the errors test above made every kind of failure)."""
    assert client.post("/v1/classify", params={"model": "bsbr"}, content=text_pdf(["a", "b"]), headers=PDF)\
        .status_code == 200
    assert client.post("/v1/classify", params={"model": "bsbr"}, content=b"nope", headers=PDF).status_code == 422
    url = f"http://127.0.0.1:{serve_cluster['metrics_port']}/metrics"
    wanted = ("ray_bsbr_pdf_pages_total", "ray_bsbr_pdf_page_extract_seconds_bucket",
              'ray_bsbr_pdf_failures_total{', 'reason="not_pdf"')
    deadline, text = time.time() + 90, ""
    while time.time() < deadline:
        text = httpx.get(url, timeout=10).text
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    missing = [w for w in wanted if w not in text]
    assert not missing, missing
    pages = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("ray_bsbr_pdf_pages_total")]
    assert sum(pages) >= 3
