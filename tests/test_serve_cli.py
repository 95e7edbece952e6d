"""The bsbr-serve client commands against the live test application, and init-models."""
from __future__ import annotations

import json

import pytest
from conftest_serve import document

from serve.cli import main

pytest_plugins = ["conftest_serve"]


@pytest.fixture
def doc_file(tmp_path):
    p = tmp_path / "report.txt"
    p.write_text("\f".join(document(4, words_per_page=10, seed=2)) + "\f")
    return p


@pytest.mark.slow
def test_classify_command(serve_cluster, doc_file, capsys):
    assert main(["classify", str(doc_file), "--url", serve_cluster["url"]]) == 0
    out = capsys.readouterr().out
    assert "label:" in out and "pages: 4" in out
    assert main(["classify", str(doc_file), "--url", serve_cluster["url"], "--model", "standard", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "standard"
    assert main(["classify", str(doc_file), "--url", serve_cluster["url"], "--model", "nope"]) == 1
    assert "unknown_model" in capsys.readouterr().err


@pytest.mark.slow
def test_stream_command(serve_cluster, doc_file, capsys):
    assert main(["stream", str(doc_file), "--url", serve_cluster["url"], "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["seq"] for x in lines] == [0, 1, 2, 3, 3] and lines[-1]["final"] is True
    assert main(["stream", str(doc_file), "--url", serve_cluster["url"]]) == 0
    out = capsys.readouterr().out
    assert "page    4/4" in out and "final:" in out


@pytest.mark.slow
def test_compare_command(serve_cluster, tmp_path, capsys):
    docs = tmp_path / "docs"
    for label in ("networking", "process"):
        (docs / label).mkdir(parents=True)
        for i in range(2):
            (docs / label / f"{i}.txt").write_text("\f".join(document(3 + i, words_per_page=10, seed=i)))
    out_dir = tmp_path / "out"
    assert main(["compare", str(docs), "--url", serve_cluster["url"], "--out", str(out_dir)]) == 0
    table = capsys.readouterr().out
    assert "bsbr" in table and "standard" in table and "page p50 ms" in table
    report = json.loads((out_dir / "compare.json").read_text())
    for model in ("bsbr", "standard"):
        s = report["summary"][model]
        assert s["documents"] == 4 and s["labelled"] == 4 and 0 <= s["accuracy"] <= 1
        assert len(s["page_ms_median_by_index"]) == 4 and s["peak_memory_bytes_max"] > 0
    assert (out_dir / "compare.png").stat().st_size > 1000


def test_init_models_writes_untrained_models_and_never_overwrites(tmp_path, capsys):
    assert main(["init-models", "--random", "--dir", str(tmp_path), "--size", "tiny",
                 "--names", "bsbr,standard,standard-512"]) == 0
    cfg = json.loads((tmp_path / "standard-512" / "config.json").read_text())
    assert cfg["arch"] == "standard" and cfg["max_length"] == 512
    assert json.loads((tmp_path / "bsbr" / "metrics.json").read_text())["trained"] is False
    assert main(["init-models", "--random", "--dir", str(tmp_path), "--size", "tiny"]) == 2
    assert "--force" in capsys.readouterr().err


def test_up_without_models_says_how_to_make_them(tmp_path, capsys):
    assert main(["up", "--models-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "init-models --random" in err


def test_library_commands_are_mounted():
    from serve.cli import build_parser

    args = build_parser().parse_args(["data", "kernel-docs", "--out", "/tmp/x"])
    assert callable(args.func)
