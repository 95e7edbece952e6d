"""Fixtures of the PDF tests (`pytest_plugins = ["conftest_pdf"]`): Debian's
PDF manuals, downloaded once (tests/pdf_helpers.py) and checked for the
poppler tools the tests compare against; the test application's tokenizer
(with conftest_serve), to count the tokens of each page."""
from __future__ import annotations

from pathlib import Path

import pytest
from pdf_helpers import ManualsUnavailable, debian_manuals
from tool_helpers import IN_CI, require_tool


@pytest.fixture(scope="session")
def manuals() -> dict[str, Path]:
    """File name -> path of every PDF the manual packages ship."""
    require_tool("pdfinfo")
    require_tool("pdftotext")
    try:
        found = debian_manuals()
    except ManualsUnavailable as e:  # as for a missing tool: skipped here, failed under CI
        if IN_CI:
            pytest.fail(str(e), pytrace=False)
        pytest.skip(str(e))
    by_name = {p.name: p for p in found}
    assert len(by_name) == len(found) >= 10, found
    return by_name


@pytest.fixture(scope="session")
def dev_tokenizer(dev_models):
    """The tokenizer of conftest_serve's bsbr model (dev_models)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(dev_models / "bsbr" / "tokenizer.json"))


def page_tokens(tokenizer, pages: list[str]) -> list[int]:
    """Tokens of each page, as the engine tokenises pages."""
    return [len(e.ids) for e in tokenizer.encode_batch(pages, add_special_tokens=False)]
