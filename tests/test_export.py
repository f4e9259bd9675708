"""ONNX export of the deployed model: onnxruntime matches the eager model (boxes within 1e-2 px, scores within
1e-4) at batch sizes and image sizes other than the traced ones, padded or not; the graph's top-k equals the
model's own post-processing; with --nms hard the graph keeps exactly the eager class-aware hard NMS detections."""

from __future__ import annotations

import copy
import dataclasses
import os
import time

import numpy as np
import pytest
import torch

from pipeline.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


EXAMPLE = (96, 128)  # the traced size; the parity checks use others


def _tiny_deployed():
    from pipeline.inference.model_io import deployed_model
    from pipeline.models import build_model

    cfg = load_config(os.path.join(REPO, "configs/model/co_dino_tiny.yaml"), ["model.num_classes=3"]).model
    torch.manual_seed(0)
    return deployed_model(build_model(cfg).eval())  # trained with K=2, deployed without the aux heads


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from pipeline.export.onnx import export_onnx

    model = _tiny_deployed()
    path = str(tmp_path_factory.mktemp("onnx") / "model.onnx")
    info = export_onnx(model, path, example=EXAMPLE)
    print(f"\n[measured] export {info.seconds:.1f} s, opset {info.opset}, top-k {info.topk}")
    return model, info


def _images(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


# (image sizes of one batch): the traced size alone; mixed sizes padded to a larger input than traced; a batch of
# one at a size never seen, wider than tall; the smallest side the graph takes (65)
BATCHES = ([EXAMPLE], [(96, 120), (70, 128), (50, 64)], [(150, 200), (201, 133)], [(230, 90)], [(65, 65), (65, 70)])


def test_onnx_matches_eager_at_other_batch_and_image_sizes(exported):
    import onnx

    from pipeline.export.onnx import check_parity, padded_batch

    model, info = exported
    graph = onnx.load(info.path)
    assert graph.opset_import[0].version >= 17
    assert [i.name for i in graph.graph.input] == ["images", "img_sizes"]
    dims = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3])), dims  # B, H, W symbolic
    assert any(n.op_type == "GridSample" for n in graph.graph.node)  # deformable attention's grid_sample path
    for seed, sizes in enumerate(BATCHES):
        images, img_sizes = padded_batch(_images(sizes, seed))
        report = check_parity(model, info.path, images, img_sizes)
        print(f"[measured] input {tuple(images.shape)}: {report}")
        assert report["max_box_diff_px"] < 1e-2 and report["max_score_diff"] < 1e-4 and report["labels_equal"]


def test_topk_graph_equals_model_postprocess_without_nms(exported):
    from pipeline.export.onnx import TopKDetector, padded_batch
    from pipeline.models.query_head.postprocess import detr_topk

    model, info = exported
    images, sizes = padded_batch(_images([(80, 100)], 4), EXAMPLE)
    with torch.no_grad():
        boxes, scores, labels = TopKDetector(model)(images, sizes)
        out = model.run(images, sizes)
    want = detr_topk(out.logits[-1][0], out.boxes[-1][0], (80, 100), topk=info.topk)
    np.testing.assert_allclose(boxes[0].numpy(), want["boxes"].numpy(), atol=1e-4)
    np.testing.assert_allclose(scores[0].numpy(), want["scores"].numpy(), atol=1e-6)
    assert torch.equal(labels[0], want["labels"])


def test_hard_nms_inside_the_graph_keeps_the_eager_detections(exported, tmp_path):
    """--nms hard is the exported network joined to a small NMS graph (`append_hard_nms`, what `export_onnx(...,
    nms="hard")` does after the network export): it keeps exactly the eager class-aware hard NMS detections."""
    import onnx

    from pipeline.export.onnx import append_hard_nms, check_parity, padded_batch

    model, info = exported
    # a low IoU threshold so that NMS removes many of the random model's overlapping top-k boxes
    model = copy.copy(model)
    model.test_cfg = dataclasses.replace(model.test_cfg, iou_threshold=0.3)
    path = str(tmp_path / "nms.onnx")
    t0 = time.perf_counter()
    append_hard_nms(info.path, path, model.num_classes, model.test_cfg.iou_threshold)
    took = time.perf_counter() - t0
    graph = onnx.load(path)
    assert [i.name for i in graph.graph.input] == ["images", "img_sizes"]
    assert [o.name for o in graph.graph.output] == ["batch_index", "boxes", "scores", "labels"]
    assert any(n.op_type == "NonMaxSuppression" for n in graph.graph.node)
    for seed, sizes in enumerate(([(120, 90), (75, 140)], [(200, 160)])):
        images, img_sizes = padded_batch(_images(sizes, 7 + seed))
        report = check_parity(model, path, images, img_sizes)
        print(f"[measured] NMS graph appended in {took:.1f} s; input {tuple(images.shape)}: {report}")
        assert all(0 < k < info.topk for k in report["kept"])  # NMS kept some and removed some in each image
        assert report["max_box_diff_px"] < 1e-2 and report["max_score_diff"] < 1e-4 and report["labels_equal"]


def test_mask_downsampling_equals_interpolate():
    """The padding mask's nearest downsampling is written out (`layers.padding_mask.downsample_mask`: the exporter's
    Resize keeps the traced scale factors); it must equal F.interpolate's nearest rule at every size and stride."""
    import torch.nn.functional as F

    from pipeline.models.layers.padding_mask import downsample_mask

    g = torch.Generator().manual_seed(0)
    for big_h in range(65, 1400, 37):
        for big_w in range(65, 1400, 53):
            mask = torch.zeros(1, big_h, big_w, dtype=torch.bool)
            mask[:, int(torch.randint(1, big_h, (1,), generator=g)):] = True
            mask[:, :, int(torch.randint(1, big_w, (1,), generator=g)):] = True
            for stride in (8, 16, 32, 64, 128):
                h, w = (big_h - 1) // stride + 1, (big_w - 1) // stride + 1
                want = F.interpolate(mask[None].float(), size=(h, w)).bool()[0]
                assert torch.equal(downsample_mask(mask, h, w), want), (big_h, big_w, stride)


@pytest.mark.slow  # ~150 s export: the ViT + SFP path of the exporter (windowed attention, resized abs. pos. embed)
def test_vit_model_exports_with_dynamic_size(tmp_path):
    from test_vit_keyfit import SMALL_VIT

    from pipeline.export.onnx import check_parity, export_onnx, padded_batch
    from pipeline.inference.model_io import deployed_model
    from pipeline.models import build_model

    overrides = ["model.num_classes=3", "model.transformer.num_encoder_layers=1",
                 "model.transformer.num_decoder_layers=1", "model.transformer.num_queries=50", "model.test.topk=50",
                 *SMALL_VIT]
    cfg = load_config(os.path.join(REPO, "configs/model/co_dino_vit_l.yaml"), overrides).model
    torch.manual_seed(0)
    model = deployed_model(build_model(cfg).eval())
    info = export_onnx(model, str(tmp_path / "vit.onnx"), example=(160, 160))
    for seed, sizes in enumerate(([(160, 160)], [(224, 192)], [(128, 256), (100, 200)])):
        report = check_parity(model, info.path, *padded_batch(_images(sizes, seed)))
        print(f"[measured] ViT export {info.seconds:.1f} s; sizes {sizes}: {report}")
        assert report["max_box_diff_px"] < 1e-2 and report["max_score_diff"] < 1e-4 and report["labels_equal"]
