"""Co-DETR model package (pure PyTorch + timm + torchvision.ops; never imports ray).

`build_model(cfg.model)` and `ModelConfig` are exported lazily so that `import pipeline.models` stays cheap
(configs load without importing torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.models.co_detr import CoDETR, build_model
    from pipeline.models.config import ModelConfig

__all__ = ["CoDETR", "ModelConfig", "build_model"]


def __getattr__(name: str) -> Any:
    if name in ("build_model", "CoDETR"):
        from pipeline.models import co_detr

        return getattr(co_detr, name)
    if name == "ModelConfig":
        from pipeline.models.config import ModelConfig

        return ModelConfig
    raise AttributeError(f"module 'pipeline.models' has no attribute {name!r}")
