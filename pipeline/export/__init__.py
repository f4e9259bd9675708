"""Exporting the deployed model: ONNX (`onnx.py`)."""
