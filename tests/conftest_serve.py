"""Shared fixtures of the serve tests (import the ones you use from here).

One Ray cluster and one Serve application serve every HTTP test of the
session: starting them costs most of a minute on two cores. They are
process-wide singletons (pytest would otherwise build a session fixture
once per importing module) and shut down at the end of the session.
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from serve.devmodels import sample_text, write_random_models

# A standard-model limit low enough that a test document crosses it.
STANDARD_MAX_TOKENS = 3000
MAX_SESSIONS = 60
MAX_BODY_BYTES = 1 << 20
PAGE_TOKENS = 64
# PDF bodies: glpk's 177-page manual fits, a 201-page PDF does not; the
# deadline is long enough for a manual on a loaded machine and short enough
# that the hostile PDF's test waits for it.
MAX_PDF_PAGES = 200
PDF_TIMEOUT_S = 8.0
PDF_MEMORY_BYTES = 512 << 20
# The serve tests' equivalence tolerance (one-shot, session, stream and
# in-process logits agree within it), and the weight scale of their models:
# large enough that a document's logits, and a lost page, show far above it.
LOGIT_TOL = 1e-4
WEIGHT_SCALE = 3.0

_singletons: dict[str, object] = {}


def free_port() -> int:
    """A free port outside the kernel's ephemeral range (serve.cli.free_port):
    a server that binds it after Ray has started cannot find it taken by one of
    Ray's own sockets."""
    from serve.cli import free_port as pick

    return pick()


def wait_ready(url: str, timeout_s: float, alive=lambda: True) -> bool:
    """Poll url/readyz until it answers 200 (True), the time is up or alive() is False."""
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline and alive():
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def document(n_pages: int, words_per_page: int = 20, seed: int = 0) -> list[str]:
    """n_pages pages of generated sentences."""
    rng = random.Random(seed)
    return [sample_text(rng, words_per_page) for _ in range(n_pages)]


def logit_spread(path: Path) -> dict[str, float]:
    """How far the model at `path` tells documents apart, in its one-shot logits:
    `across_documents`, the smallest over labels of the std across 8 documents
    of 4 pages, and `lost_page`, the largest move of a 30-page document's
    logits when one of its pages (about 24 tokens) is left out."""
    import torch

    from bsbr_core import load_model

    model, tok = load_model(path)

    def logits(pages: list[str]) -> torch.Tensor:
        ids = [i for p in pages for i in tok.encode(p, add_special_tokens=False).ids]
        with torch.no_grad():
            return model(torch.tensor([ids]))[0].double()

    docs = torch.stack([logits(document(4, seed=100 + k)) for k in range(8)])
    pages = document(30, words_per_page=8, seed=7)
    lost = logits(pages[:15] + pages[16:]) - logits(pages)
    return {"across_documents": float(docs.std(0).min()), "lost_page": float(lost.abs().max())}


@pytest.fixture(scope="session")
def dev_models(tmp_path_factory) -> Path:
    """Tiny random bsbr and standard models (milliseconds per page), with weights
    large enough that the equivalence checks (LOGIT_TOL) mean something: the
    training initialisation gives every document logits of about 0.02, and
    losing one of 30 pages moved them by only 8-12x the tolerance. A flat model fails here."""
    if "models" not in _singletons:
        root = tmp_path_factory.mktemp("models")
        write_random_models(root, ("bsbr", "standard"), size="tiny", weight_scale=WEIGHT_SCALE)
        for name in ("bsbr", "standard"):
            spread = logit_spread(root / name)
            assert min(spread.values()) > 100 * LOGIT_TOL, f"{name}: logits too flat to test equivalence: {spread}"
        _singletons["models"] = root
    return _singletons["models"]  # type: ignore[return-value]


def app_args(models: Path, store_name: str) -> dict:
    return {
        "models": [
            {"name": "bsbr", "path": str(models / "bsbr"), "num_replicas": 2, "page_tokens": PAGE_TOKENS,
             "ray_actor_options": {"num_cpus": 0.25}, "max_batch_size": 8},
            {"name": "standard", "path": str(models / "standard"), "num_replicas": 1, "page_tokens": PAGE_TOKENS,
             "max_tokens": STANDARD_MAX_TOKENS, "ray_actor_options": {"num_cpus": 0.25}},
        ],
        "sessions": {"ttl_s": 600, "max_sessions": MAX_SESSIONS, "store_name": store_name},
        # replica_timeout_s: the suite loads 2 cores; its deadline is tested on an app of its own.
        "http": {"max_body_bytes": MAX_BODY_BYTES, "retry_s": 60, "replica_timeout_s": 30, "max_pdf_pages": MAX_PDF_PAGES,
                 "pdf_timeout_s": PDF_TIMEOUT_S, "pdf_memory_bytes": PDF_MEMORY_BYTES, "pdf_workers": 1},
        "ingress": {"ray_actor_options": {"num_cpus": 0.25}},
    }


@pytest.fixture(scope="session")
def serve_cluster(request, dev_models) -> dict:
    """A local Ray (2 logical CPUs' worth of small replicas) running the app on 127.0.0.1.

    Returns {"url", "http_port", "metrics_port", "models", "app_name"}."""
    if "cluster" in _singletons:
        return _singletons["cluster"]  # type: ignore[return-value]
    import ray
    from ray import serve

    from serve.app import build_app

    http_port, metrics_port = free_port(), free_port()
    from serve.cli import ray_env_defaults

    ray_env_defaults()  # as bsbr-serve up does: the suite itself loads 2 cores
    ray.init(
        address="local", num_cpus=4, include_dashboard=False, _metrics_export_port=metrics_port,
        object_store_memory=200 << 20, logging_level="warning", log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )

    def shutdown():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            _singletons.pop("cluster", None)

    request.addfinalizer(shutdown)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    store_name = f"test_store_{os.getpid()}"
    serve.run(build_app(app_args(dev_models, store_name)), name="bsbr", route_prefix="/")
    url = f"http://127.0.0.1:{http_port}"
    if not wait_ready(url, 120):
        pytest.fail("the test application never became ready")
    info = {"url": url, "http_port": http_port, "metrics_port": metrics_port, "models": dev_models,
            "app_name": "bsbr", "store_name": store_name}
    _singletons["cluster"] = info
    return info


@pytest.fixture
def client(serve_cluster):
    import httpx

    with httpx.Client(base_url=serve_cluster["url"], timeout=120) as c:
        yield c
