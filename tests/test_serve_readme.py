"""The README's HTTP API examples run against a live server."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from tool_helpers import require_tool

pytest_plugins = ["conftest_serve"]
pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"


def api_examples() -> str:
    text = README.read_text()
    section = text.split("<!-- serve:api-examples -->", 1)[1].split("<!-- /serve:api-examples -->", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) >= 4
    return "\n".join(blocks)


def test_readme_curl_examples(serve_cluster):
    require_tool("curl")
    script = api_examples().replace("http://127.0.0.1:8000", serve_cluster["url"])
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr + out.stdout
    objs = [json.loads(line) for line in out.stdout.replace("}{", "}\n{").splitlines() if line.startswith("{")]
    assert any(o.get("status") == "ready" for o in objs)
    assert any("models" in o for o in objs)
    classified = [o for o in objs if "timing" in o and "per_page_ms" in o["timing"]]
    assert [c["num_pages"] for c in classified] == [2, 2]
    by_session: dict[str, list[dict]] = {}
    for o in objs:
        if "session_id" in o:
            by_session.setdefault(o["session_id"], []).append(o)
    session, streamed = by_session.values()
    # seq 0, seq 1, its retry (the same answer), GET, DELETE
    assert [o["seq"] for o in session] == [0, 1, 1, 1, 1] and session[1]["logits"] == session[2]["logits"]
    assert session[-1]["final"] is True and session[-1]["num_pages"] == 3
    assert [o["seq"] for o in streamed] == [0, 1, 2, 2] and streamed[-1]["final"] is True
    assert objs[-1] == {"error": {"code": "empty_document", "message": "the document is empty (or only whitespace)"}}
