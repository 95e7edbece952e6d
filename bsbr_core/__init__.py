"""bsbr_core: BSBR and baseline attention mechanisms as streamable document classifiers.

Public API (docs/architecture.md section 2). Never imports Ray or `serve`.
"""
from bsbr_core.compat import BSBRAttention, BSBRLayer, BSBRModel
from bsbr_core.config import ARCHS, ModelConfig
from bsbr_core.errors import InputError, StateError
from bsbr_core.io import load_config, load_model, save_model
from bsbr_core.model import DocumentClassifier, build_model
from bsbr_core.state import State

__all__ = [
    "ARCHS", "BSBRAttention", "BSBRLayer", "BSBRModel", "DocumentClassifier", "InputError", "ModelConfig",
    "State", "StateError", "build_model", "load_config", "load_model", "save_model",
]
