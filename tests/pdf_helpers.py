"""PDFs for the tests: ones built here (error cases, hostile documents) and
the PDF manuals Debian documentation packages ship (nobody here wrote them).

The builders write PDF syntax by hand (ISO 32000-1: objects, a classic
cross-reference table, a trailer), so each case is exactly what it says.
The manuals come from `apt-get download` + `dpkg -x`, cached under
data/pdf-manuals/ (gitignored) so that a rerun downloads nothing; bench/pdf.py
reads the same files (this module imports nothing of pytest's for that).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANUALS_DIR = ROOT / "data" / "pdf-manuals"
# Debian packages of PDF manuals: LaTeX via pdfTeX (gnuplot, asymptote) and
# via dvipdfmx (glpk), and one Ghostscript image-only PDF (asymptote's
# examples/pixel.pdf: a page with no text).
MANUAL_PACKAGES = ("gnuplot-doc", "glpk-doc", "asymptote-doc")

HELVETICA = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"


def write_pdf(objects: list[bytes], trailer_extra: bytes = b"") -> bytes:
    """A PDF of `objects` (object i + 1 is objects[i]; object 1 the catalog)."""
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R %s>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, trailer_extra, xref)
    return bytes(out)


def stream(data: bytes, dictionary: bytes = b"", flate: bool = False) -> bytes:
    if flate:
        data = zlib.compress(data, 9)
        dictionary += b" /Filter /FlateDecode"
    return b"<< /Length %d %s >>\nstream\n" % (len(data), dictionary) + data + b"\nendstream"


def _literal(line: str) -> bytes:
    raw = line.encode("cp1252", errors="replace")
    return b"(" + raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b")"


def text_pdf(pages: list[str]) -> bytes:
    """One PDF page per string, its lines set in Helvetica ("" is a page without text)."""
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages))).encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, len(pages)), HELVETICA]
    for i, text in enumerate(pages):
        ops = b"".join(_literal(line) + b" Tj T*\n" for line in text.split("\n")) if text else b""
        content = b"BT /F1 11 Tf 14 TL 72 720 Td\n" + ops + b"ET\n" if text else b""
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                       b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % (5 + 2 * i))
        objects.append(stream(content))
    return write_pdf(objects)


def _one_page(content: bytes, resources: bytes, more: list[bytes]) -> bytes:
    return write_pdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [4 0 R] /Count 1 >>",
                      HELVETICA, b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources %s "
                                 b"/Contents 5 0 R >>" % resources, content, *more])


def slow_pdf(draws: int = 100_000, ops: int = 2_000_000) -> bytes:
    """A few KB that take PDFium hours and little memory: one page draws a form
    XObject `draws` times, and the form holds `ops` no-op operators (q Q). PDFium
    parses a form's content at every draw (~15 M operators/s on one core)."""
    form = stream(b"q Q\n" * ops, b"/Type /XObject /Subtype /Form /BBox [0 0 10 10]", flate=True)
    return _one_page(stream(b"/X Do\n" * draws, flate=True), b"<< /XObject << /X 6 0 R >> >>", [form])


def memory_bomb_pdf(depth: int = 9, fan: int = 10) -> bytes:
    """About 2 KB that need fan**depth form objects in memory: each form draws the
    next one `fan` times (PDFium keeps a parsed copy per draw: > 10 GB at depth 8)."""
    forms = []
    for level in range(depth):
        me = 6 + level
        if level < depth - 1:
            forms.append(stream(b"/X Do\n" * fan, b"/Type /XObject /Subtype /Form /BBox [0 0 10 10] "
                                                  b"/Resources << /XObject << /X %d 0 R >> >>" % (me + 1)))
        else:
            forms.append(stream(b"BT /F1 1 Tf 0 0 Td (a) Tj ET\n", b"/Type /XObject /Subtype /Form "
                                b"/BBox [0 0 10 10] /Resources << /Font << /F1 3 0 R >> >>"))
    return _one_page(stream(b"/X Do\n" * fan), b"<< /XObject << /X 6 0 R >> >>", forms)


def encrypted_pdf(pages: list[str], user_password: str = "secret", owner_password: str = "owner") -> bytes:
    """text_pdf(pages) encrypted with pypdf (RC4-128: no crypto library needed).
    An empty user password makes a PDF anyone may open (owner restrictions only)."""
    import io

    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(text_pdf(pages))))
    writer.encrypt(user_password=user_password, owner_password=owner_password, algorithm="RC4-128")
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


# --- Debian's PDF manuals ------------------------------------------------------------------------


class ManualsUnavailable(RuntimeError):
    """The Debian packages could not be downloaded or unpacked."""


def _download(package: str, cache: Path) -> Path:
    cached = sorted(cache.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]
    if shutil.which("apt-get") is None:
        raise ManualsUnavailable(f"apt-get not found: the PDF manuals come from Debian's {package}")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".download-{package}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    proc = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True, check=False)
    got = sorted(tmp.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not got:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ManualsUnavailable(f"`apt-get download {package}` failed: {(proc.stderr or proc.stdout).strip()[-300:]}"
                                 " (run apt-get update as root)")
    dest = cache / got[-1].name
    got[-1].replace(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return dest


def debian_manuals(packages: tuple[str, ...] = MANUAL_PACKAGES, root: Path = MANUALS_DIR) -> list[Path]:
    """Every PDF (not symlinks) that the packages install, unpacked once under
    root; raises ManualsUnavailable."""
    found: list[Path] = []
    for package in packages:
        deb = _download(package, root / "debs")
        unpacked = root / deb.stem
        if not (unpacked / ".complete").is_file():
            shutil.rmtree(unpacked, ignore_errors=True)
            if shutil.which("dpkg") is None:
                raise ManualsUnavailable("dpkg not found: unpacking the manuals' packages needs it")
            proc = subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], capture_output=True, text=True,
                                  check=False)
            if proc.returncode != 0:
                raise ManualsUnavailable(f"`dpkg -x {deb}` failed: {proc.stderr.strip()}")
            (unpacked / ".complete").touch()
        found += sorted(p for p in unpacked.rglob("*.pdf") if p.is_file() and not p.is_symlink())
    return found


def pdfinfo_pages(path: Path) -> int:
    out = subprocess.run(["pdfinfo", str(path)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"^Pages:\s+(\d+)", out, re.MULTILINE)
    assert m, out
    return int(m.group(1))


def pdftotext_pages(path: Path) -> list[str]:
    """poppler's text of each page (pdftotext ends every page with a form feed)."""
    out = subprocess.run(["pdftotext", "-enc", "UTF-8", str(path), "-"], capture_output=True, check=True).stdout
    parts = out.decode("utf-8", errors="replace").split("\f")
    return parts[:-1] if parts and parts[-1] == "" else parts
