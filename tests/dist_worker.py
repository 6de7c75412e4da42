"""Run by tests/test_distributed.py under ``torchrun --nproc-per-node 2`` (gloo, CPU): every rank computes the
pipelines with ``process_group`` (each a share of the directions) and in one process (all directions), and rank
0 writes what it measured to ``argv[1]`` (JSON). ``--hang FOLDER``: each rank writes ``FOLDER/rank<r>.pid`` once
the process group is up, then rank 1 waits in a barrier rank 0 never reaches (the timeout guard's test). Not a
test module itself (no ``test_`` prefix). ``--train OUT``: :func:`tonno_fast.train_encoder` under DDP on every
rank, rank 0 writes what the ranks drew and learnt to ``OUT``."""
import json
import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

import tonno_fast as tf
from tonno_fast import distributed as du


def _write_report(path, data):
    """Atomically (a file that exists is complete: the test tells a crash after the report from one before)."""
    tmp = f"{path}.part"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class TinyCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.head = torch.nn.Linear(3, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def main(out_path):
    with du.session("cpu") as (ctx, device):
        assert ctx.world_size == 2 and torch.distributed.get_backend() == "gloo", ctx
        group = ctx.group
        result = {"world_size": ctx.world_size}
        g = torch.Generator().manual_seed(1)
        vol = torch.rand(9, 10, 8, generator=g, dtype=torch.float64)
        spacing = (1.5, 1.0, 1.2)
        mean = lambda x: x.mean(dim=(1, 2, 3))  # noqa: E731
        # 7 directions over 2 ranks: shares of 4 and 3.
        base = dict(n_directions=7, spacing=spacing, backend="reference")
        for name, kw in [("fbp_ramp2", {}), ("fbp_none", {"filter": "none"}),
                         ("fbp_ramp_hann_baseline", {"filter": "ramp", "window": "hann", "score_baseline": "median"}),
                         ("sirt", {"reconstruction": "sirt", "reconstruction_options": {"iterations": 5}}),
                         ("cgls", {"reconstruction": "cgls", "reconstruction_options": {"iterations": 5}}),
                         ("fista", {"reconstruction": "fista", "reconstruction_options": {"iterations": 5}})]:
            split = tf.tomographic_heatmap(vol, mean, process_group=group, **base, **kw)
            whole = tf.tomographic_heatmap(vol, mean, **base, **kw)
            result[name] = rel(split, whole)
        vol32 = vol.float()
        result["fbp_ramp2_float32"] = rel(tf.tomographic_heatmap(vol32, mean, process_group=group, **base),
                                          tf.tomographic_heatmap(vol32, mean, **base))
        # Partial sinograms: this rank's share only.
        res = tf.tomographic_heatmap(vol, mean, process_group=group, return_sinogram=True, **base)
        result[f"sinogram_directions_rank{ctx.rank}"] = int(res.sinogram.shape[2])
        assert res.geometry.n_directions == res.sinogram.shape[2]

        cnn = TinyCNN().double().eval()
        for name, fn in [("averaged_cam", tf.averaged_cam), ("tomographic_cam", tf.tomographic_cam)]:
            kw = dict(target_layers=[cnn.conv], method="gradcam", n_directions=5, spacing=spacing, slice_size=12,
                      backend="reference")
            split = fn(vol, cnn, process_group=group, **kw)
            whole = fn(vol, cnn, **kw)
            result[name] = rel(split, whole)

        # A failure on one rank only: every rank raises instead of waiting in a collective.
        def fails_on_rank1(x):
            if ctx.rank == 1:
                raise RuntimeError("rank 1 encoder failure")
            return x.mean(dim=(1, 2, 3))
        try:
            tf.tomographic_heatmap(vol, fails_on_rank1, process_group=group, **base)
            result[f"failure_rank{ctx.rank}"] = "no error"
        except RuntimeError as exc:
            result[f"failure_rank{ctx.rank}"] = str(exc)

        # Rows of unequal length gathered in rank order.
        rows = torch.full((1, 1, 2 + ctx.rank, 3), float(ctx.rank))
        whole = du.all_gather_rows(rows, 2, group)
        result["gathered"] = whole[0, 0, :, 0].tolist()

        # DDP building blocks: rank-seeded data, equal weights after a step.
        torch.manual_seed(1234)  # the same initial weights everywhere (DDP would broadcast rank 0's anyway)
        model = du.wrap_ddp(torch.nn.Linear(4, 1, dtype=torch.float64), device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = du.rank_generator(7)
        x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        batches = du.gather_objects(x.sum().item(), group)
        weights = du.gather_objects(flat.tolist(), group)
        result["ddp_batches_differ"] = batches[0] != batches[1]
        result["ddp_weights_equal"] = weights[0] == weights[1]
        del model, opt, loss  # DDP's reducer holds the process group: let it go before the group is destroyed

        # The cohort API under torchrun: a broken scan larger than the others (so the size-balanced shards give it
        # to rank 0 first), with and without fail_fast. Every rank gets the same report.
        folder = Path(out_path).parent / "scans"
        if ctx.is_main:
            folder.mkdir()
            rng = np.random.default_rng(0)
            for k in range(3):
                nib.save(nib.Nifti1Image(rng.random((8, 9, 7)).astype(np.float32), np.eye(4)),
                         str(folder / f"s{k}.nii.gz"))
            (folder / "s3.nii.gz").write_bytes(os.urandom(100_000))
        du.barrier(ctx)
        fast = tf.heatmap_files(folder, folder.parent / "fast", mean, fail_fast=True, n_directions=3)
        full = tf.heatmap_files(folder, folder.parent / "full", mean, n_directions=3)
        result[f"cohort_rank{ctx.rank}"] = [fast.summary().split(" in ")[0], full.summary().split(" in ")[0]]
        if ctx.is_main:
            result["cohort_fast_files"] = sorted(os.listdir(folder.parent / "fast"))

        gathered = du.gather_objects(result, group)
        if ctx.is_main:
            merged = {}
            for r in gathered:
                merged.update(r)
            _write_report(out_path, merged)


def hang(folder):
    with du.session("cpu") as (ctx, _):
        Path(folder, f"rank{ctx.rank}.pid").write_text(str(os.getpid()))
        if ctx.rank == 1:
            du.barrier(ctx)
        else:
            time.sleep(3600)


def _train_sampler(seed, n=6):
    """Tiny weak-supervision task: positives hold a bright ball off-centre (the sampler of tests/test_training)."""
    g = torch.Generator().manual_seed(0)
    z, y, x = torch.meshgrid(*[torch.arange(12.0) - 5.5] * 3, indexing="ij")
    body = (z ** 2 + y ** 2 + x ** 2) < 5.5 ** 2
    lesion = ((z - 1.5) ** 2 + (y + 1.5) ** 2 + x ** 2) < 2.0 ** 2
    vols = [0.2 * torch.rand(12, 12, 12, generator=g) * body + 1.5 * lesion * (i % 2) for i in range(n)]
    return tf.ObliqueSliceSampler(vols, [i % 2 for i in range(n)], spacing=(1.0, 1.0, 1.0), slice_size=12,
                                  pixel_spacing=1.0, body_masks=[body] * n, balance=True, seed=seed)


def _train_net():
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 1))


def train(out_path):
    """train_encoder(process_group=...) on every rank: what each rank drew first, its weights and histories."""
    from tonno_fast.training import train_encoder

    with du.session("cpu") as (ctx, device):
        group = ctx.group
        result = {}
        first = []

        def record(x):
            if not first:
                first.append(x.clone())
            return x

        # The slice objective for a few steps, validated by rank 0 every 2 steps.
        h = train_encoder(_train_net, _train_sampler(0), steps=6, batch_size=8, lr=0.05, seed=3, log_every=2,
                          validation=_train_sampler(1), validate_every=2, validation_size=6, transform=record,
                          process_group=group)
        state = {k: v.detach().clone() for k, v in h.encoder.state_dict().items()}
        # The bag objective on a time budget with early stopping: every rank must stop at the same step.
        b = train_encoder(_train_net, _train_sampler(0), steps=100000, seconds=1.5, objective="bag",
                          bags_per_step=2, lr=0.05, seed=5, log_every=1, validation=_train_sampler(1),
                          validate_every=3, validation_size=6, patience=2, process_group=group)
        bag_state = {k: v.detach().clone() for k, v in b.encoder.state_dict().items()}
        # A failure on rank 1 in its third step raises on both ranks instead of leaving rank 0 in the all_reduce.
        calls = [0]

        def broken(x):
            calls[0] += 1
            if ctx.rank == 1 and calls[0] == 3:
                raise RuntimeError("rank 1 transform failure")
            return x

        try:
            train_encoder(_train_net, _train_sampler(0), steps=6, batch_size=8, seed=3, transform=broken,
                          process_group=group)
            failure = "no error"
        except RuntimeError as exc:
            failure = str(exc)
        # Different settings on the ranks are refused on every rank.
        try:
            train_encoder(_train_net, _train_sampler(0), steps=3 + ctx.rank, batch_size=8, seed=3,
                          process_group=group)
            mismatch = "no error"
        except ValueError as exc:
            mismatch = str(exc)

        mine = {"state": state, "first": first[0], "loss": [r["loss"] for r in h],
                "validation": [{k: v for k, v in r.items() if k != "seconds"} for r in h.validation],
                "best": h.best, "bag_state": bag_state, "bag_steps": b.steps, "bag_stopped": b.stopped_early,
                "bag_loss": [r["loss"] for r in b], "bag_best": b.best, "failure": failure, "mismatch": mismatch}
        every = du.gather_objects(mine, group)
        if ctx.is_main:
            r0, r1 = every
            result["world_size"] = ctx.world_size
            result["state_keys"] = sorted(r0["state"])
            result["weights_equal"] = all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
            result["bag_weights_equal"] = all(torch.equal(r0["bag_state"][k], r1["bag_state"][k])
                                              for k in r0["bag_state"])
            result["first_batch_differs"] = not torch.equal(r0["first"], r1["first"])
            result["first_batch_shape"] = list(r0["first"].shape)
            for key in ("loss", "validation", "best", "bag_steps", "bag_stopped", "bag_loss", "bag_best", "failure",
                        "mismatch"):
                result[f"{key}_rank0"], result[f"{key}_rank1"] = r0[key], r1[key]
            _write_report(out_path, result)


if __name__ == "__main__":
    if sys.argv[1] == "--hang":
        hang(sys.argv[2])
    elif sys.argv[1] == "--train":
        train(sys.argv[2])
    else:
        main(sys.argv[1])
