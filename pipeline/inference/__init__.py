"""Using a trained model: load it from any URI, turn images into detections, write them out.

    loaded = load_for_inference("models:/codetr-coco@champion")     # model + categories + preprocessing
    dets = Detector(loaded).predict([image_uint8_chw, ...])         # boxes in source pixels, names
    (jobs/predict.py runs the same Detector in a Ray Data actor pool over a folder, prefix or shard split.)

No Ray in this package except `ray_predict.py`, which only builds the Ray Data pipeline.
"""

from pipeline.inference.detector import Detector
from pipeline.inference.load import load_for_inference
from pipeline.inference.model_io import LoadedModel
from pipeline.inference.preprocess import PreprocessConfig

__all__ = ["Detector", "LoadedModel", "PreprocessConfig", "load_for_inference"]
