"""Pages and tokens: what a client sends, cut the way docs/architecture.md 3.1 defines.

A page is an element of `pages`, a part of `text` between form feeds, or a
run of `page_tokens` tokens of text without form feeds. Tokenisation uses
no special tokens, so the tokens of a document are the concatenation of the
tokens of its pages whatever way the client cut it into requests.
"""
from __future__ import annotations

from collections.abc import Sequence

from bsbr_core.tokenizer import encode, encode_batch
from serve.errors import EmptyDocument, InvalidEncoding

FORM_FEED = "\f"


def check_unicode(text: str) -> None:
    """Reject lone surrogates (JSON can carry "\\ud800"; UTF-8 cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidEncoding(f"text is not valid Unicode: {e.reason} at character {e.start}") from None


def text_pages(text: str) -> list[str] | None:
    """The form-feed pages of `text`, or None when it has no form feed.

    pdftotext ends every page with a form feed, so one trailing empty page
    is dropped; blank pages inside the document are kept (they count)."""
    if FORM_FEED not in text:
        return None
    parts = text.split(FORM_FEED)
    if parts and parts[-1] == "":
        parts.pop()
    return parts


def tokenize_document(
    tokenizer, text: str | None, pages: Sequence[str] | None, page_tokens: int
) -> list[list[int]]:
    """Token ids per page. Raises EmptyDocument for a document with no
    non-whitespace character, InvalidEncoding for text that is not Unicode."""
    if text is not None:
        check_unicode(text)
        if not text.strip():
            raise EmptyDocument("the document is empty (or only whitespace)")
        cut = text_pages(text)
        if cut is None:
            # In pieces through encode_batch (the same ids as one encode): it runs on every
            # core and lets go of the GIL, where one encode() of a long text holds it.
            ids = encode(tokenizer, text)
            return [ids[i : i + page_tokens] for i in range(0, len(ids), page_tokens)]
        pages = cut
    assert pages is not None
    for p in pages:
        check_unicode(p)
    if not any(p.strip() for p in pages):
        raise EmptyDocument("every page is empty (or only whitespace)")
    return [enc.ids for enc in encode_batch(tokenizer, pages)]


def tokenize_page(tokenizer, text: str) -> list[int]:
    """One streamed page (an NDJSON line); may be blank, unlike a document."""
    check_unicode(text)
    return encode_batch(tokenizer, [text])[0].ids
