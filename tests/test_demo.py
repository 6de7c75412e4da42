"""The demo's subject generator (tiny size, no network) and the quick demo end to end."""
import json
import socket

import numpy as np
import pytest

pytest.importorskip("nilearn")

from tonno_fast.demo.data import load_template, make_population, make_subject  # noqa: E402


@pytest.fixture(scope="module")
def template():
    return load_template(6)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the demo tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_template_is_bundled_and_cropped(no_network):
    t = load_template(6)  # with the network blocked: the files ship inside nilearn's wheel
    assert t.spacing == (6.0, 6.0, 6.0)
    assert t.t1.shape == t.gm.shape == t.wm.shape == t.brain.shape
    assert 20 <= min(t.shape) and max(t.shape) <= 40  # cropped to the brain (+2 voxels) at 6 mm
    idx = np.argwhere(t.brain)
    assert (idx.min(0) <= 2).all() and (idx.max(0) >= np.array(t.shape) - 3).all()  # a tight crop
    assert t.wm[t.brain].mean() > t.wm[~t.brain].mean()
    # The affine maps the crop's first voxel (file order i, j, k) to MNI mm: the brain straddles the origin.
    centre = t.affine @ np.r_[np.array(t.shape[::-1]) / 2, 1]
    assert np.all(np.abs(centre[:3]) < 40)


def test_subjects_are_deterministic_and_labelled(template):
    pop = make_population(template, 6, seed=3)
    assert sum(s.label for s in pop) == 3
    again = make_subject(template, 3, 4, positive=bool(pop[4].label))
    np.testing.assert_array_equal(again.image, pop[4].image)
    for s in pop:
        assert s.image.shape == template.shape and s.image.dtype == np.float32
        assert np.isfinite(s.image).all()
        assert s.lesion.shape == s.brain.shape == template.shape
        if s.label:
            assert 1 <= len(s.lesion_radii) <= 3 and s.lesion.any()
            assert not (s.lesion & ~s.brain).any()  # lesions stay inside the brain
            # Lesions are hyperintense: brighter than the rest of the brain on average.
            assert s.image[s.lesion].mean() > s.image[s.brain & ~s.lesion].mean() * 1.2
        else:
            assert not s.lesion.any() and len(s.lesion_radii) == 0
        # Brain median scaled to 1 (not a percentile the lesion would move).
        assert abs(float(np.median(s.image[s.brain])) - 1.0) < 0.05


def test_lesion_sizes_and_polarities_are_balanced(template):
    pop = make_population(template, 16, seed=1, lesion_radius=((6, 10), (12, 18)), hypointense_fraction=0.5)
    groups = [(s.polarity, float(s.lesion_radii.max()) < 11) for s in pop if s.label]
    assert sorted(set(groups)) == [("hyper", False), ("hyper", True), ("hypo", False), ("hypo", True)]
    assert all(groups.count(g) == 2 for g in set(groups))
    for s in pop:
        if s.polarity == "hypo":  # darker than the white matter around it
            wm = s.brain & ~s.lesion & (s.image > np.median(s.image[s.brain]))
            assert s.image[s.lesion].mean() < 0.8 * s.image[wm].mean()
        assert s.polarity == ("none" if not s.label else s.polarity)
    with pytest.raises(ValueError, match="polarity"):
        make_subject(template, 0, 0, positive=True, polarity="bright")


def test_subjects_differ(template):
    a, b = make_subject(template, 0, 0, positive=False), make_subject(template, 0, 1, positive=False)
    assert np.abs(a.image - b.image).mean() > 0.05


def test_quick_demo_end_to_end(tmp_path, no_network):
    from tonno_fast.demo.run import main

    assert main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    methods = res["methods"]
    from tonno_fast.demo.run import METHODS
    assert set(methods) == set(METHODS) and len(METHODS) == 11  # 9 heatmap methods + 2 no-model baselines
    for m in methods.values():
        assert 0.0 <= m["mean"]["best"]["dice"] <= 1.0
    # The oracle (true plane integrals) must localise the lesions even at 8 directions and 6 mm.
    assert methods["Oracle (true plane integrals)"]["mean"]["best"]["dice"] > 0.5
    assert 0.0 <= res["encoder"]["auc"] <= 1.0 and 0.0 < res["encoder"]["lesion_fraction"] <= 1.0
    assert -1.0 <= res["plane_integral_r"] <= 1.0
    md = (tmp_path / "results.md").read_text()
    assert "| ToNNO (ramp2, exact inverse) |" in md and "lesion-crossing slice AUC" in md and "| laplacian |" in md
    # Both objectives, every seed, and the training curves.
    assert set(res["runs"]) == {"bag", "slice"} and all(len(r) == 2 for r in res["runs"].values())
    assert "## Training curves" in md and (tmp_path / "training_curves.png").exists()
    import tonno_fast
    assert tonno_fast.load_encoder(tmp_path / "encoder.pt").pixel_spacing == 6.0  # a bundle with its geometry
    assert list((tmp_path / "png").glob("*.png"))
    heat = sorted((tmp_path / "heatmaps").glob("*_tonno.nii.gz"))
    assert heat
    import nibabel as nib
    img, src = nib.load(str(heat[0])), nib.load(str(heat[0]).replace("_tonno", "_image"))
    np.testing.assert_allclose(img.affine, src.affine)
    assert (tmp_path / "encoder.pt").exists()


def test_demo_numbers_do_not_depend_on_worker_processes(tmp_path):
    # Each training run (with its heatmaps) seeds itself, so sharing the runs among spawned worker processes gives
    # the same numbers as running them one after the other in this process.
    import dataclasses

    from tonno_fast.demo.run import QUICK, run_demo

    tiny = dataclasses.replace(QUICK, n_train=8, n_val=2, n_test=2, steps=4, seeds=1, validate_every=2,
                               validation_bags=4, eval_slices=64, n_directions=4, cam_directions=2, n_slices=8,
                               png_subjects=0)
    one = run_demo(tiny, tmp_path / "one", progress=False, workers=1)
    two = run_demo(tiny, tmp_path / "two", progress=False, workers=2)
    assert set(one["runs"]) == {"bag", "slice"}
    for obj in one["runs"]:
        a, b = one["runs"][obj][0], two["runs"][obj][0]
        np.testing.assert_equal(a["dice_best"], b["dice_best"])  # exact, NaN == NaN
        np.testing.assert_equal(a["encoder"], b["encoder"])
        assert [h["loss"] for h in a["training_history"]] == [h["loss"] for h in b["training_history"]]
        assert [v["loss"] for v in a["validation"]] == [v["loss"] for v in b["validation"]]
    assert not (tmp_path / "two" / ".subjects.pt").exists()  # the workers' copy of the subjects is removed


@pytest.mark.parametrize("seed", [0, 1])
def test_encoder_converges_on_demo_data(seed):
    # At the demo's difficulty, weak-label training must converge for every seed, not by luck.
    import torch

    from tonno_fast.demo.model import SliceCNN
    from tonno_fast.demo.run import QUICK, _sampler
    from tonno_fast.training import evaluate_encoder, train_encoder

    torch.manual_seed(seed)
    t = load_template(QUICK.resolution)
    train = make_population(t, QUICK.n_train, seed)
    test = make_population(t, 8, seed, start=10_000)
    model = SliceCNN(widths=QUICK.widths)
    train_encoder(model, _sampler(train, QUICK, seed + 1), steps=QUICK.steps, batch_size=QUICK.batch_size,
                  lr=QUICK.lr)
    res = evaluate_encoder(model, _sampler(test, QUICK, seed + 2), n_slices=512)
    assert res["auc_lesion_slices"] > 0.9, res  # lesion-crossing slices vs slices of lesion-free subjects
    assert res["auc"] > 0.65, res  # all slices: capped near 0.5 + lesion_fraction / 2 by the label noise
