"""Writes dashboards/bsbr-vs-standard.json, the Grafana dashboard "bsbr vs standard".

The panels are listed once, here, as (title, kind, PromQL targets); the JSON
next to this file is generated from them and checked in, so Grafana's
provisioning reads it directly and a test (tests/test_deploy_monitoring.py)
verifies that the two agree and runs every query against a real Prometheus.

    python deploy/grafana/build_dashboard.py          # rewrite the JSON
    python deploy/grafana/build_dashboard.py --check  # exit 1 if it is stale

Metric names are those of docs/architecture.md section 4 as Ray's metrics export writes
them (prefix `ray_`). Variables: `$datasource`, `$model` and `$mode`
(multi-value, "All" = `.*`).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "bsbr-vs-standard.json"
UID = "bsbr-vs-standard"
DS = {"type": "prometheus", "uid": "${datasource}"}

# Label filters every bsbr_* query takes from the dashboard variables.
SEL = 'model=~"$model"'
SEL_MODE = 'model=~"$model", mode=~"$mode"'
# The ratio panel names the two default models of deploy/serve_config*.yaml.
SEL_BSBR = 'model="bsbr", mode=~"$mode"'
SEL_STANDARD = 'model="standard", mode=~"$mode"'


def quantile(q: float, metric: str, sel: str, by: str = "model", window: str = "$__rate_interval") -> str:
    """PromQL for the q-quantile of a Ray-exported histogram, summed over replicas."""
    keep = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({keep}) (rate({metric}_bucket{{{sel}}}[{window}])))"


@dataclass
class Target:
    expr: str
    legend: str = ""
    instant: bool = False  # one value per series over the dashboard's range


@dataclass
class Panel:
    title: str
    description: str
    targets: list[Target]
    kind: str = "timeseries"  # timeseries | barchart
    unit: str = "short"
    width: int = 12
    height: int = 8
    stack: bool = False
    transformations: list[dict] = field(default_factory=list)


@dataclass
class Row:
    title: str


LAT = "ray_bsbr_page_latency_seconds"

PANELS: list[Row | Panel] = [
    Row("Per-page latency"),
    Panel(
        "Per-page latency p50 / p95 by model",
        "Time to run one page through the model (one step of the streaming "
        "form, or one page of a one-shot document), all replicas together.",
        [
            Target(quantile(0.5, LAT, SEL_MODE), "{{model}} p50"),
            Target(quantile(0.95, LAT, SEL_MODE), "{{model}} p95"),
        ],
        unit="s",
    ),
    Panel(
        "BSBR / standard per-page latency",
        "Ratio of the per-page latency quantiles of the bsbr and standard "
        "deployments; below 1 BSBR is faster. Needs traffic on both.",
        [
            Target(f"{quantile(0.5, LAT, SEL_BSBR, by='')} / {quantile(0.5, LAT, SEL_STANDARD, by='')}",
                   "p50 ratio"),
            Target(f"{quantile(0.95, LAT, SEL_BSBR, by='')} / {quantile(0.95, LAT, SEL_STANDARD, by='')}",
                   "p95 ratio"),
        ],
        unit="none",
    ),
    Panel(
        "Per-page latency p50 against page index",
        "Median latency of a document's n-th page over the dashboard's time "
        "range, pages grouped by powers of two (label page_index = 1, 2, 4, "
        "8, ... holds pages [n, 2n)). BSBR's cost per page stays nearly flat "
        "as the document grows; the standard model's grows with its KV cache.",
        [Target(quantile(0.5, LAT, SEL_MODE, by="model, page_index", window="$__range"), instant=True)],
        kind="barchart",
        unit="s",
        width=24,
        transformations=[
            # One row per page_index, one column per model.
            {"id": "groupingToMatrix",
             "options": {"columnField": "model", "rowField": "page_index", "valueField": "Value"}},
            {"id": "convertFieldType",
             "options": {"conversions": [{"targetField": "page_index\\model", "destinationType": "number"}]}},
            {"id": "sortBy", "options": {"sort": [{"field": "page_index\\model"}]}},
        ],
    ),
    Panel(
        "Request latency p95 by model and route",
        "Whole request, HTTP in to HTTP out, per API route.",
        [Target(quantile(0.95, "ray_bsbr_request_latency_seconds", SEL, by="model, route"), "{{model}} {{route}}")],
        unit="s",
        width=24,
    ),
    Row("Throughput"),
    Panel(
        "Tokens / s by model",
        "Tokens run through each model, all replicas together.",
        [Target(f"sum by (model) (rate(ray_bsbr_tokens_total{{{SEL}}}[$__rate_interval]))", "{{model}}")],
        unit="short",
    ),
    Panel(
        "Pages / s by model",
        "Pages run through each model, all replicas together.",
        [Target(f"sum by (model) (rate(ray_bsbr_pages_total{{{SEL}}}[$__rate_interval]))", "{{model}}")],
        unit="short",
    ),
    Row("Memory and state"),
    Panel(
        "Request peak memory p50 / p95 by model",
        "Peak memory of one request on its replica (CUDA: max_memory_allocated; "
        "CPU: as documented in serve/metrics.py).",
        [
            Target(quantile(0.5, "ray_bsbr_request_peak_memory_bytes", SEL), "{{model}} p50"),
            Target(quantile(0.95, "ray_bsbr_request_peak_memory_bytes", SEL), "{{model}} p95"),
        ],
        unit="bytes",
    ),
    Panel(
        "Carried state after each page p50 / p95 by model",
        "Size of the state a document carries between pages: BSBR's grows by "
        "one d x d chunk state per chunk, the standard model's KV cache by "
        "every token.",
        [
            Target(quantile(0.5, "ray_bsbr_state_bytes", SEL), "{{model}} p50"),
            Target(quantile(0.95, "ray_bsbr_state_bytes", SEL), "{{model}} p95"),
        ],
        unit="bytes",
    ),
    Row("Sessions"),
    Panel(
        "Live sessions by model",
        "Sessions held hot on the replicas (not yet deleted, expired or evicted).",
        [Target(f"sum by (model) (ray_bsbr_sessions_active{{{SEL}}})", "{{model}}")],
        unit="short",
        width=8,
    ),
    Panel(
        "Session resumes: hot vs store",
        "Pages that found their session's state hot on the replica, against "
        "pages whose state was loaded from the session store (another "
        "replica served the last page, or it restarted).",
        [Target(f"sum by (model, source) (rate(ray_bsbr_session_resumes_total{{{SEL}}}[$__rate_interval]))",
                "{{model}} {{source}}")],
        unit="short",
        stack=True,
        width=8,
    ),
    Panel(
        "Session store: checkpoint bytes and limit",
        "Bytes of session checkpoints in the store against sessions.max_store_bytes; "
        "at the limit, pages are refused with 429 store_full.",
        [
            Target("sum(ray_bsbr_session_store_bytes)", "checkpoints"),
            Target("max(ray_bsbr_session_store_max_bytes)", "limit"),
        ],
        unit="bytes",
        width=8,
    ),
    Row("PDF documents"),
    Panel(
        "PDF pages extracted / s",
        "PDF pages whose text the ingress extracted (docs/architecture.md 3.6), all ingress replicas together.",
        [Target("sum(rate(ray_bsbr_pdf_pages_total[$__rate_interval]))", "pages")],
        unit="short",
        width=8,
    ),
    Panel(
        "PDF page extraction p50 / p95",
        "Time to load one PDF page and extract its text in a worker process (about a millisecond).",
        [
            Target(quantile(0.5, "ray_bsbr_pdf_page_extract_seconds", "", by=""), "p50"),
            Target(quantile(0.95, "ray_bsbr_pdf_page_extract_seconds", "", by=""), "p95"),
        ],
        unit="s",
        width=8,
    ),
    Panel(
        "PDF failures / s by reason",
        "PDF bodies that could not be read: not_pdf, damaged, encrypted, too_many_pages, and the hostile "
        "ones stopped by the deadline (timeout) or the memory limit (memory, crashed).",
        [Target("sum by (reason) (rate(ray_bsbr_pdf_failures_total[$__rate_interval]))", "{{reason}}")],
        unit="short",
        stack=True,
        width=8,
    ),
    Row("Errors and replicas"),
    Panel(
        "Errors / s by code",
        "Error answers by model and error code (see serve/errors.py).",
        [Target(f"sum by (model, code) (rate(ray_bsbr_errors_total{{{SEL}}}[$__rate_interval]))",
                "{{model}} {{code}}")],
        unit="short",
        stack=True,
        width=8,
    ),
    Panel(
        "Healthy replicas by deployment",
        "Replicas that pass Serve's health check, per deployment (api = "
        "HTTP ingress; one deployment per model).",
        [Target("sum by (application, deployment) (ray_serve_deployment_replica_healthy)", "{{deployment}}")],
        unit="short",
        width=8,
    ),
    Panel(
        "Replica starts by deployment",
        "Replicas that became ready (Serve's controller): scale-up, and "
        "replacements of crashed replicas (alert BsbrReplicaRestarts).",
        [Target("sum by (application, deployment) "
                "(increase(ray_serve_replica_startup_latency_ms_count[$__rate_interval]))", "{{deployment}}")],
        unit="short",
        width=8,
    ),
]


def _panel_json(p: Panel, pid: int, x: int, y: int) -> dict:
    targets = []
    for i, t in enumerate(p.targets):
        tj = {"refId": chr(ord("A") + i), "datasource": DS, "expr": t.expr, "legendFormat": t.legend or "__auto",
              "range": not t.instant, "instant": t.instant}
        if t.instant:
            tj["format"] = "table"
        targets.append(tj)
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never", "spanNulls": False}
    if p.stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    if p.kind == "barchart":
        custom = {"fillOpacity": 80, "lineWidth": 1}
    out = {
        "id": pid,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": DS,
        "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": p.unit, "custom": custom}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                               "calcs": ["lastNotNull", "max"] if p.kind == "timeseries" else []},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": targets,
    }
    if p.kind == "barchart":
        out["options"].update({"orientation": "vertical", "xField": "page_index\\model",
                               "groupWidth": 0.7, "barWidth": 0.9, "showValue": "never"})
    if p.transformations:
        out["transformations"] = p.transformations
    return out


def _variable_model() -> dict:
    return {
        "name": "model", "label": "model", "type": "query", "datasource": DS,
        "query": {"query": "label_values(ray_bsbr_pages_total, model)", "refId": "model"},
        "definition": "label_values(ray_bsbr_pages_total, model)",
        "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1,
    }


def _variable_mode() -> dict:
    modes = ["oneshot", "session", "stream"]
    return {
        "name": "mode", "label": "mode", "type": "custom", "query": ",".join(modes),
        "multi": True, "includeAll": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [{"selected": True, "text": "All", "value": "$__all"}]
        + [{"selected": False, "text": m, "value": m} for m in modes],
    }


def build() -> dict:
    panels, pid, x, y, row_h = [], 1, 0, 0, 0
    for item in PANELS:
        if isinstance(item, Row):
            if x:
                y, x = y + row_h, 0
            panels.append({"id": pid, "type": "row", "title": item.title, "collapsed": False,
                           "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
            pid, y, row_h = pid + 1, y + 1, 0
            continue
        if x + item.width > 24:
            y, x, row_h = y + row_h, 0, 0
        panels.append(_panel_json(item, pid, x, y))
        pid, x, row_h = pid + 1, x + item.width, max(row_h, item.height)
    return {
        "uid": UID,
        "title": "bsbr vs standard",
        "description": "BSBR and the standard transformer side by side, as deployed by bsbr-serve "
                       "(per-page latency, throughput, memory, state, sessions, errors, replicas).",
        "tags": ["bsbr-serve", "ray-serve"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "regex": ""},
            _variable_model(),
            _variable_mode(),
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the checked-in JSON differs")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
