"""bsbr_core: BSBR and baseline attention mechanisms as streamable document classifiers.

Public API (DESIGN.md section 2). Never imports Ray or `serve`.
"""
from bsbr_core.config import ModelConfig

__all__ = ["ModelConfig"]
