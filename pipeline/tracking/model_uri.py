"""MLflow model URI spelling, without MLflow (used by the tracking, serving and export code alike)."""


def normalize_model_uri(uri: str) -> str:
    """`models:/name@latest` -> `models:/name/latest` (MLflow's built-in; "latest" cannot be an alias)."""
    if uri.startswith("models:/") and uri.lower().endswith("@latest"):
        return uri[: -len("@latest")] + "/latest"
    return uri
