"""The CPU profile (deploy/serve_config.cpu.yaml) run for real, and the
monitoring of deploy/ checked against it.

A child process (tests/deploy_serve_driver.py) starts a local Ray of its own
(2 logical CPUs, its own temp dir and ports, so it neither meets the serve
tests' Ray in this process nor other Ray instances on the machine) and runs
the profile the way `serve run deploy/serve_config.cpu.yaml` does. Only the
HTTP port changes (a free one) and, when the repository has no trained
models yet, the model paths (tiny random models).

Then a real Prometheus (Debian's `prometheus` binary) scrapes Ray's metrics
export with the repository's recording and alert rules loaded, and every
PromQL query of the Grafana dashboard, every recording rule and every alert
expression is evaluated against what it scraped.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from deploy_helpers import DEPLOY, ROOT, SERVE_CONFIGS, load_yaml
from tool_helpers import require_tool

pytestmark = pytest.mark.slow

RULES = sorted((DEPLOY / "prometheus" / "rules").glob("*.rules.yml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "bsbr-vs-standard.json"
APP = "bsbr-serve"

# What Grafana substitutes for the dashboard's variables when "All" is chosen
# and the time range is a few minutes.
# Seconds without traffic before the checks (see `scraped`).
IDLE_S = 8  # > two export intervals (3 s each, tests/deploy_serve_driver.py)
# > Serve's default RAY_SERVE_STATUS_GAUGE_REPORT_INTERVAL_S (10 s): a window
# in which a health gauge re-set that rarely would show a gap
HEALTH_WINDOW_S = 12

GRAFANA_VARS = {"$model": ".*", "$mode": ".*", "$__rate_interval": "1m", "$__range": "5m"}


def free_port() -> int:
    from serve.cli import free_port as pick  # outside the ephemeral range: see there

    return pick()


def http(method: str, url: str, body: dict | bytes | None = None, timeout: float = 60,
         content_type: str = "application/json") -> tuple[int, dict]:
    """(status, JSON body); a dict body is sent as JSON, bytes as they are. A
    non-JSON answer (Serve's proxy before the app is deployed answers plain
    text) comes back as {"text": ...}."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw or b"{}")
    except ValueError:
        return status, {"text": raw.decode(errors="replace")}


def wait_for(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            out = check()
            if out:
                return out
        except (OSError, urllib.error.URLError) as e:  # not listening yet
            last = e
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s (last error: {last})")


def model_paths(tmp: Path) -> dict[str, str]:
    """No change when the repository ships the profile's models, else tiny random ones."""
    raw = load_yaml(SERVE_CONFIGS["cpu"])
    models = raw["applications"][0]["args"]["models"]
    if all((ROOT / m["path"] / "model.safetensors").is_file() for m in models):
        return {}
    from serve.devmodels import write_random_models

    write_random_models(tmp, names=tuple(m["name"] for m in models), size="tiny")
    return {m["name"]: str(tmp / m["name"]) for m in models}


@pytest.fixture(scope="module")
def cpu_profile(tmp_path_factory):
    """The CPU profile serving on a free port of 127.0.0.1 (tests/deploy_serve_driver.py
    in a child process); yields its URLs and Serve's details of the application."""
    work = tmp_path_factory.mktemp("cpu_profile")
    port, metrics_port = free_port(), free_port()
    # A short temp dir: Ray's Unix sockets live under it (108-byte path limit).
    ray_tmp = tempfile.mkdtemp(prefix="bsbr-ray-", dir="/tmp")
    details = work / "details.json"
    cmd = [sys.executable, str(Path(__file__).parent / "deploy_serve_driver.py"), str(SERVE_CONFIGS["cpu"]),
           "--port", str(port), "--metrics-port", str(metrics_port), "--temp-dir", ray_tmp,
           "--details", str(details)]
    cmd += [f"--model-path={name}={path}" for name, path in model_paths(work / "models").items()]
    log = open(work / "driver.log", "w")  # noqa: SIM115 - open while the child runs
    # Its own session: if it hangs on shutdown, its whole process group goes.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"the driver exited {proc.returncode}:\n{(work / 'driver.log').read_text()[-3000:]}")
            return details.is_file() and http("GET", base + "/readyz", timeout=5)[0] == 200

        wait_for("the CPU profile answers /readyz", up, timeout=420)
        yield {"base": base, "metrics": f"127.0.0.1:{metrics_port}", "details": json.loads(details.read_text())}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ------------------------------------------------------------ the CPU profile


def test_cpu_profile_serves_for_real(cpu_profile):
    base = cpu_profile["base"]
    status, ready = http("GET", base + "/readyz")
    assert status == 200, ready
    status, listing = http("GET", base + "/v1/models")
    assert status == 200
    assert [m["name"] for m in listing["models"]][:2] == ["bsbr", "standard"]
    labels = listing["models"][0]["labels"]

    status, out = http("POST", base + "/v1/classify",
                       {"model": "bsbr", "text": "kernel driver memory\fpage cache block device\fsocket"})
    assert status == 200, out
    assert out["label"] in labels and out["num_pages"] == 3
    assert abs(sum(out["scores"].values()) - 1) < 1e-5


def test_serve_runs_the_profiles_deployment_options(cpu_profile):
    # Serve's own view of the running application against the profile's args.
    from serve.config import AppConfig

    deployments = cpu_profile["details"]["applications"][APP]["deployments"]
    cfg = AppConfig.model_validate(load_yaml(SERVE_CONFIGS["cpu"])["applications"][0]["args"])
    assert set(deployments) == {"api", *(m.name for m in cfg.models)}
    wanted = {m.name: m for m in cfg.models}
    for name, d in deployments.items():
        got = d["deployment_config"]
        spec = cfg.ingress if name == "api" else wanted[name]
        assert got["ray_actor_options"]["num_cpus"] == spec.ray_actor_options["num_cpus"], name
        assert got["max_ongoing_requests"] == spec.max_ongoing_requests, name
        if getattr(spec, "autoscaling_config", None):
            for k, v in spec.autoscaling_config.items():
                assert got["autoscaling_config"][k] == v, (name, k)
        else:
            assert got["num_replicas"] == spec.num_replicas, name


# ---------------------------------------------------------------- monitoring


def send_traffic(base: str) -> None:
    """Every route once per model, so that every metric has a series: one-shot
    pages, session pages (hot resumes), a stream, a PDF and a broken one, and a
    client error."""
    from pdf_helpers import text_pdf

    pdf = text_pdf(["a first PDF page about the kernel", "", "a third page on block devices"])
    status, out = http("POST", base + "/v1/classify?model=bsbr", pdf, content_type="application/pdf")
    assert status == 200 and out["num_pages"] == 3, out
    status, err = http("POST", base + "/v1/classify?model=bsbr", b"not a pdf at all", content_type="application/pdf")
    assert status == 422 and err["error"]["code"] == "invalid_pdf", err
    text = "\f".join(f"page {i} kernel driver memory block device socket" for i in range(6))
    for model in ("bsbr", "standard"):
        status, _ = http("POST", base + "/v1/classify", {"model": model, "text": text})
        assert status == 200
        status, s = http("POST", base + "/v1/sessions", {"model": model})
        assert status == 201, s
        sid = s["session_id"]
        for seq in range(3):
            status, _ = http("POST", f"{base}/v1/sessions/{sid}/pages", {"seq": seq, "text": f"page {seq} of a session"})
            assert status == 200
        status, err = http("POST", f"{base}/v1/sessions/{sid}/pages", {"seq": 7, "text": "a gap"})
        assert status == 409, err
        assert http("DELETE", f"{base}/v1/sessions/{sid}")[0] == 200
        lines = "\n".join(json.dumps({"text": f"streamed page {i}"}) for i in range(3)).encode()
        req = urllib.request.Request(f"{base}/v1/classify/stream?model={model}", data=lines, method="POST",
                                     headers={"Content-Type": "application/x-ndjson"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200 and r.read()


class Prometheus:
    """Debian's prometheus on a free port, scraping Ray's export every second."""

    def __init__(self, binary: str, target: str, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in RULES],
            "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": [target]}]}],
        }
        cfg = workdir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(config))
        self.log = open(workdir / "prometheus.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_for("prometheus ready", lambda: urllib.request.urlopen(self.url + "/-/ready", timeout=2).status == 200,
                 timeout=60)

    def query(self, expr: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                out = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{expr}: {json.loads(e.read()).get('error')}") from None
        assert out["status"] == "success", out
        return out["data"]["result"]

    def has(self, expr: str) -> bool:
        return bool(self.query(expr))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    """Asked for before cpu_profile, so a missing Prometheus skips before the profile starts."""
    return require_tool("prometheus")


@pytest.fixture(scope="module")
def scraped(prometheus_binary, cpu_profile, tmp_path_factory):
    """A Prometheus that has scraped the server before and after traffic, so
    that every rate() has an increase to measure."""
    prom = Prometheus(prometheus_binary, cpu_profile["metrics"], tmp_path_factory.mktemp("prometheus"))
    try:
        send_traffic(cpu_profile["base"])
        wait_for("first samples of every model", lambda: prom.has(
            'count(count by (model) (ray_bsbr_pages_total{model=~"bsbr|standard"})) == 2'), timeout=120)
        first_samples = time.monotonic()
        time.sleep(3)  # a few scrapes of the first values
        send_traffic(cpu_profile["base"])
        wait_for("rates after the second round", lambda: prom.has(
            'count(sum by (model) (increase(ray_bsbr_pages_total[1m])) > 0) == 2'
            ' and count(sum by (model) (increase(ray_bsbr_request_latency_seconds_count[1m])) > 0) == 2'
            ' and count(sum by (model) (increase(ray_bsbr_errors_total[1m])) > 0) == 2'), timeout=120)
        # Stay idle for longer than Ray keeps an un-refreshed gauge (two export
        # intervals, here 6 s): a gauge that is set only when it changes
        # (sessions, store limit) must still be there, as on a quiet night in
        # production. Recording rules evaluate every second meanwhile.
        time.sleep(IDLE_S)
        time.sleep(max(0.0, HEALTH_WINDOW_S + 1 - (time.monotonic() - first_samples)))
        yield prom
    finally:
        prom.stop()


def dashboard_targets() -> list[tuple[str, str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["refId"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def with_grafana_vars(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def grouping_labels(expr: str) -> set[str]:
    """Labels of the outermost `by (...)`: each result series must carry them."""
    m = re.search(r"\bby \(([^)]*)\)", expr)
    return {x.strip() for x in m.group(1).split(",")} - {"le", ""} if m else set()


def test_every_dashboard_panel_returns_data(scraped):
    problems = []
    for title, ref, expr in dashboard_targets():
        result = scraped.query(with_grafana_vars(expr))
        if not result:
            problems.append(f"{title} [{ref}]: no series")
            continue
        values = [float(r["value"][1]) for r in result]
        if not any(math.isfinite(v) for v in values):
            problems.append(f"{title} [{ref}]: only NaN/Inf {values}")
        for label in grouping_labels(expr):
            if not any(r["metric"].get(label) for r in result):
                problems.append(f"{title} [{ref}]: no series carries label {label!r}")
    assert not problems, "dashboard queries without data:\n  " + "\n  ".join(problems)


def test_replica_health_gauge_is_there_at_every_scrape(scraped):
    # Serve's controller re-sets an unchanged ray_serve_deployment_replica_healthy
    # only every RAY_SERVE_STATUS_GAUGE_REPORT_INTERVAL_S. Where that is longer
    # than Ray keeps an un-refreshed gauge, the series has gaps, and in them
    # the health panel is empty and the no-healthy-replica alert cannot fire.
    # Prometheus scrapes every second: a series present throughout has about
    # one sample a second.
    result = scraped.query(f"count_over_time(ray_serve_deployment_replica_healthy[{HEALTH_WINDOW_S}s])")
    assert result, "ray_serve_deployment_replica_healthy not exported"
    gappy = {r["metric"].get("deployment"): float(r["value"][1]) for r in result
             if float(r["value"][1]) < HEALTH_WINDOW_S - 2}
    assert not gappy, f"samples in the last {HEALTH_WINDOW_S} s, per series (want ~{HEALTH_WINDOW_S}): {gappy}"


def rules() -> list[dict]:
    return [r for p in RULES for g in load_yaml(p)["groups"] for r in g["rules"]]


def test_every_recording_rule_has_data(scraped):
    empty = [r["record"] for r in rules() if "record" in r
             if not any(math.isfinite(float(s["value"][1])) for s in scraped.query(r["record"]))]
    assert not empty, f"recording rules without data: {empty}"


def test_alert_expressions_evaluate_and_stay_quiet(scraped):
    # A healthy server under light load: every expression is valid PromQL on
    # the real series, and no alert fires.
    for r in rules():
        if "alert" in r:
            assert scraped.query(r["expr"]) == [], f"{r['alert']} fires on a healthy server"


def test_every_metric_the_rules_and_dashboard_use_is_exported(scraped):
    text = " ".join([e for _, _, e in dashboard_targets()] + [r["expr"] for r in rules()])
    # Raw metric names only, not the recorded `level:ray_...:op` series.
    names = set(re.findall(r"(?<![\w:])ray_[a-z0-9_]+(?![\w:])", text))
    missing = sorted(n for n in names if not scraped.has(f'count({{__name__="{n}"}})'))
    assert not missing, f"metrics not exported by the running server: {missing}"
