"""The ``demo`` part of benchmarks/reconstruction_study.py on the smoke config: the subjects are the demo's, the
sinograms are scored in the demo's ToNNO geometry, and Dice of a reconstruction from the true plane integrals
(the oracle) finds the lesion, so the masks line up with the heatmaps' axes."""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("nilearn")

import tonno_fast as tf  # noqa: E402
from tonno_fast.demo.data import load_template  # noqa: E402
from tonno_fast.demo.run import QUICK  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reconstruction_study as study  # noqa: E402


@pytest.fixture(scope="module")
def quick():
    template = load_template(QUICK.resolution)
    return template, study.demo_subjects("test", QUICK, template)


def test_demo_subjects_are_the_positives(quick):
    template, test = quick
    assert len(test) == round(QUICK.n_test * QUICK.test_positive_fraction)
    selection = study.demo_subjects("selection", QUICK, template)
    assert selection and all(s.label == 1 and s.lesion.any() for s in selection + test)
    # different subjects: no selection image equals a test image
    assert not any((a.image == b.image).all() for a in selection for b in test)
    with pytest.raises(ValueError, match="which"):
        study.demo_subjects("train", QUICK, template)


def test_demo_cases_use_the_demo_geometry(quick):
    _, test = quick
    calls = []

    def encoder(x):  # (M, C, h, w) -> (M,)
        calls.append(x.shape[0])
        return x.mean(dim=(-3, -2, -1))

    cases = study.demo_cases(test[:1], encoder, QUICK, directions=(4, 8))
    (case,) = cases
    vol = torch.from_numpy(test[0].image)
    for n in (4, 8):
        sino, g = case["sinograms"][n]
        assert sino.shape == (1, 1, n, QUICK.n_slices)
        assert (g.height, g.width) == (QUICK.slice_size, QUICK.slice_size)
        assert g.pixel_spacing == g.slice_spacing == QUICK.pixel_spacing
        assert tuple(g.spacing) == tuple(test[0].spacing) and tuple(g.volume_shape) == tuple(vol.shape)
        torch.testing.assert_close(sino, tf.encode_slices(vol[None, None], g, encoder))
    assert sum(calls) == 2 * (4 + 8) * QUICK.n_slices  # scored once per direction count (and once more above)
    assert torch.equal(case["mask"], torch.from_numpy(test[0].lesion)) and case["mask"].dtype == torch.bool
    assert torch.equal(case["body_mask"], torch.from_numpy(test[0].brain))


def test_dice_study_finds_the_lesion_from_true_plane_integrals(quick):
    _, test = quick
    cases = study.demo_cases(test, lambda x: x.mean(dim=(-3, -2, -1)), QUICK, directions=(16,))
    for c in cases:  # the oracle: scores = plane integrals of the lesion mask
        _, g = c["sinograms"][16]
        c["sinograms"][16] = (tf.radon(c["mask"].float()[None, None], g), g)
    rows = study.dice_study(cases, {"fbp": ("fbp", {}), "fista": ("fista", dict(iterations=20))})
    dice = {r["method"]: r["dice_best"] for r in rows}
    assert dice["fbp"] > 0.5 and dice["fista"] > 0.5, dice
