"""Corpus builders: the Linux kernel documentation as a long-document
classification task.

Task: given the text of a document under the kernel's ``Documentation/``,
predict its top-level folder (``admin-guide``, ``networking``, ...). The
documents come from Debian's ``linux-doc-6.1`` package, which ships them
gzipped under ``usr/share/doc/linux-doc-6.1/Documentation/``.

Nothing of the corpus is committed. :func:`build_kernel_docs` fetches the
package with ``apt-get download`` (or takes a local ``.deb``), unpacks it with
``dpkg -x`` and writes, under ``out_dir``::

    train.jsonl, validation.jsonl, test.jsonl   one {"path", "label", "text"} a line
    meta.json                                   package version, labels, counts,
                                                sha256 of each file
    download/<package>_<version>_all.deb        the cached package

``path`` is relative to ``Documentation/`` without the ``.gz`` suffix
(``networking/ip-sysctl.rst``). Its first component *is* the label, so models
must read ``text`` only. The split is a pure function of ``path``
(:func:`split_of`), so a document keeps its split across rebuilds and
package versions.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm

PACKAGE = "linux-doc-6.1"
# Folders that are not a topic of their own: translations repeat other
# folders' documents in other languages, devicetree is ~1900 near-identical
# binding descriptions that would swamp every other class, features is
# generated per-architecture support tables.
EXCLUDED_FOLDERS = ("translations", "devicetree", "features")
DOC_SUFFIXES = (".rst", ".txt")
SPLITS = ("train", "validation", "test")
# sha256(path) mod 100 falls in [lo, hi) for each split: 80/10/10.
SPLIT_BUCKETS = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}
META_FILE = "meta.json"
META_FORMAT = 1


class DataError(RuntimeError):
    """A corpus cannot be built or loaded; the message says what to do."""


class PackageFetchError(DataError):
    """apt-get is missing or cannot download the package."""


class PackageFormatError(DataError):
    """The .deb is missing, cannot be unpacked, or holds no documentation."""


@dataclass(frozen=True)
class Document:
    path: str  # relative to Documentation/, e.g. "networking/ip-sysctl.rst"
    label: str  # top-level folder, one of meta.json's "labels"
    text: str


def default_data_root() -> Path:
    """Where datasets live: ``$BSBR_DATA_DIR`` if set, else ``data/`` at the
    root of the source checkout (or of the working directory when the
    package is installed outside a checkout)."""
    env = os.environ.get("BSBR_DATA_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file():
        return repo / "data"
    return Path.cwd() / "data"


def default_kernel_docs_dir() -> Path:
    return default_data_root() / "kernel-docs"


def split_of(path: str) -> str:
    """The split a document belongs to: a pure function of its relative path."""
    bucket = int.from_bytes(hashlib.sha256(path.encode("utf-8")).digest()[:8], "big") % 100
    for split, (lo, hi) in SPLIT_BUCKETS.items():
        if lo <= bucket < hi:
            return split
    raise AssertionError(f"bucket {bucket} outside SPLIT_BUCKETS")


def build_kernel_docs(
    out_dir: str | os.PathLike | None = None,
    deb_path: str | os.PathLike | None = None,
    min_docs: int = 40,
    force: bool = False,
    package: str = PACKAGE,
    excluded: Iterable[str] = EXCLUDED_FOLDERS,
    progress: bool = True,
) -> dict[str, Any]:
    """Build (or reuse) the kernel-docs corpus and return its meta.json content.

    out_dir: defaults to :func:`default_kernel_docs_dir`.
    deb_path: a local ``.deb`` to use instead of ``apt-get download``.
    min_docs: a top-level folder becomes a class when it holds at least this
        many documents (counted over all splits).
    force: rebuild even when ``out_dir`` already holds a matching build (and
        download the package again when no ``deb_path`` is given).

    Idempotent: when meta.json exists, was built with the same parameters
    (and the same .deb, when one is given) and every file still has the
    recorded sha256, nothing is fetched or written.
    """
    out = Path(out_dir) if out_dir is not None else default_kernel_docs_dir()
    if min_docs < 1:
        raise ValueError(f"min_docs must be >= 1, got {min_docs}")
    excluded = sorted(set(excluded))
    deb = Path(deb_path) if deb_path is not None else None
    if deb is not None and not deb.is_file():
        raise PackageFormatError(f"{deb} does not exist or is not a file; pass the path of a {package} .deb")
    params = {"package": package, "min_docs": min_docs, "excluded": excluded}
    deb_sha = _sha256_file(deb) if deb is not None else None

    if not force:
        meta = _reusable_meta(out, params, deb_sha)
        if meta is not None:
            return meta

    out.mkdir(parents=True, exist_ok=True)
    if deb is None:
        deb = _fetch_deb(package, out / "download", refetch=force)
        deb_sha = _sha256_file(deb)
    version = _deb_field(deb, "Version")
    # meta.json marks a finished build: drop it before touching the splits so
    # that an interrupted rebuild is never mistaken for a complete one.
    (out / META_FILE).unlink(missing_ok=True)

    with tempfile.TemporaryDirectory(prefix="bsbr-kernel-docs-") as tmp:
        _unpack_deb(deb, Path(tmp))
        doc_root = _find_documentation_root(Path(tmp), package)
        docs, skipped = _read_documents(doc_root, progress)

    folder_counts = Counter(path.split("/", 1)[0] for path in docs)
    labels = sorted(f for f, n in folder_counts.items() if n >= min_docs and f not in excluded)
    if not labels:
        raise DataError(
            f"no folder of {deb.name} holds {min_docs} documents outside {excluded}; lower --min-docs"
        )
    label_set = set(labels)
    by_split: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for path in sorted(docs):
        label = path.split("/", 1)[0]
        if label in label_set:
            by_split[split_of(path)].append(Document(path, label, docs[path]))

    files = {}
    for split in SPLITS:
        name = f"{split}.jsonl"
        _write_jsonl(out / name, by_split[split])
        files[name] = {"sha256": _sha256_file(out / name), "bytes": (out / name).stat().st_size}

    counts = {
        split: {"total": len(ds), "per_label": {lab: sum(d.label == lab for d in ds) for lab in labels}}
        for split, ds in by_split.items()
    }
    test_per_label = counts["test"]["per_label"]
    test_majority = max(labels, key=lambda lab: (test_per_label[lab], -labels.index(lab)))
    meta = {
        "format": META_FORMAT,
        "dataset": "kernel-docs",
        **params,
        "version": version,
        "deb_file": deb.name,
        "deb_sha256": deb_sha,
        "task": "predict the top-level folder of a document under Documentation/ from its text",
        "split_rule": "int(sha256(path)[:8 bytes], big-endian) % 100: [0,80) train, [80,90) validation, [90,100) test",
        "labels": labels,
        "counts": counts,
        "test_majority": {
            "label": test_majority,
            "rate": test_per_label[test_majority] / max(1, counts["test"]["total"]),
        },
        "dropped_folders": {
            f: n for f, n in sorted(folder_counts.items()) if f not in label_set
        },
        "skipped_files": skipped,
        "files": files,
    }
    tmp_meta = out / (META_FILE + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_meta, out / META_FILE)
    return meta


def load_meta(data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    path = Path(data_dir if data_dir is not None else default_kernel_docs_dir()) / META_FILE
    if not path.is_file():
        raise DataError(f"{path} not found; build the corpus first: bsbr-serve data kernel-docs --out {path.parent}")
    return json.loads(path.read_text())


def load_split(data_dir: str | os.PathLike | None, split: str) -> list[Document]:
    """The documents of one split, in path order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = Path(data_dir if data_dir is not None else default_kernel_docs_dir())
    path = root / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path} not found; build the corpus first: bsbr-serve data kernel-docs --out {root}")
    with path.open(encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f if line.strip()]


# -- building blocks -----------------------------------------------------------


def _reusable_meta(out: Path, params: dict[str, Any], deb_sha: str | None) -> dict[str, Any] | None:
    """meta.json of an existing, intact build with the same inputs, else None."""
    try:
        meta = json.loads((out / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != META_FORMAT or any(meta.get(k) != v for k, v in params.items()):
        return None
    if deb_sha is not None and meta.get("deb_sha256") != deb_sha:
        return None
    for name, rec in meta.get("files", {}).items():
        f = out / name
        if not f.is_file() or f.stat().st_size != rec["bytes"] or _sha256_file(f) != rec["sha256"]:
            return None
    return meta


def _fetch_deb(package: str, cache: Path, refetch: bool) -> Path:
    """The package's .deb in ``cache``, downloaded with apt-get unless cached."""
    cached = sorted(cache.glob(f"{package}_*.deb"))
    if cached and not refetch:
        return cached[-1]
    if shutil.which("apt-get") is None:
        raise PackageFetchError(
            f"apt-get not found: this builder downloads {package} with apt-get (Debian/Ubuntu). "
            f"Elsewhere, download {package}_*.deb from https://packages.debian.org/{package} and pass --deb PATH"
        )
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        proc = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        got = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if proc.returncode != 0 or not got:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise PackageFetchError(
                f"`apt-get download {package}` failed (exit {proc.returncode}): "
                f"{detail[-1] if detail else 'no .deb written'}. Run `apt-get update` (as root) if the package "
                f"is unknown, check network access to the Debian mirror, or pass a downloaded .deb with --deb PATH"
            )
        for old in cached:
            old.unlink()
        dest = cache / got[-1].name
        os.replace(got[-1], dest)
    return dest


def _deb_field(deb: Path, field: str) -> str:
    proc = subprocess.run(["dpkg-deb", "--field", str(deb), field], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PackageFormatError(f"{deb} is not a readable .deb ({proc.stderr.strip()}); delete it and rebuild")
    return proc.stdout.strip()


def _unpack_deb(deb: Path, dest: Path) -> None:
    if shutil.which("dpkg") is None:
        raise PackageFormatError("dpkg not found: unpacking the .deb needs dpkg (apt-get install dpkg)")
    proc = subprocess.run(["dpkg", "-x", str(deb), str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PackageFormatError(f"`dpkg -x {deb}` failed: {proc.stderr.strip()}; delete the file and rebuild")


def _find_documentation_root(root: Path, package: str) -> Path:
    expected = root / "usr/share/doc" / package / "Documentation"
    if expected.is_dir():
        return expected
    found = sorted(root.glob("usr/share/doc/*/Documentation"))
    if not found:
        raise PackageFormatError(f"the package holds no usr/share/doc/*/Documentation folder; is it {package}?")
    return found[0]


def _read_documents(doc_root: Path, progress: bool) -> tuple[dict[str, str], dict[str, int]]:
    """Every .rst/.txt document (gzipped or not) inside a top-level folder,
    keyed by its path relative to ``doc_root`` without ``.gz``.

    Symlinks are skipped (the real file is read under its own path), as are
    documents that are empty after stripping whitespace. Text is UTF-8;
    undecodable bytes become U+FFFD.
    """
    candidates = []
    for f in sorted(doc_root.rglob("*")):
        name = f.name[:-3] if f.name.endswith(".gz") else f.name
        if name.endswith(DOC_SUFFIXES) and len(f.relative_to(doc_root).parts) > 1:
            candidates.append(f)
    docs: dict[str, str] = {}
    skipped = Counter()
    for f in tqdm(candidates, desc="reading documents", unit="doc", disable=not progress):
        if f.is_symlink() or not f.is_file():
            skipped["symlink_or_not_a_file"] += 1
            continue
        raw = f.read_bytes()
        text = (gzip.decompress(raw) if f.name.endswith(".gz") else raw).decode("utf-8", errors="replace")
        if not text.strip():
            skipped["empty"] += 1
            continue
        rel = f.relative_to(doc_root).as_posix()
        docs[rel[:-3] if rel.endswith(".gz") else rel] = text
    return docs, dict(skipped)


def _write_jsonl(path: Path, docs: list[Document]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"path": d.path, "label": d.label, "text": d.text}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
