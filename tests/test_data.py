"""Kernel-docs corpus builder, against a small .deb built here (no network)."""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bsbr_core import cli
from bsbr_core.data import (
    SPLITS,
    DataError,
    Document,
    PackageFetchError,
    PackageFormatError,
    build_kernel_docs,
    load_meta,
    load_split,
    split_of,
)

REPO = Path(__file__).resolve().parents[1]
MIN_DOCS = 5
# Folder -> documents written as <folder>/doc<i>.rst.gz. With MIN_DOCS = 5:
# alpha and beta are classes (beta exactly at the threshold once its plain
# .txt is counted), gamma is too small, the last three are excluded by name.
FOLDER_DOCS = {"alpha": 12, "beta": 4, "gamma": 4, "translations": 8, "devicetree": 8, "features": 6}
WORDS = {
    "alpha": "scheduler runqueue preempt tick latency cgroup",
    "beta": "netdev socket packet queue offload checksum",
    "gamma": "sound codec pcm mixer jack",
}


def _doc_text(folder: str, i: int) -> str:
    rng = random.Random(f"{folder}/{i}")
    words = WORDS.get(folder, "translated text of some document").split()
    lines = [f"{folder} document {i}", "=" * 20, ""]
    lines += [" ".join(rng.choice(words) for _ in range(12)) for _ in range(rng.randint(3, 8))]
    return "\n".join(lines) + "\n"


def _write_gz(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0))


def make_fixture_deb(dest: Path, version: str = "6.1.1-1", extra_alpha: int = 0) -> Path:
    """A linux-doc-6.1 .deb laid out like Debian's, with awkward members."""
    root = dest.parent / f"pkgroot-{version}-{extra_alpha}"
    docs = root / "usr/share/doc/linux-doc-6.1/Documentation"
    for folder, n in FOLDER_DOCS.items():
        for i in range(n + (extra_alpha if folder == "alpha" else 0)):
            _write_gz(docs / folder / f"doc{i}.rst.gz", _doc_text(folder, i).encode())
    _write_gz(docs / "alpha/sub/deep.txt.gz", _doc_text("alpha", 100).encode())  # nested: still alpha
    # Invalid UTF-8 must not stop the build.
    _write_gz(docs / "alpha/latin1.rst.gz", "caf\xe9 ".encode("latin-1") + _doc_text("alpha", 101).encode())
    _write_gz(docs / "alpha/empty.rst.gz", b"  \n\n")  # empty: skipped
    _write_gz(docs / "alpha/figure.svg.gz", b"<svg/>")  # not a document
    (docs / "beta/plain.txt").write_text(_doc_text("beta", 99))  # not gzipped: still a document
    (docs / "beta/link.rst.gz").symlink_to("../alpha/doc0.rst.gz")  # symlink: skipped
    _write_gz(docs / "index.rst.gz", b"top-level index, in no folder\n")  # no folder: skipped
    (root / "DEBIAN").mkdir(parents=True, exist_ok=True)
    (root / "DEBIAN/control").write_text(
        "Package: linux-doc-6.1\n"
        f"Version: {version}\n"
        "Architecture: all\n"
        "Maintainer: Test <test@example.org>\n"
        "Description: fixture of the Linux kernel documentation\n"
    )
    deb = dest / f"linux-doc-6.1_{version}_all.deb"
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True, capture_output=True)
    return deb


@pytest.fixture(scope="module")
def fixture_deb(tmp_path_factory) -> Path:
    return make_fixture_deb(tmp_path_factory.mktemp("deb"))


def _fake_apt_get(bin_dir: Path, script: str) -> Path:
    """Put an `apt-get` running ``script`` (bash) first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "apt-get"
    exe.write_text("#!/bin/bash\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def _tree_state(d: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.iterdir()) if p.is_file()}


def test_build_labels_filters_and_writes_splits(fixture_deb, tmp_path):
    out = tmp_path / "kd"
    meta = build_kernel_docs(out, deb_path=fixture_deb, min_docs=MIN_DOCS, progress=False)

    assert meta["labels"] == ["alpha", "beta"]
    assert meta["version"] == "6.1.1-1" and meta["package"] == "linux-doc-6.1"
    assert meta["dropped_folders"] == {"devicetree": 8, "features": 6, "gamma": 4, "translations": 8}
    assert meta["skipped_files"] == {"empty": 1, "symlink_or_not_a_file": 1}

    docs = {s: load_split(out, s) for s in SPLITS}
    every = [d for s in SPLITS for d in docs[s]]
    paths = [d.path for d in every]
    assert len(paths) == len(set(paths))
    by_label = Counter(d.label for d in every)
    assert by_label == {"alpha": 12 + 2, "beta": 5}  # + deep.txt, latin1.rst; + plain.txt
    assert "alpha/sub/deep.txt" in paths and "beta/plain.txt" in paths
    assert not any(p.endswith(".gz") or "link" in p or "empty" in p for p in paths)
    for s in SPLITS:
        assert all(isinstance(d, Document) and split_of(d.path) == s for d in docs[s])
        assert all(d.label == d.path.split("/")[0] for d in docs[s])
        assert [d.path for d in docs[s]] == sorted(d.path for d in docs[s])
        assert meta["counts"][s]["total"] == len(docs[s])
        assert meta["counts"][s]["per_label"] == {lab: sum(d.label == lab for d in docs[s]) for lab in meta["labels"]}

    text = {d.path: d.text for d in every}
    assert text["alpha/doc3.rst"] == _doc_text("alpha", 3)
    assert text["alpha/latin1.rst"].startswith("caf\ufffd ")

    test = docs["test"]
    if test:
        top = Counter(d.label for d in test).most_common(1)[0]
        assert meta["test_majority"]["rate"] == pytest.approx(top[1] / len(test))
    for name, rec in meta["files"].items():
        assert rec["bytes"] == (out / name).stat().st_size
    assert load_meta(out) == meta


def test_split_is_a_hash_of_the_path_with_80_10_10_fractions():
    paths = [f"folder{i % 17}/document-{i}.rst" for i in range(20000)]
    counts = Counter(split_of(p) for p in paths)
    assert counts["train"] / len(paths) == pytest.approx(0.8, abs=0.015)
    assert counts["validation"] / len(paths) == pytest.approx(0.1, abs=0.01)
    assert counts["test"] / len(paths) == pytest.approx(0.1, abs=0.01)
    # Pinned: changing the rule would move documents between splits and leak
    # test documents into the training of models evaluated on the old split.
    assert split_of("admin-guide/index.rst") == "train"  # bucket 79
    assert split_of("trace/index.rst") == "validation"  # bucket 87
    assert split_of("virt/index.rst") == "test"  # bucket 90


def test_rebuild_is_deterministic_and_documents_keep_their_split(fixture_deb, tmp_path):
    a = build_kernel_docs(tmp_path / "a", deb_path=fixture_deb, min_docs=MIN_DOCS, progress=False)
    b = build_kernel_docs(tmp_path / "b", deb_path=fixture_deb, min_docs=MIN_DOCS, progress=False)
    assert a["files"] == b["files"]  # byte-identical outputs

    # A newer package with more documents: old documents stay in their split.
    newer = make_fixture_deb(tmp_path / "newer", version="6.1.2-1", extra_alpha=30)
    c = build_kernel_docs(tmp_path / "c", deb_path=newer, min_docs=MIN_DOCS, progress=False)
    assert c["version"] == "6.1.2-1"
    old = {s: {d.path for d in load_split(tmp_path / "a", s)} for s in SPLITS}
    new = {s: {d.path for d in load_split(tmp_path / "c", s)} for s in SPLITS}
    for s in SPLITS:
        assert old[s] <= new[s]
    assert sum(len(v) for v in new.values()) == sum(len(v) for v in old.values()) + 30


def test_second_build_does_nothing_and_force_rebuilds(fixture_deb, tmp_path):
    out = tmp_path / "kd"
    first = build_kernel_docs(out, deb_path=fixture_deb, min_docs=MIN_DOCS, progress=False)
    before = _tree_state(out)
    assert build_kernel_docs(out, deb_path=fixture_deb, min_docs=MIN_DOCS, progress=False) == first
    assert _tree_state(out) == before  # not even rewritten

    forced = build_kernel_docs(out, deb_path=fixture_deb, min_docs=MIN_DOCS, force=True, progress=False)
    after = _tree_state(out)
    assert forced == first
    assert {k: v[1] for k, v in after.items()} == {k: v[1] for k, v in before.items()}
    assert after["meta.json"][0] != before["meta.json"][0]  # rewritten


def test_changed_inputs_or_damaged_files_trigger_a_rebuild(fixture_deb, tmp_path):
    out = tmp_path / "kd"
    build_kernel_docs(out, deb_path=fixture_deb, min_docs=MIN_DOCS, progress=False)

    # Other parameters: gamma (4 documents) becomes a class.
    meta = build_kernel_docs(out, deb_path=fixture_deb, min_docs=4, progress=False)
    assert meta["labels"] == ["alpha", "beta", "gamma"]
    assert load_meta(out)["min_docs"] == 4

    # A damaged split is detected through its sha256 and rewritten.
    train_file = out / "train.jsonl"
    good = train_file.read_bytes()
    train_file.write_bytes(good[:-10])
    build_kernel_docs(out, deb_path=fixture_deb, min_docs=4, progress=False)
    assert train_file.read_bytes() == good


def test_apt_get_download_is_used_and_cached(fixture_deb, tmp_path, monkeypatch):
    calls = tmp_path / "apt-calls"
    _fake_apt_get(
        tmp_path / "bin",
        f'echo "$@" >> "{calls}"\n'
        f'[ "$1 $2" = "download linux-doc-6.1" ] || exit 1\n'
        f'cp "{fixture_deb}" .\n',
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "kd"

    meta = build_kernel_docs(out, min_docs=MIN_DOCS, progress=False)
    assert calls.read_text().splitlines() == ["download linux-doc-6.1"]
    assert meta["deb_file"] == fixture_deb.name
    assert (out / "download" / fixture_deb.name).read_bytes() == fixture_deb.read_bytes()

    build_kernel_docs(out, min_docs=MIN_DOCS, progress=False)  # idempotent: no download
    assert len(calls.read_text().splitlines()) == 1

    (out / "meta.json").unlink()  # unfinished build: the cached .deb is reused
    build_kernel_docs(out, min_docs=MIN_DOCS, progress=False)
    assert len(calls.read_text().splitlines()) == 1

    build_kernel_docs(out, min_docs=MIN_DOCS, force=True, progress=False)  # force downloads again
    assert len(calls.read_text().splitlines()) == 2
    assert sorted(p.name for p in (out / "download").iterdir()) == [fixture_deb.name]


def test_failing_apt_get_raises_a_clear_error_and_keeps_the_old_build(fixture_deb, tmp_path, monkeypatch):
    out = tmp_path / "kd"
    built = build_kernel_docs(out, deb_path=fixture_deb, min_docs=MIN_DOCS, progress=False)
    _fake_apt_get(tmp_path / "bin", 'echo "E: Unable to locate package linux-doc-6.1" >&2\nexit 100\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")

    with pytest.raises(PackageFetchError) as err:
        build_kernel_docs(out, min_docs=MIN_DOCS, force=True, progress=False)
    msg = str(err.value)
    assert "exit 100" in msg and "Unable to locate package" in msg
    assert "apt-get update" in msg and "--deb" in msg
    assert load_meta(out) == built  # a failed fetch leaves the previous build usable

    with pytest.raises(PackageFetchError):
        build_kernel_docs(tmp_path / "fresh", min_docs=MIN_DOCS, progress=False)


def test_missing_apt_get_raises_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(PackageFetchError, match="apt-get not found.*--deb"):
        build_kernel_docs(tmp_path / "kd", progress=False)


def test_missing_or_broken_deb_raises_a_clear_error(tmp_path):
    with pytest.raises(PackageFormatError, match="does not exist"):
        build_kernel_docs(tmp_path / "kd", deb_path=tmp_path / "nope.deb", progress=False)
    broken = tmp_path / "broken.deb"
    broken.write_bytes(b"not an archive")
    with pytest.raises(PackageFormatError, match="not a readable .deb"):
        build_kernel_docs(tmp_path / "kd", deb_path=broken, progress=False)
    assert not (tmp_path / "kd" / "meta.json").exists()


def test_too_high_min_docs_is_a_data_error(fixture_deb, tmp_path):
    with pytest.raises(DataError, match="lower --min-docs"):
        build_kernel_docs(tmp_path / "kd", deb_path=fixture_deb, min_docs=1000, progress=False)


def test_load_split_errors(tmp_path):
    with pytest.raises(DataError, match="data kernel-docs"):
        load_split(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown split"):
        load_split(tmp_path, "dev")


def test_default_dir_follows_bsbr_data_dir(tmp_path, monkeypatch, fixture_deb):
    monkeypatch.setenv("BSBR_DATA_DIR", str(tmp_path / "root"))
    build_kernel_docs(deb_path=fixture_deb, min_docs=MIN_DOCS, progress=False)
    assert (tmp_path / "root/kernel-docs/meta.json").is_file()
    assert len(load_split(None, "train")) == load_meta()["counts"]["train"]["total"]


def test_cli_builds_and_reports(fixture_deb, tmp_path, capsys):
    out = tmp_path / "kd"
    argv = ["data", "kernel-docs", "--out", str(out), "--deb", str(fixture_deb), "--min-docs", str(MIN_DOCS)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "linux-doc-6.1 6.1.1-1" in printed and "2 classes" in printed
    assert load_meta(out)["labels"] == ["alpha", "beta"]


def test_cli_reports_fetch_errors_as_one_line(tmp_path, monkeypatch, capsys):
    _fake_apt_get(tmp_path / "bin", "exit 100\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert cli.main(["data", "kernel-docs", "--out", str(tmp_path / "kd")]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: `apt-get download linux-doc-6.1` failed (exit 100)")
    assert "Traceback" not in err


def test_subcommands_mount_under_another_program(fixture_deb, tmp_path):
    """How serve/cli.py uses it: its own parser, our subcommands."""
    parser = argparse.ArgumentParser(prog="bsbr-serve")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up")
    cli.add_subcommands(sub)
    args = parser.parse_args(["data", "kernel-docs", "--out", str(tmp_path), "--deb", str(fixture_deb), "--min-docs", "5"])
    assert args.func(args) == 0
    args = parser.parse_args(["tokenizer", "train", "--data", str(tmp_path), "--vocab-size", "300", "--no-stats"])
    assert args.func(args) == 0
    assert (tmp_path / "tokenizer.json").is_file()


def test_python_dash_m_entry_point(fixture_deb, tmp_path):
    out = tmp_path / "kd"
    proc = subprocess.run(
        [sys.executable, "-m", "bsbr_core.cli", "data", "kernel-docs", "--out", str(out), "--deb", str(fixture_deb),
         "--min-docs", str(MIN_DOCS)],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "meta.json").read_text())["labels"] == ["alpha", "beta"]


def test_core_never_imports_ray_or_serve():
    code = "import sys, bsbr_core.cli, bsbr_core.data, bsbr_core.tokenizer; " \
           "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'serve')))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
