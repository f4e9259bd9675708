"""Collaborative auxiliary heads of Co-DETR: the multi-scale adapter, one file per one-to-many head, and the
table of heads (`table.py`, torch-free: config classes, builders, base loss weights, class parameters, the
authors' key names). Import the modules directly (`from pipeline.models.aux_heads.base import AuxHead`); this
package file imports nothing so that configs can read the table without importing torch."""
