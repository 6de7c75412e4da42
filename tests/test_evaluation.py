"""Dice, IoU and thresholds against hand-made masks."""
import numpy as np
import pytest
import torch

import tonno_fast
from tonno_fast.evaluation import (dice, evaluate_heatmap, evaluate_heatmaps, iou, otsu_threshold,
                                   quantile_threshold, roc_auc, threshold_sweep)


def _box(shape, sl):
    m = np.zeros(shape, dtype=bool)
    m[sl] = True
    return m


def test_dice_and_iou_by_hand():
    a = _box((4, 4, 4), np.s_[0:2, 0:2, 0:2])  # 8 voxels
    b = _box((4, 4, 4), np.s_[1:3, 0:2, 0:2])  # 8 voxels, 4 shared
    assert dice(a, b) == pytest.approx(2 * 4 / 16)
    assert iou(a, b) == pytest.approx(4 / 12)
    assert dice(a, a) == 1.0 and iou(a, a) == 1.0
    assert dice(a, ~a) == 0.0
    empty = np.zeros((4, 4, 4), dtype=bool)
    assert dice(empty, empty) == 1.0 and dice(a, empty) == 0.0
    assert dice(torch.from_numpy(a), torch.from_numpy(b).float()) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        dice(a, np.zeros((4, 4, 3), dtype=bool))
    with pytest.raises(ValueError, match="0/1"):
        dice(a, np.full((4, 4, 4), 0.5))


def test_threshold_sweep_finds_the_exact_cut():
    truth = _box((6, 6, 6), np.s_[1:3, 1:3, 1:4])  # 12 voxels
    heat = np.zeros((6, 6, 6))
    heat[truth] = 2.0
    heat[0, 0, :3] = 3.0  # 3 false positives above the lesion
    heat[5, 5, 5] = 1.0
    res = threshold_sweep(heat, truth)
    # Cuts: {3}: 0; {3,2}: 2*12/(15+12) = 0.889; {3,2,1}: 24/28 = 0.857 -> best is t = 2.
    assert res["threshold"] == 2.0
    assert res["dice"] == pytest.approx(24 / 27)
    assert res["iou"] == pytest.approx(12 / 15)
    # Brute force over all distinct values agrees.
    brute = max(dice(heat >= t, truth) for t in np.unique(heat))
    assert res["dice"] == pytest.approx(brute)


def test_body_mask_restricts_threshold_and_scores():
    truth = _box((5, 5, 5), np.s_[2, 2, 1:4])
    body = _box((5, 5, 5), np.s_[1:4, 1:4, 1:4])
    heat = np.zeros((5, 5, 5))
    heat[truth] = 1.0
    heat[0, 0, 0] = 5.0  # outside the body: must be ignored
    assert threshold_sweep(heat, truth, body_mask=body)["dice"] == 1.0
    # Without the body mask the outside voxel cannot be cut away from the lesion: 2*3 / (4 + 3).
    assert threshold_sweep(heat, truth)["dice"] == pytest.approx(6 / 7)
    r = evaluate_heatmap(heat, truth, body_mask=body, quantiles=(0.5,))
    assert r["best"]["dice"] == 1.0
    assert r["otsu"]["dice"] == 1.0  # two clean levels inside the body
    assert set(r) == {"best", "otsu", "q0.5"}


def test_otsu_and_quantile_by_hand():
    vals = np.concatenate([np.zeros(90), np.ones(10)]).reshape(4, 5, 5)
    t = otsu_threshold(vals)
    assert 0.0 < t <= 1.0
    assert ((vals >= t).sum()) == 10
    q = quantile_threshold(np.arange(100.0).reshape(4, 5, 5), 0.9)
    assert q == pytest.approx(89.1)
    with pytest.raises(ValueError, match="q must be"):
        quantile_threshold(vals, 1.5)


def test_evaluate_heatmaps_averages():
    t1 = _box((4, 4, 4), np.s_[0:2, 0:2, 0:2])
    t2 = _box((4, 4, 4), np.s_[2:4, 2:4, 2:4])
    perfect = t1.astype(float)
    half = np.zeros((4, 4, 4))
    half[2:4, 2:4, 2] = 1.0  # 4 of 8 voxels, no false positive: best Dice 8/12
    out = evaluate_heatmaps([perfect, half], [t1, t2], otsu=False, quantiles=())
    assert out["per_volume"][0]["best"]["dice"] == 1.0
    assert out["per_volume"][1]["best"]["dice"] == pytest.approx(8 / 12)
    assert out["mean"]["best"]["dice"] == pytest.approx((1 + 8 / 12) / 2)
    with pytest.raises(ValueError, match="no positive voxel"):
        threshold_sweep(perfect, np.zeros((4, 4, 4), dtype=bool))


def test_roc_auc_matches_pairwise_definition():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (60,), generator=g).double()  # ties on purpose
    y = torch.rand(60, generator=g) > 0.4
    pos, neg = s[y], s[~y]
    pairs = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
    assert abs(roc_auc(s, y) - float(pairs.mean())) < 1e-12
    assert tonno_fast.roc_auc is roc_auc  # public at the top level


def test_roc_auc_by_hand_and_bad_input():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc(np.array([3.0, 1.0]), np.array([True, False])) == 1.0
    assert roc_auc([1.0, 1.0, 1.0], [0, 1, 1]) == 0.5  # all tied
    with pytest.raises(ValueError, match="both positive and negative"):
        roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="same length"):
        roc_auc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0.1, float("nan")], [0, 1])
