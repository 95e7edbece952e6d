"""Shared helpers of the deploy tests (tests/test_deploy_*.py)."""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SERVE_CONFIGS = {"gpu": DEPLOY / "serve_config.yaml", "cpu": DEPLOY / "serve_config.cpu.yaml"}


def load_yaml(path: Path) -> Any:
    with open(path) as f:
        return yaml.safe_load(f)


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (Optional[X], List[X], Union[Dict, X], ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _model_classes(arg)]


def unknown_keys(model: type[BaseModel], raw: Any, where: str = "") -> list[str]:
    """Keys of `raw` that `model` does not define, recursively.

    Ray's ServeDeploySchema ignores unknown keys (for forward compatibility),
    so a misspelt `autoscaling_confg` would validate and silently do nothing;
    this walks the same models and reports such keys.
    """
    if not isinstance(raw, dict):
        return []
    fields = model.model_fields
    by_name = dict(fields) | {f.alias: f for f in fields.values() if f.alias}
    bad = []
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in by_name:
            bad.append(path)
            continue
        for sub in _model_classes(by_name[key].annotation):
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                bad += unknown_keys(sub, item, f"{path}[{i}]" if isinstance(value, list) else path)
    return bad
