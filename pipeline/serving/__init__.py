"""Serving: the MLflow pyfunc model logged with every registered version (`pyfunc.py`)."""
