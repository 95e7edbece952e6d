"""The OpenAPI document is exact, so that a generated client or a fuzzer sends
what the server accepts: every $ref resolves inside it, errors are the one
ErrorResponse, and the request schemas carry the rules the server enforces.

Built from the ingress's FastAPI app (`app.openapi()`): no Ray is started.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from serve import schemas
from serve.api import NDJSON, STREAM_ROUTE, app


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return app.openapi()


def refs(node: Any, where: str = "#") -> Iterator[tuple[str, str]]:
    """(where, $ref) for every $ref in the document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield where, v
            else:
                yield from refs(v, f"{where}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from refs(v, f"{where}/{i}")


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} points outside the document"
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref}: no {part!r}"
        node = node[part]
    return node


def component(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return doc["components"]["schemas"][name]


def test_every_ref_resolves_inside_the_document(doc):
    found = list(refs(doc))
    assert len(found) > 20
    for where, ref in found:
        assert isinstance(resolve(doc, ref), dict), f"{where}: {ref}"
    # Inline model schemas carry their own `$defs`, which `#/$defs/...` refs
    # cannot reach from the document's root: models belong in components.
    assert '"$defs"' not in json.dumps(doc)


def test_the_stream_documents_its_lines_by_reference(doc):
    op = doc["paths"][STREAM_ROUTE]["post"]
    assert op["requestBody"]["content"] == {NDJSON: {"schema": {"$ref": "#/components/schemas/StreamLine"}}}
    ok = op["responses"]["200"]["content"]
    assert set(ok) == {NDJSON}  # no application/json placeholder beside it
    assert ok[NDJSON]["schema"] == {"anyOf": [{"$ref": "#/components/schemas/SessionResult"},
                                              {"$ref": "#/components/schemas/ErrorResponse"}]}


def test_every_error_response_is_the_error_model(doc):
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, resp in op["responses"].items():
                if status[0] in "45" or status == "default":
                    assert resp.get("content") == error, (method, path, status)
    # FastAPI's own 422 shape is never sent (the server answers ErrorResponse).
    assert "HTTPValidationError" not in doc["components"]["schemas"]


@pytest.mark.parametrize("name", ["ClassifyRequest", "PagesRequest"])
def test_document_requests_state_one_of_text_and_pages_non_empty(doc, name):
    s = component(doc, name)
    assert s["oneOf"] == [{"required": ["text"]}, {"required": ["pages"]}]
    assert s["additionalProperties"] is False
    text, pages = s["properties"]["text"], s["properties"]["pages"]
    assert text["type"] == "string" and text["minLength"] == 1 and "default" not in text
    assert pages["type"] == "array" and pages["minItems"] == 1 and pages["items"] == {"type": "string"}
    assert "default" not in pages and "text" not in s["required"] and "pages" not in s["required"]


def test_seq_and_ttl_constraints(doc):
    pages = component(doc, "PagesRequest")
    assert pages["properties"]["seq"]["type"] == "integer" and pages["properties"]["seq"]["minimum"] == 0
    assert "seq" in pages["required"]
    for seq, ok in ((0, True), (3, True), (-1, False), ("1", False), (1.5, False)):
        body = {"seq": seq, "text": "x"}
        assert jsonschema.Draft202012Validator(pages).is_valid(body) is ok, body
    ttl = component(doc, "SessionCreateRequest")["properties"]["ttl_s"]
    assert {"type": "number", "exclusiveMinimum": 0} in ttl["anyOf"]


BODIES = [  # (body, valid by the schema); the model must agree wherever the schema accepts
    ({"model": "bsbr", "text": "a page\fanother"}, True),
    ({"model": "bsbr", "pages": ["one", ""]}, True),  # a page of 0 tokens is a page
    ({"model": "bsbr"}, False),
    ({"model": "bsbr", "text": "a", "pages": ["b"]}, False),
    ({"model": "bsbr", "pages": []}, False),
    ({"model": "bsbr", "text": ""}, False),  # the server: 422 empty_document
    ({"model": "bsbr", "text": 5}, False),
    ({"model": "bsbr", "pages": ["a", 7]}, False),
    ({"model": "bsbr", "text": "x", "extra": 1}, False),
    ({"model": 7, "text": "x"}, False),
    ({"model": "bsbr", "text": None}, False),
]


@pytest.mark.parametrize("body,valid", BODIES, ids=lambda x: None if isinstance(x, bool) else str(x))
def test_the_schema_and_the_server_agree(doc, body, valid):
    schema = component(doc, "ClassifyRequest")
    assert jsonschema.Draft202012Validator(schema).is_valid(body) is valid
    try:
        schemas.ClassifyRequest.model_validate(body)
        accepted = True
    except ValidationError:
        accepted = False
    if valid:
        assert accepted, "the schema allows what the server refuses"
    if not accepted:
        assert not valid
    # The same rules for a session's pages, with seq.
    pages_schema = component(doc, "PagesRequest")
    page_body = {k: v for k, v in body.items() if k != "model"} | {"seq": 0}
    if "model" in body and isinstance(body["model"], str):
        assert jsonschema.Draft202012Validator(pages_schema).is_valid(page_body) is valid
