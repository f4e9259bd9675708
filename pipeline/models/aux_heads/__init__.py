"""Collaborative auxiliary heads of Co-DETR: the multi-scale adapter and one file per one-to-many head."""

from pipeline.models.aux_heads.base import AuxHead, AuxPositives

__all__ = ["AuxHead", "AuxPositives"]
