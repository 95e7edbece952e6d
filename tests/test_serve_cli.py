"""The bsbr-serve command as a user meets it: the client commands against the
live test application, init-models, the errors of `up` (one line, before Ray
starts), and commands that never import torch or Ray."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from conftest_serve import document

from serve.cli import LIBRARY_COMMANDS, main

pytest_plugins = ["conftest_serve"]


@pytest.fixture
def doc_file(tmp_path):
    p = tmp_path / "report.txt"
    p.write_text("\f".join(document(4, words_per_page=10, seed=2)) + "\f")
    return p


@pytest.mark.slow
def test_classify_command(serve_cluster, doc_file, capsys):
    assert main(["classify", str(doc_file), "--url", serve_cluster["url"]]) == 0
    out = capsys.readouterr().out
    assert "label:" in out and "pages: 4" in out
    assert main(["classify", str(doc_file), "--url", serve_cluster["url"], "--model", "standard", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "standard"
    assert main(["classify", str(doc_file), "--url", serve_cluster["url"], "--model", "nope"]) == 1
    assert "unknown_model" in capsys.readouterr().err


@pytest.mark.slow
def test_stream_command(serve_cluster, doc_file, capsys):
    assert main(["stream", str(doc_file), "--url", serve_cluster["url"], "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["seq"] for x in lines] == [0, 1, 2, 3, 3] and lines[-1]["final"] is True
    assert main(["stream", str(doc_file), "--url", serve_cluster["url"]]) == 0
    out = capsys.readouterr().out
    assert "page    4/4" in out and "final:" in out


@pytest.mark.slow
def test_compare_command(serve_cluster, tmp_path, capsys):
    docs = tmp_path / "docs"
    for label in ("networking", "process"):
        (docs / label).mkdir(parents=True)
        for i in range(2):
            (docs / label / f"{i}.txt").write_text("\f".join(document(3 + i, words_per_page=10, seed=i)))
    out_dir = tmp_path / "out"
    assert main(["compare", str(docs), "--url", serve_cluster["url"], "--out", str(out_dir)]) == 0
    table = capsys.readouterr().out
    assert "bsbr" in table and "standard" in table and "page p50 ms" in table
    report = json.loads((out_dir / "compare.json").read_text())
    for model in ("bsbr", "standard"):
        s = report["summary"][model]
        assert s["documents"] == 4 and s["labelled"] == 4 and 0 <= s["accuracy"] <= 1
        assert len(s["page_ms_median_by_index"]) == 4 and s["peak_memory_bytes_max"] > 0
    assert (out_dir / "compare.png").stat().st_size > 1000


def test_init_models_writes_untrained_models_and_never_overwrites(tmp_path, capsys):
    assert main(["init-models", "--random", "--dir", str(tmp_path), "--size", "tiny",
                 "--names", "bsbr,standard,standard-512"]) == 0
    cfg = json.loads((tmp_path / "standard-512" / "config.json").read_text())
    assert cfg["arch"] == "standard" and cfg["max_length"] == 512
    assert json.loads((tmp_path / "bsbr" / "metrics.json").read_text())["trained"] is False
    assert main(["init-models", "--random", "--dir", str(tmp_path), "--size", "tiny"]) == 2
    assert "--force" in capsys.readouterr().err


def test_up_without_models_says_how_to_make_them(tmp_path, capsys):
    assert main(["up", "--models-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "init-models --random" in err


def test_library_commands_are_mounted():
    from serve.cli import build_parser

    args = build_parser().parse_args(["data", "kernel-docs", "--out", "/tmp/x"])
    assert callable(args.func)


def test_library_commands_are_listed_by_bsbr_cores_own_help_lines():
    import argparse

    from bsbr_core.cli import add_subcommands

    sub = argparse.ArgumentParser().add_subparsers()
    add_subcommands(sub)
    assert {a.dest: a.help for a in sub._choices_actions} == LIBRARY_COMMANDS


# --- in a fresh process, as a user runs it ----------------------------------------------------

# Runs bsbr-serve's main in a fresh interpreter, then reports its exit code and
# which heavy packages it imported on the last stdout line.
PROBE = """
import json, sys
from serve.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "ray", "bsbr_core"})
print("\\n" + json.dumps({"code": code, "heavy": heavy}))
"""


def bsbr_serve(*argv: str) -> tuple[int, list[str], str, str]:
    """(exit code, heavy packages imported, stdout, stderr) of `bsbr-serve ARGV...`."""
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120,
                         check=False)
    *lines, last = out.stdout.rstrip("\n").split("\n")
    report = json.loads(last)
    return report["code"], report["heavy"], "\n".join(lines), out.stderr


def assert_one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("argv", [["--help"], ["classify", "--help"], ["stream", "--help"], ["compare", "--help"],
                                  ["up", "--help"]], ids=" ".join)
def test_help_imports_neither_torch_nor_ray(argv):
    code, heavy, out, err = bsbr_serve(*argv)
    assert code == 0 and "usage: bsbr-serve" in out, err
    assert heavy == []
    if argv == ["--help"]:
        assert all(name in out for name in ("up", "classify", *LIBRARY_COMMANDS))


@pytest.mark.parametrize("command", ["classify", "stream", "compare"])
def test_client_commands_import_neither_torch_nor_ray(tmp_path, command):
    doc = tmp_path / "doc.txt"
    doc.write_text("a page\fanother page")
    # Nothing listens on port 1: the command fails as a request, after its imports.
    code, heavy, _, err = bsbr_serve(command, str(doc), "--url", "http://127.0.0.1:1",
                                     *(["--out", str(tmp_path / "out")] if command == "compare" else []))
    assert code == 1 and "no answer from http://127.0.0.1:1" in assert_one_error_line(err)
    assert heavy == []


def test_a_missing_document_is_one_line(tmp_path):
    code, heavy, _, err = bsbr_serve("classify", str(tmp_path / "nope.txt"))
    assert code == 2 and "cannot read" in assert_one_error_line(err) and heavy == []


def test_a_library_command_runs_with_bsbr_core_mounted():
    code, heavy, out, err = bsbr_serve("train", "--help")
    assert code == 0 and "--arch" in out, err
    assert "torch" in heavy


@pytest.fixture
def models_dir(tmp_path):
    """A models directory that passes up's checks (the files are never read before Ray starts)."""
    root = tmp_path / "models"
    (root / "bsbr").mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        (root / "bsbr" / f).write_text("{}")
    return root


def config_file(tmp_path, text: str):
    p = tmp_path / "serve.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("case,expect", [
    ("missing", "cannot read --config"),
    ("directory", "cannot read --config"),
    ("not yaml", "is not valid YAML at line"),
    ("a list", "expected build_app args or a Serve config"),
    ("no applications", "`applications` holds no application"),
    ("unknown key", "invalid configuration: modles: Extra inputs are not permitted"),
    ("bad model", "invalid configuration: models.0.path: Field required"),
])
def test_up_with_a_bad_config_is_one_line_before_ray(tmp_path, case, expect):
    path = {
        "missing": lambda: tmp_path / "nonexistent.yaml",
        "directory": lambda: tmp_path,
        "not yaml": lambda: config_file(tmp_path, "models: [{name: bsbr,\n"),
        "a list": lambda: config_file(tmp_path, "- models\n"),
        "no applications": lambda: config_file(tmp_path, "applications: []\n"),
        "unknown key": lambda: config_file(tmp_path, "modles: []\n"),
        "bad model": lambda: config_file(tmp_path, "applications:\n  - args: {models: [{name: bsbr}]}\n"),
    }[case]()
    code, heavy, _, err = bsbr_serve("up", "--config", str(path))
    assert code == 2 and expect in assert_one_error_line(err)
    assert "ray" not in heavy


def test_up_on_a_taken_port_is_one_line_before_ray(models_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, heavy, _, err = bsbr_serve("up", "--models-dir", str(models_dir), "--port", str(port))
    line = assert_one_error_line(err)
    assert code == 2 and f"127.0.0.1:{port}" in line and "in use" in line and "--port" in line
    assert "ray" not in heavy


@pytest.mark.parametrize("layout", ["empty", "absent", "incomplete"])
def test_up_without_a_usable_model_is_one_line_before_ray(tmp_path, models_dir, layout):
    root = {"empty": tmp_path / "empty", "absent": tmp_path / "absent", "incomplete": models_dir}[layout]
    if layout == "empty":
        root.mkdir()
    if layout == "incomplete":
        (models_dir / "bsbr" / "tokenizer.json").unlink()
    code, heavy, _, err = bsbr_serve("up", "--models-dir", str(root))
    line = assert_one_error_line(err)
    assert code == 2 and "ray" not in heavy
    assert ("lacks tokenizer.json" if layout == "incomplete" else "init-models --random") in line


def test_reap_stale_haproxy_stops_only_the_haproxy_of_servers_that_are_gone(tmp_path):
    """A server that was killed leaves its HAProxy running (Serve starts it as a
    plain child process): `up` stops the HAProxy of each run directory whose
    owner no longer runs, removes the directory, and leaves a live owner's alone."""
    import os
    import time

    from serve.cli import HAPROXY_DIR_PREFIX, reap_stale_haproxy

    gone_owner = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_owner.wait()
    stale, live = tmp_path / f"{HAPROXY_DIR_PREFIX}stale", tmp_path / f"{HAPROXY_DIR_PREFIX}live"
    sleepers = []
    for run_dir, owner in ((stale, gone_owner.pid), (live, os.getpid())):
        (run_dir / "node").mkdir(parents=True)
        (run_dir / "owner.pid").write_text(str(owner))
        # A stand-in with HAProxy's command line: the word and a config under the directory.
        sleepers.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                                          "haproxy", "-f", str(run_dir / "node" / "haproxy.cfg")]))
    unrelated = tmp_path / f"{HAPROXY_DIR_PREFIX}no-owner-file"
    unrelated.mkdir()
    try:
        time.sleep(0.2)  # their command lines are in /proc
        assert reap_stale_haproxy(str(tmp_path)) == [sleepers[0].pid]
        assert sleepers[0].wait(10) != 0
        assert sleepers[1].poll() is None
        assert not stale.exists() and live.exists() and unrelated.exists()
    finally:
        for p in sleepers:
            p.kill()
            p.wait(10)


def test_free_port_is_outside_the_ephemeral_range_free_and_new():
    """Ports for servers that bind after Ray starts: none of Ray's binds to port 0 can take them first."""
    import socket

    from serve.cli import PICKED_PORTS, _ephemeral_ports, free_port

    ephemeral = _ephemeral_ports()
    ports = [free_port() for _ in range(40)]
    assert len(set(ports)) == len(ports)
    for p in ports:
        assert p in PICKED_PORTS and p not in ephemeral
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # free
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        assert s.getsockname()[1] in ephemeral  # what the picked range avoids
    (last,) = [p for p in PICKED_PORTS if p not in ports][-1:]
    others = set(PICKED_PORTS) - {last}
    # Only `last` is left to draw: it, or where it is busy, a port the kernel gives.
    assert free_port(exclude=others) in {last} | set(ephemeral)


@pytest.mark.parametrize("topology", ["split", "fused"])
def test_up_replicas_and_torch_threads_go_to_what_holds_the_models(models_dir, topology):
    """`up --replicas N --torch-threads T`: N replicas of the fused deployment, or of
    each model's in split; T torch threads in every model; the discovered models
    are listed so both apply to them; without either flag the args are untouched."""
    import shutil

    from serve.cli import _needed_cpus, _up_app_args, build_parser
    from serve.config import AppConfig

    shutil.copytree(models_dir / "bsbr", models_dir / "standard")
    base = ["up", "--models-dir", str(models_dir), "--topology", topology]
    plain = _up_app_args(build_parser().parse_args(base))
    assert plain == {"models_dir": str(models_dir), "topology": topology}

    args = _up_app_args(build_parser().parse_args(base + ["--replicas", "2", "--torch-threads", "1"]))
    cfg = AppConfig.model_validate(args)
    assert [m.name for m in cfg.models] == ["bsbr", "standard"]
    assert [m.torch_threads for m in cfg.models] == [1, 1]
    assert [m.oneshot_torch_threads for m in cfg.models] == [None, None]
    with_oneshot = AppConfig.model_validate(_up_app_args(build_parser().parse_args(
        base + ["--replicas", "2", "--torch-threads", "1", "--oneshot-threads", "2"])))
    assert [(m.torch_threads, m.oneshot_torch_threads) for m in with_oneshot.models] == [(1, 2), (1, 2)]
    if topology == "fused":
        assert cfg.ingress.num_replicas == 2 and [m.num_replicas for m in cfg.models] == [1, 1]
        assert _needed_cpus(args) == 2  # each fused replica asks for the most CPUs of any model (1)
    else:
        assert cfg.ingress.num_replicas == 1 and [m.num_replicas for m in cfg.models] == [2, 2]
        assert _needed_cpus(args) == 0.5 + 2 * 2 * 1


def test_up_replicas_replace_a_models_autoscaling_and_keep_the_rest_of_the_config(tmp_path, models_dir):
    from serve.cli import _up_app_args, build_parser
    from serve.config import AppConfig

    path = config_file(tmp_path, (
        "models:\n"
        f"  - {{name: bsbr, path: {models_dir / 'bsbr'}, page_tokens: 256, torch_threads: 2,\n"
        "     autoscaling_config: {min_replicas: 1, max_replicas: 3}}\n"
        "sessions: {ttl_s: 120}\n"))
    cfg = AppConfig.model_validate(_up_app_args(build_parser().parse_args(["up", "--config", str(path)])))
    assert cfg.models[0].autoscaling_config is not None and cfg.models[0].num_replicas is None

    cfg = AppConfig.model_validate(_up_app_args(build_parser().parse_args(
        ["up", "--config", str(path), "--replicas", "3"])))
    m = cfg.models[0]
    assert (m.num_replicas, m.autoscaling_config, m.torch_threads, m.page_tokens) == (3, None, 2, 256)
    assert cfg.sessions.ttl_s == 120 and cfg.topology == "split"


@pytest.mark.parametrize("flag", ["--replicas", "--torch-threads", "--oneshot-threads"])
@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_up_refuses_a_replica_or_thread_count_below_one(flag, value, capsys):
    from serve.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["up", flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err
