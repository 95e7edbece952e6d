"""Metrics: Ray's export port shows every replica's bsbr_* metrics, and a real
Prometheus (Debian's package) scraping it with deploy/'s config answers
PromQL for per-page latency quantiles of both models."""
from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest_serve import document, free_port
from tool_helpers import require_tool

from serve.metrics import METRIC_NAMES

pytest_plugins = ["conftest_serve"]
pytestmark = pytest.mark.slow

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"


def traffic(url: str, stop: threading.Event) -> None:
    """Pages through both models, one-shot and in sessions, until stopped."""
    pages = document(3, words_per_page=8, seed=5)
    with httpx.Client(base_url=url, timeout=60) as c:

        def call(method: str, path: str, status: int = 200, **kw) -> httpx.Response:
            r = c.request(method, path, **kw)
            assert r.status_code == status, f"{method} {path}: {r.status_code} {r.text[:300]}"
            return r

        while not stop.is_set():
            for model in ("bsbr", "standard"):
                call("POST", "/v1/classify", json={"model": model, "pages": pages})
                sid = call("POST", "/v1/sessions", 201, json={"model": model}).json()["session_id"]
                for i, p in enumerate(pages):
                    call("POST", f"/v1/sessions/{sid}/pages", json={"seq": i, "pages": [p]})
                call("DELETE", f"/v1/sessions/{sid}")
                call("POST", "/v1/classify", 422, json={"model": model, "text": ""})  # an error, counted
            stop.wait(0.2)


class Traffic:
    """`traffic` in a background thread. An exception there fails the test
    (`check()`, called while the test waits and at teardown) instead of
    silently ending the thread and leaving the test to time out."""

    def __init__(self, url: str):
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self.thread.start()

    def _run(self, url: str) -> None:
        try:
            traffic(url, self.stop)
        except BaseException as e:  # noqa: BLE001 - handed to the test by check()
            self.error = e

    def check(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None  # reported once
            raise AssertionError(f"the traffic thread failed: {error!r}") from error

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(120)
        self.check()
        assert not self.thread.is_alive(), "the traffic thread did not stop"


@pytest.fixture
def busy(serve_cluster):
    t = Traffic(serve_cluster["url"])
    yield t
    t.finish()


def test_a_failing_traffic_thread_fails_the_test():
    """The thread's first failed call (here: no server at all) surfaces in the test."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    t = Traffic(url)
    t.thread.join(30)
    assert not t.thread.is_alive()
    with pytest.raises(AssertionError, match="the traffic thread failed"):
        t.check()
    t.finish()  # reported once: the teardown does not raise it again


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def test_one_scrape_of_the_export_port_shows_every_replica(serve_cluster, busy):
    deadline = time.time() + 90
    while True:
        busy.check()
        text = scrape(serve_cluster["metrics_port"])
        series = [line for line in text.splitlines() if line.startswith("ray_bsbr_page_latency_seconds_count")]
        replicas = {part for line in series for part in line.split(",") if part.startswith("replica=")}
        names_seen = {n for n in METRIC_NAMES if f"ray_{n}" in text}
        # Earlier tests on the shared cluster may already have exported some
        # series (errors of other codes), so wait for this traffic's own too.
        complete = (len(replicas) >= 3 and names_seen == set(METRIC_NAMES) and 'mode="session"' in text
                    and 'mode="oneshot"' in text and 'code="empty_document"' in text)
        if complete or time.time() > deadline:
            break
        time.sleep(2)
    assert names_seen == set(METRIC_NAMES), set(METRIC_NAMES) - names_seen
    assert len(replicas) >= 3, series  # 2 bsbr replicas + 1 standard
    assert 'mode="oneshot"' in text and 'mode="session"' in text
    assert 'code="empty_document"' in text
    # Buckets resolve milliseconds (a tiny model's pages take a few ms).
    assert 'le="0.001"' in text and 'le="600.0"' in text


def test_prometheus_answers_page_latency_quantiles_for_both_models(serve_cluster, busy, tmp_path):
    prometheus = require_tool("prometheus")
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    # The shipped config, pointed at this test's export port and scraping every second.
    cfg["global"]["scrape_interval"] = "1s"
    cfg["global"]["evaluation_interval"] = "1s"
    cfg["rule_files"] = [str(DEPLOY / r) for r in cfg.get("rule_files", [])]
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "ray"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{serve_cluster['metrics_port']}"]}]
    conf = tmp_path / "prometheus.yml"
    conf.write_text(yaml.safe_dump(cfg))
    subprocess.run([require_tool("promtool"), "check", "config", str(conf)], check=True, capture_output=True)

    port = free_port()
    prom = subprocess.Popen(
        [prometheus, f"--config.file={conf}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    query = ('histogram_quantile(0.95, sum by (model, le) '
             '(rate(ray_bsbr_page_latency_seconds_bucket[30s])))')
    try:
        deadline = time.time() + 150
        by_model: dict[str, float] = {}
        while time.time() < deadline and set(by_model) != {"bsbr", "standard"}:
            busy.check()
            time.sleep(3)
            try:
                r = httpx.get(f"{api}/query", params={"query": query}, timeout=10).json()
            except httpx.HTTPError:
                continue
            assert r["status"] == "success", r
            by_model = {x["metric"]["model"]: float(x["value"][1]) for x in r["data"]["result"]
                        if x["value"][1] not in ("NaN", "+Inf")}
        assert set(by_model) == {"bsbr", "standard"}, by_model
        assert all(0 < v < 60 for v in by_model.values()), by_model
        targets = httpx.get(f"{api}/targets", timeout=10).json()["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"]
    finally:
        prom.terminate()
        try:
            prom.wait(30)
        except subprocess.TimeoutExpired:
            prom.kill()
