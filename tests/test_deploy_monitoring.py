"""deploy/prometheus and deploy/grafana, checked offline.

promtool (Debian's `prometheus` package, `make install-test-tools`) checks
every Prometheus config and rule file and runs the rule unit tests under
deploy/prometheus/rules/tests; the dashboard JSON is checked against the
generator it comes from, for layout, and for PromQL that parses. Running the
queries against a real server is tests/test_deploy_live.py.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from deploy_helpers import DEPLOY, load_yaml
from tool_helpers import require_tool

PROM_DIR = DEPLOY / "prometheus"
RULE_FILES = sorted((PROM_DIR / "rules").glob("*.rules.yml"))
RULE_TESTS = sorted((PROM_DIR / "rules" / "tests").glob("*.test.yml"))
CONFIGS = sorted(PROM_DIR.glob("*.yml"))
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "bsbr-vs-standard.json"

def promtool(*args: str) -> subprocess.CompletedProcess:
    """Run promtool in deploy/prometheus; the test skips without it (fails under CI)."""
    return subprocess.run([require_tool("promtool"), *args], check=False, capture_output=True, text=True, timeout=120,
                          cwd=PROM_DIR)


# ----------------------------------------------------------------- Prometheus


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_promtool_check_config(config):
    out = promtool("check", "config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_check_rules():
    assert RULE_FILES, "no rule files"
    out = promtool("check", "rules", *map(str, RULE_FILES))
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_rule_unit_tests():
    assert RULE_TESTS, "no rule unit tests"
    out = promtool("test", "rules", *map(str, RULE_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr


def _rules(kind: str) -> list[dict]:
    return [r for f in RULE_FILES for g in load_yaml(f)["groups"] for r in g["rules"] if kind in r]


def test_every_rule_file_is_unit_tested_and_every_alert_both_fires_and_stays_quiet():
    tested_files, fires, quiet = set(), set(), set()
    for t in RULE_TESTS:
        doc = load_yaml(t)
        tested_files |= {(t.parent / f).resolve() for f in doc["rule_files"]}
        for case in doc["tests"]:
            for a in case.get("alert_rule_test", []):
                (fires if a["exp_alerts"] else quiet).add(a["alertname"])
    assert {f.resolve() for f in RULE_FILES} <= tested_files
    alerts = {r["alert"] for r in _rules("alert")}
    assert alerts - fires == set(), "alerts no unit test sees firing"
    assert alerts - quiet == set(), "alerts no unit test sees staying quiet"


def test_alerts_carry_severity_summary_and_description():
    for r in _rules("alert"):
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


def test_recording_rules_cover_the_page_latency_quantiles_and_the_ratio():
    records = {r["record"] for r in _rules("record")}
    for q in ("p50", "p95", "p99"):
        assert f"model:ray_bsbr_page_latency_seconds:{q}_5m" in records
    assert "quantile:ray_bsbr_page_latency_seconds:bsbr_over_standard_5m" in records


# -------------------------------------------------------------------- Grafana


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_json_is_what_the_generator_writes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_dashboard", GRAFANA / "build_dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    assert DASHBOARD.read_text() == mod.render(), "run: python deploy/grafana/build_dashboard.py"


def test_dashboard_panels_the_issue_asks_for():
    titles = " | ".join(p["title"].lower() for p in dashboard()["panels"])
    for words in ("per-page latency p50 / p95 by model", "against page index", "tokens / s",
                  "request peak memory", "carried state", "live sessions", "hot vs store",
                  "errors / s by code", "replicas"):
        assert words in titles, words
    assert dashboard()["title"] == "bsbr vs standard"


def test_dashboard_layout_and_datasources():
    d = dashboard()
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
        for t in p.get("targets", []):
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["model"]["allValue"] == variables["mode"]["allValue"] == ".*"


def test_dashboard_promql_parses(tmp_path):
    # promtool has no "check expression": each query becomes a recording rule.
    subst = {"$model": ".*", "$mode": ".*", "$__rate_interval": "1m", "$__range": "5m"}
    rules = []
    for p in dashboard()["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"]
            for k, v in subst.items():
                expr = expr.replace(k, v)
            rules.append({"record": f"panel_{p['id']}_{t['refId']}", "expr": expr})
    f = tmp_path / "panels.rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = promtool("check", "rules", str(f))
    assert out.returncode == 0, out.stdout + out.stderr


def test_grafana_provisioning_files():
    (ds,) = load_yaml(GRAFANA / "provisioning/datasources/prometheus.yml")["datasources"]
    assert ds["type"] == "prometheus" and ds["access"] == "proxy"
    (provider,) = load_yaml(GRAFANA / "provisioning/dashboards/bsbr.yml")["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
