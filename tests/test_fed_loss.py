"""FedLoss (pipeline/models/fed_loss.py): class selection, sampling distribution, masked losses by hand, and the
heads wired to it (query head QFL + DN, ATSS focal, RoI softmax CE)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.fed_loss import FedLoss, fed_softmax_cross_entropy, fed_weights
from pipeline.models.losses import quality_focal_loss, sigmoid_focal_loss


def test_selection_holds_every_gt_class_and_tops_up_to_k() -> None:
    g = torch.Generator().manual_seed(0)
    fed = FedLoss(30, num_sample=5, weight=torch.arange(1.0, 31.0))
    for trial in range(50):
        gt = torch.randint(0, 30, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g)
        labels = torch.cat([gt, torch.full((7,), 30)])  # + background labels (nc), ignored
        mask = fed.class_mask(labels, generator=g)
        assert mask.shape == (30,) and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert bool(mask[gt].all()), f"trial {trial}: a GT class is not selected"
        assert int(mask.sum()) == 5  # GT classes + sampled = 5
    many = torch.arange(0, 24, 2)  # 12 GT classes > k = 5: exactly the GT classes, nothing sampled
    mask = fed.class_mask(many, generator=g)
    assert mask.nonzero().squeeze(1).tolist() == many.tolist()


def test_zero_weight_classes_are_never_sampled() -> None:
    w = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0, 3.0])
    fed = FedLoss(6, num_sample=5, weight=w)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        mask = fed.class_mask(torch.tensor([2]), generator=g)  # a GT class of weight 0 is still selected
        assert mask.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 1.0]


def test_sampling_follows_the_weights() -> None:
    """k = 1 draw with no GT: P(c) = w_c / sum w. Then 2 draws without replacement after GT class 0: inclusion
    probabilities of successive sampling (torch.multinomial without replacement, detectron2 / Detic)."""
    n = 20000
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    g = torch.Generator().manual_seed(2)
    one = FedLoss(5, num_sample=1, weight=w)
    freq = sum(one.class_mask(torch.zeros(0, dtype=torch.long), generator=g) for _ in range(n)) / n
    p = w / w.sum()
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() < 4.5 * sigma).all(), (freq, p)

    three = FedLoss(5, num_sample=3, weight=w)
    freq = sum(three.class_mask(torch.tensor([0]), generator=g) for _ in range(n)) / n
    rest = {c: float(w[c]) for c in range(1, 5)}
    exact = dict.fromkeys(rest, 0.0)
    for a, b in itertools.permutations(rest, 2):  # ordered pairs (first, second draw)
        total = sum(rest.values())
        pr = rest[a] / total * rest[b] / (total - rest[a])
        exact[a] += pr
        exact[b] += pr
    assert freq[0] == 1.0
    for c, pc in exact.items():
        assert abs(float(freq[c]) - pc) < 4.5 * math.sqrt(pc * (1 - pc) / n), (c, float(freq[c]), pc)


def test_weights_are_sqrt_image_counts() -> None:
    assert fed_weights([4, 9, 0], 3).tolist() == [2.0, 3.0, 0.0]
    assert fed_weights((), 4).tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="needs 3 image counts"):
        fed_weights([1, 2], 3)


def _bce(z: float, t: float) -> float:
    return -(t * math.log(1 / (1 + math.exp(-z))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-z))))


def _sig(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def test_masked_losses_equal_a_hand_computation() -> None:
    logits = [[0.5, -1.0, 2.0], [-0.3, 0.8, -2.0]]
    labels = [1, 3]  # sample 0: class 1 with IoU target 0.6; sample 1: background
    mask = [1.0, 0.0, 1.0]  # class 1 not selected (e.g. another image's class was not sampled)
    z, y, m = torch.tensor(logits), torch.tensor(labels), torch.tensor(mask)

    # QFL: BCE(z, 0) * sigmoid(z)^2 for negatives, BCE(z, s) * |s - sigmoid(z)|^2 for the positive, masked sum
    def qfl_entry(i: int, c: int) -> float:
        zz = logits[i][c]
        if labels[i] == c:
            return _bce(zz, 0.6) * abs(0.6 - _sig(zz)) ** 2
        return _bce(zz, 0.0) * _sig(zz) ** 2

    hand = [sum(mask[c] * qfl_entry(i, c) for c in range(3)) for i in range(2)]
    got = quality_focal_loss(z, y, torch.tensor([0.6, 0.0]), beta=2.0, class_weight=m)
    assert got.tolist() == pytest.approx(hand, rel=1e-6)
    # the positive's own class is unselected here, so its term is gone: sample 0 = classes 0 and 2 only
    assert hand[0] == pytest.approx(qfl_entry(0, 0) + qfl_entry(0, 2))

    # sigmoid focal (ATSS): alpha 0.25, gamma 2, weight (N, C) = label weight x mask, sum / avg_factor
    def focal_entry(i: int, c: int) -> float:
        p, t = _sig(logits[i][c]), 1.0 if labels[i] == c else 0.0
        pt = p if t else 1 - p
        alpha = 0.25 if t else 0.75
        return alpha * (1 - pt) ** 2 * _bce(logits[i][c], t)

    hand_focal = sum(mask[c] * focal_entry(i, c) for i in range(2) for c in range(3)) / 2.0
    got_focal = sigmoid_focal_loss(z, y, torch.ones(2, 1) * m, avg_factor=2.0)
    assert float(got_focal) == pytest.approx(hand_focal, rel=1e-5)

    # RoI softmax CE over selected classes + background (nc = 3, bg = 3): scores (R, 4)
    scores = [[1.0, 0.2, -0.5, 0.3], [0.1, 2.0, 0.4, -1.0]]
    roi_labels = [0, 3]
    roi_mask = [1.0, 0.0, 1.0]
    keep = [0, 2, 3]
    hand_ce = [-(scores[i][roi_labels[i]] - math.log(sum(math.exp(scores[i][c]) for c in keep))) for i in range(2)]
    got_ce = fed_softmax_cross_entropy(torch.tensor(scores), torch.tensor(roi_labels), torch.tensor(roi_mask))
    assert got_ce.tolist() == pytest.approx(hand_ce, rel=1e-6)
    full = fed_softmax_cross_entropy(torch.tensor(scores), torch.tensor(roi_labels), torch.ones(3))
    assert torch.allclose(full, F.cross_entropy(torch.tensor(scores), torch.tensor(roi_labels), reduction="none"))


@pytest.fixture(scope="module")
def fed_models():
    """The tiny Co-DINO (K = 2: Faster R-CNN + ATSS) without FedLoss, with FedLoss selecting every class, and with
    FedLoss selecting the GT classes + 1; same weights."""
    from test_model_core import tiny_config

    from pipeline.models import build_model

    aux = {"aux_heads": ["atss", "faster_rcnn"], "atss": {"strides": [8, 16, 32, 64, 128]},
           "faster_rcnn": {"strides": [8, 16, 32, 64, 128], "roi_finest_scale": 112, "roi_num_samples": 64,
                           "roi_fc_dim": 64, "rpn_nms_pre": 200, "rpn_max_per_img": 100}}  # fmt: skip
    torch.manual_seed(0)
    plain = build_model(tiny_config(co=aux))
    counts = list(range(80))
    every = build_model(tiny_config(co=aux, loss={"fed_loss": True, "fed_loss_num_classes": 80,
                                                  "fed_loss_image_counts": counts}))  # fmt: skip
    few = build_model(tiny_config(co=aux, loss={"fed_loss": True, "fed_loss_num_classes": 3,
                                                "fed_loss_image_counts": counts}))  # fmt: skip
    for m in (every, few):
        m.load_state_dict(plain.state_dict(), strict=False)
    return plain, every, few


def _losses(model, seed: int = 3) -> dict[str, float]:
    from test_model_core import _targets

    torch.manual_seed(seed)
    images = torch.randn(2, 3, 64, 96)
    targets = _targets([3, 2], seed=seed)
    for t in targets:
        t["labels"] = t["labels"] % 4  # GT classes within 0..3
    torch.manual_seed(seed)
    with torch.no_grad():
        return {k: float(v) for k, v in model.train()(images, None, targets).items()}


def test_heads_carry_fed_loss_buffers(fed_models) -> None:
    plain, every, few = fed_models
    keys = [k for k in few.state_dict() if k.endswith("fed_loss_weight")]
    assert sorted(keys) == ["aux_heads.0.roi_head.bbox_head.fed_loss.fed_loss_weight",
                            "aux_heads.1.fed_loss.fed_loss_weight", "head.fed_loss.fed_loss_weight"]  # fmt: skip
    assert torch.allclose(few.head.fed_loss.fed_loss_weight, torch.arange(80.0).sqrt())
    assert not any(k.endswith("fed_loss_weight") for k in plain.state_dict())


def test_fed_loss_restricts_only_the_class_losses(fed_models) -> None:
    plain, every, few = fed_models
    base, full, sub = _losses(plain), _losses(every), _losses(few)
    # every class selected: the query head (matching, encoder, DN) and ATSS losses are unchanged (the RoI head's
    # and RPN random samplers draw after the FedLoss draws, so their losses and the aux queries differ; the
    # masked RoI CE is compared by the unit test above)
    random_after = ("loss_cls0", "loss_bbox0", "loss_rpn")
    same = [k for k in base if "loss" in k and "_aux" not in k and not k.startswith(random_after)]
    assert "loss_cls" in same and "dn_loss_cls" in same and "loss_cls1" in same
    for k in same:
        assert full[k] == pytest.approx(base[k], rel=1e-5, abs=1e-7), k
    # 3 classes per call (the GT classes, <= 4, + samples up to 3): fewer negative terms, smaller class losses
    for k in ("loss_cls", "d0.loss_cls", "enc_loss_cls", "dn_loss_cls", "loss_cls1", "loss_cls0"):
        assert sub[k] < full[k], (k, sub[k], full[k])
    for k in ("loss_bbox", "loss_iou", "dn_loss_bbox", "loss_bbox1"):
        assert sub[k] == pytest.approx(base[k], rel=1e-5), k
