"""bsbr-serve with PDFs against the shared test application: classify sends
the PDF, stream sends it page by page (one session request per PDF page),
compare reads the PDFs in a directory."""
from __future__ import annotations

import json

import pytest
from conftest_pdf import page_tokens
from conftest_serve import document
from pdf_helpers import pdfinfo_pages, pdftotext_pages

from serve.cli import main
from serve.pdf import extract_pages

pytest_plugins = ["conftest_serve", "conftest_pdf"]
pytestmark = pytest.mark.slow


def test_classify_command_sends_a_pdf(serve_cluster, manuals, capsys):
    assert main(["classify", str(manuals["cnfsat.pdf"]), "--url", serve_cluster["url"]]) == 0
    assert "pages: 6" in capsys.readouterr().out
    assert main(["classify", str(manuals["pixel.pdf"]), "--url", serve_cluster["url"]]) == 1
    assert "empty_document" in capsys.readouterr().err


def test_stream_command_sends_a_pdf_page_by_page(serve_cluster, manuals, dev_tokenizer, capsys):
    """One session request per PDF page: the tokens each page added are its text's
    tokens, and a page with words for pdftotext added some."""
    path = manuals["asy-latex.pdf"]
    assert main(["stream", str(path), "--url", serve_cluster["url"], "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    n = pdfinfo_pages(path)
    assert [x["seq"] for x in lines[:-1]] == list(range(n)) and lines[-1]["final"] is True
    assert [x["num_pages"] for x in lines[:-1]] == list(range(1, n + 1))
    added = [b["num_tokens"] - a["num_tokens"] for a, b in zip([{"num_tokens": 0}] + lines[:-2], lines[:-1])]
    assert added == page_tokens(dev_tokenizer, extract_pages(path.read_bytes(), 100).pages)
    for i, text in enumerate(pdftotext_pages(path)):
        if any(c.isalpha() for c in text):
            assert added[i] > 0, f"page {i + 1}"
    assert main(["stream", str(path), "--url", serve_cluster["url"]]) == 0
    out = capsys.readouterr().out
    assert f"page {n:>4}/{n}" in out and "final:" in out


def test_compare_command_reads_pdfs_in_a_directory(serve_cluster, manuals, tmp_path, capsys):
    docs = tmp_path / "docs"
    (docs / "glpk").mkdir(parents=True)
    (docs / "asymptote").mkdir()
    (docs / "glpk" / "cnfsat.pdf").write_bytes(manuals["cnfsat.pdf"].read_bytes())
    (docs / "asymptote" / "CAD.pdf").write_bytes(manuals["CAD.pdf"].read_bytes())
    (docs / "asymptote" / "notes.txt").write_text("\f".join(document(2, seed=4)))
    out_dir = tmp_path / "out"
    assert main(["compare", str(docs), "--url", serve_cluster["url"], "--out", str(out_dir),
                 "--models", "bsbr"]) == 0
    report = json.loads((out_dir / "compare.json").read_text())
    rows = {row["id"]: row for row in report["results"]["bsbr"]}
    assert rows["glpk/cnfsat.pdf"]["num_pages"] == 6 and rows["asymptote/CAD.pdf"]["num_pages"] == 7
    assert rows["asymptote/notes.txt"]["num_pages"] == 2 and report["summary"]["bsbr"]["labelled"] == 3
