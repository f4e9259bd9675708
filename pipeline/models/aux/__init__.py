"""Collaborative auxiliary heads of Co-DETR (ATSS, Faster R-CNN) and the multi-scale adapter."""

from pipeline.models.aux.base import AuxHead, AuxPositives

__all__ = ["AuxHead", "AuxPositives"]
