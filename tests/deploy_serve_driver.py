"""Run a Serve config YAML the way `serve run CONFIG` does, on a Ray of its own.

    python tests/deploy_serve_driver.py deploy/serve_config.cpu.yaml \
        --port 8123 --metrics-port 8124 --temp-dir /tmp/bsbr-ray-x \
        --model-path bsbr=/tmp/m/bsbr --details /tmp/details.json

Used by tests/test_deploy_live.py in a child process, so that its Ray never
meets the shared Ray cluster of the serve tests in the pytest process.
Like `serve run`: Ray's ServeDeploySchema, `serve_start` with the config's
proxy and HTTP options, then `deploy_apps` (which also applies any
`deployments:` overrides the YAML has). The only changes to the config are the HTTP
port and, with --model-path, a model's path. After the application is
RUNNING it writes Serve's own view of it (`get_serve_details`) to --details,
then serves until SIGTERM/SIGINT and shuts Serve and Ray down.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import yaml


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--metrics-port", type=int, required=True)
    ap.add_argument("--temp-dir", required=True, help="Ray's temp dir (short: Unix socket paths)")
    ap.add_argument("--model-path", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--details", required=True, help="where to write Serve's details once RUNNING")
    args = ap.parse_args()

    import ray
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    with open(args.config) as f:
        raw = yaml.safe_load(f)
    raw["http_options"]["port"] = args.port
    paths = dict(kv.split("=", 1) for kv in args.model_path)
    for app in raw["applications"]:
        for m in app.get("args", {}).get("models", []):
            m["path"] = paths.get(m["name"], m["path"])
    config = ServeDeploySchema.model_validate(raw)

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    # Metrics exported every 3 s instead of every 10. The environment (not
    # _system_config) reaches every Ray process, the metrics agent included,
    # so gauges age out after 2 intervals (6 s) as they do in production.
    # Serve's controller re-sets an unchanged status gauge, such as
    # ray_serve_deployment_replica_healthy, only every
    # RAY_SERVE_STATUS_GAUGE_REPORT_INTERVAL_S (10 s by default, which the
    # 20 s ageing of production's 10 s interval covers): with the shorter
    # export interval the series lived 6 s of every 10, and the dashboard
    # test failed whenever its query fell in the gap. So the controller
    # re-sets it every second here, well inside the ageing.
    os.environ["RAY_metrics_report_interval_ms"] = "3000"
    os.environ["RAY_SERVE_STATUS_GAUGE_REPORT_INTERVAL_S"] = "1"
    from serve.cli import ray_env_defaults

    ray_env_defaults()
    # Otherwise the same local Ray as the serve tests (tests/conftest_serve.py).
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, namespace="serve",
        _metrics_export_port=args.metrics_port, _temp_dir=args.temp_dir,
        object_store_memory=200 << 20, logging_level="warning", log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    try:
        client = serve_api.serve_start(
            http_options=config.http_options.model_dump(), proxy_location=config.proxy_location,
            grpc_options=None,
        )
        client.deploy_apps(config, _blocking=True)
        with open(args.details + ".tmp", "w") as f:
            json.dump(client.get_serve_details(), f, default=str)
        os.replace(args.details + ".tmp", args.details)
        print("deployed", flush=True)
        while not stop["now"]:
            time.sleep(0.2)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
