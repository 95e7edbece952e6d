"""The Serve application builder: `import_path: serve.app:build_app`.

Deployments: the ingress `api` and one per model, named by the model
(`bsbr`, `standard`, ...), each with its own replicas / autoscaling /
ray_actor_options (num_gpus included), so a Serve config YAML's
`deployments:` overrides address them by those names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application

from serve.api import Api, FusedApi
from serve.config import AppConfig, ModelSpec, check_model_dirs
from serve.deployments import ModelServer
from serve.router import ROUTER_PATH, haproxy_ingress


def model_deployment_options(spec: ModelSpec) -> dict[str, Any]:
    from ray.serve.config import RequestRouterConfig

    opts: dict[str, Any] = {
        "name": spec.name,
        "ray_actor_options": dict(spec.ray_actor_options),
        "max_ongoing_requests": spec.max_ongoing_requests,
        "max_queued_requests": spec.max_queued_requests,
    }
    if spec.autoscaling_config is not None:
        opts["autoscaling_config"] = spec.autoscaling_config
    elif spec.num_replicas is not None:
        opts["num_replicas"] = spec.num_replicas
    if spec.session_routing:
        opts["request_router_config"] = RequestRouterConfig(request_router_class=ROUTER_PATH)
    return opts


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Build the application from `args` (validated as serve.config.AppConfig)."""
    cfg = AppConfig.model_validate(args or {}).with_discovered_models()
    # Relative paths are resolved here, where the config was written.
    cfg = cfg.model_copy(update={"models": [
        m.model_copy(update={"path": str(Path(m.path).resolve())}) for m in cfg.models
    ]})
    check_model_dirs(cfg)
    if cfg.topology == "fused":
        return fused_app(cfg)
    sessions = cfg.sessions.model_dump()
    models = {
        spec.name: ModelServer.options(**model_deployment_options(spec)).bind(spec.name, spec.model_dump(), sessions)
        for spec in cfg.models
    }
    ingress = Api.options(
        name="api",
        num_replicas=cfg.ingress.num_replicas,
        ray_actor_options=dict(cfg.ingress.ray_actor_options),
        max_ongoing_requests=cfg.ingress.max_ongoing_requests,
    )
    return ingress.bind(models, cfg.model_dump(mode="json"))


def fused_resources(cfg: AppConfig) -> dict[str, Any]:
    """A fused replica's ray_actor_options: the ingress's, with the most CPUs and
    GPUs that any one model asks for (the models share them, as they share
    the process)."""
    opts = dict(cfg.ingress.ray_actor_options)
    for key in ("num_cpus", "num_gpus"):
        most = max([float(m.ray_actor_options.get(key, 0) or 0) for m in cfg.models] + [float(opts.get(key, 0) or 0)])
        if most:
            opts[key] = most
    return opts


def fused_app(cfg: AppConfig) -> Application:
    from ray.serve.config import RequestRouterConfig

    opts: dict[str, Any] = {
        "name": "api",
        "num_replicas": cfg.ingress.num_replicas,
        "ray_actor_options": fused_resources(cfg),
        "max_ongoing_requests": cfg.ingress.max_ongoing_requests,
        # Beyond it Serve's proxy refuses at once, with split's status and header
        # (429 + Retry-After; the body is Serve's text, not our JSON error).
        "max_queued_requests": max(m.max_queued_requests for m in cfg.models),
        "backpressure_config": {"status_code": 429, "retry_after_s": 1.0},
    }
    # Under Serve's HAProxy ingress, HAProxy keeps a session on one replica
    # (serve.router.HAPROXY_SESSION_BALANCE) and Serve refuses a router here.
    if any(m.session_routing for m in cfg.models) and not haproxy_ingress():
        opts["request_router_config"] = RequestRouterConfig(request_router_class=ROUTER_PATH)
    return FusedApi.options(**opts).bind(cfg.model_dump(mode="json"))
