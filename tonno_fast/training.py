"""Training helper for the weak-supervision step: per-slice BCE or multiple-instance (bag) BCE on random slices.

Not a framework: :func:`train_encoder` is one loop that takes a sampler and runs optimiser steps, and
:func:`evaluate_encoder` measures slice-level accuracy and AUC. Two objectives:

* ``objective="slice"``: every slice carries its volume's label; BCE between the encoder's logit for the
  slice and that label. Simple, but most slices of a volume with a small lesion do not show it, so most
  "positive" labels are wrong (about 80 % for lesions of a few mm).
* ``objective="bag"`` (multiple-instance learning): a *bag* is the stack of parallel slices of one volume
  along one random orientation that cross the body (:meth:`ObliqueSliceSampler.sample_bags`). The volume
  label is right for the bag as a whole ("some slice shows a lesion" or "none does"), in every orientation.
  The slice logits ``z_i`` of a bag are pooled into one bag logit (:func:`pool_bags`: log-sum-exp
  ``(1/r) log mean exp(r z_i)``, max, or mean) and BCE compares it with the volume label; optionally plus
  ``slice_weight`` times the per-slice BCE. The encoder stays a slice scorer: what ToNNO needs.

Runs are reproducible with ``seed=`` (sampler stream, initialisation through an encoder factory, dropout
and augmentation), validated every ``validate_every`` steps on a fixed set drawn once from a held-out sampler,
keep the best weights and can stop early. The loop warns (``logging`` and the returned history) when the
loss sits at chance, ``ln 2``, or the validation AUC at 0.5: the encoder has not learnt anything yet.
See ``docs/training.md`` for measurements behind the defaults.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed as du
from .allocator import reuse_cpu_memory
from .evaluation import roc_auc
from .sampler import BagBatch, ObliqueSliceSampler
from .validation import positive_int

#: Freed CPU memory kept for reuse during training (tonno_fast.allocator.reuse_cpu_memory). A small CNN on 96²
#: slices, 64 per step, trained as fast with 1 GiB (benchmarks/RESULTS.md, item 26).
TRAINING_POOL_LIMIT = 256 << 20

__all__ = ["train_encoder", "evaluate_encoder", "pool_bags", "TrainingHistory", "OBJECTIVES", "POOLINGS"]

log = logging.getLogger("tonno_fast.training")

OBJECTIVES = ("slice", "bag")
POOLINGS = ("lse", "max", "mean")
# Validation numbers that can choose the weights kept: AUCs (higher is better) or the validation bag loss (lower).
MONITORS = ("auc", "bag_auc", "loss")
LN2 = math.log(2.0)


def _logits(encoder: Callable, x: torch.Tensor) -> torch.Tensor:
    out = encoder(x)
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.ndim != 1 or out.shape[0] != x.shape[0]:
        raise ValueError(f"encoder must return one logit per slice, (M,) or (M, 1), for binary training; "
                         f"got {tuple(out.shape)} for M = {x.shape[0]}")
    return out


def pool_bags(logits: torch.Tensor, sizes, pooling: str = "lse", r: float = 5.0) -> torch.Tensor:
    """Pool slice logits ``(M,)`` of consecutive bags of ``sizes`` ``(n_bags,)`` slices into bag logits
    ``(n_bags,)`` (differentiable).

    ``"lse"``: ``(1/r) log mean_i exp(r z_i)``: the maximum as ``r → ∞``, the mean as ``r → 0``; unlike the
    maximum, every slice gets a gradient (a softmax share). ``"max"``: the largest logit. ``"mean"``: the
    average logit (every slice equally responsible: the per-slice objective's view of a bag).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    sizes = [int(n) for n in (sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes)]
    if sum(sizes) != logits.shape[0] or min(sizes, default=1) < 1:
        raise ValueError(f"sizes must be positive and add up to the {logits.shape[0]} logits, got {sizes}")
    if pooling == "lse" and not (float(r) > 0 and math.isfinite(float(r))):
        raise ValueError(f"r must be a positive number for pooling='lse', got {r!r}")
    out = []
    for z in torch.split(logits, sizes):
        if pooling == "lse":
            out.append((torch.logsumexp(r * z, 0) - math.log(z.shape[0])) / r)
        elif pooling == "max":
            out.append(z.max())
        else:
            out.append(z.mean())
    return torch.stack(out)


class TrainingHistory(list):
    """What :func:`train_encoder` returns: a list of ``{"step", "loss", "seconds"}`` records (running mean of
    the last ``log_every`` losses), plus:

    Attributes:
        encoder: the trained ``nn.Module`` (the one passed in, or the one the factory built), in eval mode,
            holding the best validated weights when ``keep_best``.
        validation: ``[{"step", "loss", "auc", "bag_auc", ...}]`` one record per validation (``loss``: bag BCE;
            ``auc``: slice logits against volume labels; ``bag_auc``: pooled bag logits;
            ``lesion_auc``: lesion-crossing slices against slices of negative volumes, when the validation
            sampler has ``aux`` lesion masks — for reporting; never used to choose weights).
        warnings: ``[{"step", "message"}]``: chance-level loss or validation AUC (also logged).
        best: ``{"step", <monitor>: value}`` of the weights kept, or ``None`` without validation.
        stopped_early: whether patience ended the run.
        steps, seconds: optimiser steps taken and wall time of the loop.
    """

    def __init__(self):
        super().__init__()
        self.encoder = None
        self.validation: List[Dict[str, float]] = []
        self.warnings: List[Dict[str, object]] = []
        self.best: Optional[Dict[str, float]] = None
        self.stopped_early = False
        self.steps = 0
        self.seconds = 0.0

    def warn(self, step: int, message: str) -> None:
        self.warnings.append({"step": int(step), "message": message})
        log.warning("step %d: %s", step, message)


class _Ranks:
    """The process group of a training run as the loop needs it: who validates (rank 0 of the group), the
    decisions every rank must share (stop now? what did validation measure?) and DistributedDataParallel. With
    ``group=None`` (or no process group initialised) a single process: every method returns its input and runs
    no collective."""

    def __init__(self, group):
        self.distributed = group is not None and torch.distributed.is_available() and \
            torch.distributed.is_initialized()
        self.group = group if self.distributed else None
        ctx = du.context(group) if self.distributed else None
        self.rank = ctx.rank if self.distributed else 0
        self.is_main = self.rank == 0
        self.main = torch.distributed.get_global_rank(group, 0) if self.distributed else 0

    def from_main(self, obj):
        """Rank 0's ``obj`` (picklable) on every rank."""
        return du.broadcast_object(obj, self.main, self.group) if self.distributed else obj

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on some rank."""
        if not self.distributed:
            return bool(flag)
        return bool(du.all_reduce_sum(torch.tensor([float(bool(flag))], dtype=torch.float64), self.group).item() > 0)

    def check_same(self, **settings) -> None:
        """Raise on every rank (the same ``ValueError``) when the ranks were given different ``settings``: they
        decide how many steps and collectives each rank runs, so a difference would leave a rank waiting."""
        if not self.distributed:
            return
        seen = du.gather_objects(settings, self.group)
        differ = sorted(k for k in settings if any(s[k] != seen[0][k] for s in seen))
        if differ:
            raise ValueError(f"train_encoder under a process group needs the same {', '.join(differ)} on every "
                             f"rank, got {[{k: s[k] for k in differ} for s in seen]}")

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (e.g. batch-norm running statistics, which each rank updates from its own batches)
        on every rank, so the final state is the same everywhere."""
        if self.distributed:
            comm = du._comm_device(self.group)
            with torch.no_grad():
                for buf in module.buffers():
                    work = buf.data if buf.device == comm and buf.is_contiguous() else buf.data.to(comm).contiguous()
                    torch.distributed.broadcast(work, self.main, group=self.group)
                    if work is not buf.data:
                        buf.data.copy_(work)


class _Validator:
    """A fixed validation set of bags drawn once from a held-out sampler, scored every ``validate_every`` steps:
    slice AUC (every slice against its volume label), bag AUC (pooled bag logits) and, with ``aux`` lesion masks,
    the lesion-crossing AUC. Bags for both objectives, so their curves are measured on the same kind of set. The
    sampler's random stream is restored afterwards: repeated trainings with one validation sampler see the
    same set."""

    def __init__(self, sampler: ObliqueSliceSampler, n_bags: int, bag_size, bag_spacing, pooling: str, r: float,
                 batch_size: int):
        state = sampler.generator.get_state()
        try:
            b = sampler.sample_bags(n_bags, bag_size=bag_size, slice_spacing=bag_spacing)
        finally:
            sampler.generator.set_state(state)
        self.slices, self.sizes = b.slices, b.sizes
        self.bag_labels, self.labels = b.labels.reshape(-1).cpu(), b.slice_labels.reshape(-1).cpu()
        self.crosses = None if b.aux is None else (b.aux.float().flatten(1).amax(1) > 0.5).cpu()
        self.pooling, self.r, self.batch_size = pooling, r, batch_size

    @torch.no_grad()
    def __call__(self, encoder) -> Dict[str, float]:
        was_training = encoder.training
        encoder.eval()
        try:
            z = torch.cat([_logits(encoder, self.slices[i:i + self.batch_size]).float().cpu()
                           for i in range(0, self.slices.shape[0], self.batch_size)])
        finally:
            encoder.train(was_training)
        y = self.labels > 0.5
        zb = pool_bags(z, self.sizes, self.pooling, self.r)
        out = {"loss": float(F.binary_cross_entropy_with_logits(zb, self.bag_labels)), "auc": _safe_auc(z, y),
               "bag_auc": _safe_auc(zb, self.bag_labels > 0.5)}
        if self.crosses is not None and bool((self.crosses & y).any()):
            keep = self.crosses | ~y
            out["lesion_auc"] = _safe_auc(z[keep], y[keep])
        return out


def _safe_auc(scores, labels) -> float:
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return float("nan")
    return roc_auc(np.asarray(scores), labels)


def train_encoder(encoder, sampler: ObliqueSliceSampler, *, steps: Optional[int] = None,
                  seconds: Optional[float] = None, batch_size: int = 64, objective: str = "slice",
                  bags_per_step: Optional[int] = None, bag_size: Optional[int] = None,
                  bag_spacing: Optional[float] = None, pooling: str = "lse", pooling_r: float = 5.0,
                  slice_weight: float = 0.0, optimizer: Optional[torch.optim.Optimizer] = None, lr: float = 1e-3,
                  warmup_steps: int = 0, scheduler=None, pos_weight: Optional[float] = None,
                  transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, seed: Optional[int] = None,
                  validation: Optional[ObliqueSliceSampler] = None, validate_every: int = 100,
                  validation_size: int = 32, monitor: Optional[str] = None, keep_best: bool = True,
                  patience: Optional[int] = None, chance_tolerance: float = 0.01, chance_steps: int = 200,
                  progress: bool = False, log_every: int = 25, process_group=None) -> TrainingHistory:
    """Train ``encoder`` on random slices labelled only by their volume (weak supervision).

    Args:
        encoder: ``nn.Module`` mapping ``(M, C, h, w)`` slices to ``(M,)`` or ``(M, 1)`` logits, or a factory
            (a callable returning one), which is then built under ``seed`` so the initialisation is part of
            the run's seed.
        sampler: where training slices come from (labels 0/1).
        steps: number of optimiser steps; ``seconds``: or a wall-clock budget (whichever ends first; at
            least one of them is required).
        batch_size: slices per step. Bag objective: the number of bags per step is chosen so the bags hold
            about this many slices (``bags_per_step`` overrides it), so both objectives cost the same per step.
        objective: ``"slice"`` (each slice against its volume label) or ``"bag"`` (pooled bag logit against
            the volume label; see the module docstring).
        bags_per_step, bag_size, bag_spacing: bag objective: bags per step (at least 2), slices per bag
            (``None``: every slice crossing the body; else a random run of that many), and the distance (mm)
            between a bag's slices (default: the sampler's ``pixel_spacing``, else the finest voxel spacing).
        pooling, pooling_r: bag pooling (:func:`pool_bags`) and its ``r`` for ``"lse"``.
        slice_weight: bag objective: add this times the per-slice BCE (every slice against its volume label).
        optimizer: any ``torch.optim`` optimiser over the encoder's parameters (default ``Adam(lr)``).
        warmup_steps: raise the learning rate linearly from ``lr / warmup_steps`` to ``lr`` over these steps.
        scheduler: optional learning-rate scheduler, stepped after every optimiser step.
        pos_weight: BCE weight of positive slices or bags (e.g. to counter unbalanced labels).
        transform: optional augmentation applied to each batch of slices (a tensor → tensor function).
        seed: seeds the sampler's stream (:meth:`~ObliqueSliceSampler.reseed`) and torch's global generator
            for the run (restored afterwards): with the same seed, encoder factory and sampler, two runs on the
            CPU give bitwise the same weights. ``None``: the sampler's and torch's current state.
        validation: a sampler over held-out volumes (choose them from the training population, not from the
            test set). A fixed set of ``validation_size`` bags (``bag_size``, ``bag_spacing`` as in training, for
            both objectives) is drawn from it once and scored every ``validate_every`` steps and at the end.
        monitor: which validation number chooses the best weights: ``"auc"`` (slice logits against volume
            labels; default for the slice objective), ``"bag_auc"`` (pooled bag logits against volume labels) or
            ``"loss"`` (the validation bag BCE, lowest wins; default for the bag objective: a bag AUC over a few
            dozen bags saturates early and then keeps early weights, docs/training.md). All use volume labels only.
        keep_best: put the best validated weights back into the encoder at the end.
        patience: stop after this many validations without improvement of ``monitor`` (``None``: never).
        chance_tolerance, chance_steps: warn when the running loss has been within ``chance_tolerance`` of
            ``ln 2`` for ``chance_steps`` steps, and when a validation AUC is within 0.05 of 0.5.
        progress: show a tqdm progress bar.
        log_every: record the running mean loss every this many steps.
        process_group: train under ``DistributedDataParallel`` on the ranks of this group (e.g.
            ``ctx.group`` from :func:`tonno_fast.distributed.session` under ``torchrun``); ``None``: one process,
            even when a default process group exists. Every rank calls ``train_encoder`` with the same settings
            and its own sampler on its own device (the encoder on that device too): each rank's sampler is
            reseeded from ``(seed, rank)`` (:func:`~tonno_fast.distributed.rank_seed`; ``seed=None``: rank 0
            draws one for all), so the ranks draw different slices, and so are dropout and augmentation;
            gradients are averaged over the ranks at every step (``K`` ranks: ``K × batch_size`` slices a step
            at the same ``lr``), so the weights stay the same on every rank. A ``seconds`` budget ends on every
            rank at the same step (rank 0 decides). Validation runs on rank 0 with rank 0's ``validation``
            sampler (give one on every rank, or on none) and its numbers go to all ranks, so the best step,
            early stopping and the weights kept are the same everywhere. Buffers (batch-norm statistics) are
            rank 0's at the end. ``history`` records this rank's training loss. A failure on one rank while
            drawing a batch, computing the loss or validating raises on every rank.

    Returns:
        A :class:`TrainingHistory`: the list of ``{"step", "loss", "seconds"}`` records, with the validation
        records, warnings, best step and the trained encoder as attributes.
    """
    if steps is None and seconds is None:
        raise ValueError("give steps (optimiser steps) or seconds (a time budget), or both")
    steps = positive_int(steps, "steps", allow_none=True)
    batch_size = positive_int(batch_size, "batch_size")
    log_every = positive_int(log_every, "log_every")
    validate_every = positive_int(validate_every, "validate_every")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
    if not (float(slice_weight) >= 0 and math.isfinite(float(slice_weight))):
        raise ValueError(f"slice_weight must be a non-negative number, got {slice_weight!r}")
    bags_per_step = positive_int(bags_per_step, "bags_per_step", allow_none=True)
    monitor = monitor or ("loss" if objective == "bag" else "auc")
    if monitor not in MONITORS:
        raise ValueError(f"monitor must be one of {MONITORS}, got {monitor!r}")
    patience = positive_int(patience, "patience", allow_none=True)
    if patience is not None and validation is None:
        raise ValueError("patience needs a validation sampler (validation=...)")

    ranks = _Ranks(process_group)
    ranks.check_same(steps=steps, timed=seconds is not None, objective=objective, validation=validation is not None,
                     validate_every=validate_every, patience=patience, keep_best=keep_best, seeded=seed is not None)

    with torch.random.fork_rng(devices=[]):
        if ranks.distributed and seed is None:  # one seed for all, mixed with each rank's number below
            seed = ranks.from_main(int(torch.randint(0, 2 ** 62, ()).item()))
        if seed is not None:
            torch.manual_seed(int(seed))
            sampler.reseed(du.rank_seed(int(seed), ranks.rank) if ranks.distributed else int(seed))
        if not isinstance(encoder, torch.nn.Module):
            if not callable(encoder):
                raise TypeError(f"encoder must be an nn.Module or a factory returning one, got "
                                f"{type(encoder).__name__}")
            encoder = encoder()
            if not isinstance(encoder, torch.nn.Module):
                raise TypeError(f"the encoder factory returned {type(encoder).__name__}, expected an nn.Module")
        if objective == "bag" and bags_per_step is None:
            bags_per_step = max(2, round(batch_size / sampler.mean_bag_size(bag_size=bag_size,
                                                                             slice_spacing=bag_spacing)))
        model = encoder
        if ranks.distributed:
            # DDP broadcasts rank 0's parameters and averages gradients in backward. No buffer broadcast in
            # forward: the forward then runs no collective, so a failing forward can be met by all_or_none.
            model = du.wrap_ddp(encoder, group=ranks.group, broadcast_buffers=False)
            torch.manual_seed(du.rank_seed(int(seed), ranks.rank))  # dropout and augmentation differ by rank
        history = TrainingHistory()
        history.encoder = encoder
        validator = None
        if validation is not None and ranks.is_main:
            validator = _Validator(validation, positive_int(validation_size, "validation_size"), bag_size,
                                   bag_spacing, pooling, float(pooling_r), 256)
        # Every step allocates the same slices, activations and gradients again: on the CPU the pool keeps the
        # freed memory for the next step instead of page-faulting it in afresh (tonno_fast.allocator).
        with reuse_cpu_memory(TRAINING_POOL_LIMIT):
            _train_loop(encoder, model, ranks, sampler, history, validator, validation is not None, steps=steps,
                        seconds=seconds, batch_size=batch_size, objective=objective, bags_per_step=bags_per_step,
                        bag_size=bag_size, bag_spacing=bag_spacing, pooling=pooling, r=float(pooling_r),
                        slice_weight=float(slice_weight), optimizer=optimizer, lr=lr, warmup_steps=warmup_steps,
                        scheduler=scheduler, pos_weight=pos_weight, transform=transform,
                        validate_every=validate_every, monitor=monitor, keep_best=keep_best, patience=patience,
                        chance_tolerance=float(chance_tolerance), chance_steps=int(chance_steps),
                        progress=progress, log_every=log_every)
    encoder.eval()
    return history


def _train_loop(encoder, model, ranks: _Ranks, sampler, history: TrainingHistory, validator: Optional[_Validator],
                validating: bool, *, steps, seconds,
                batch_size, objective, bags_per_step, bag_size, bag_spacing, pooling, r, slice_weight, optimizer,
                lr, warmup_steps, scheduler, pos_weight, transform, validate_every, monitor, keep_best, patience,
                chance_tolerance, chance_steps, progress, log_every) -> None:
    """The optimisation loop proper: one step = draw a batch, forward, loss, backward, optimiser step.
    ``model`` is ``encoder`` or its DDP wrapper (used for the training forward); ``validator`` is ``None`` on the
    ranks other than 0, which receive rank 0's validation numbers."""
    if optimizer is None:
        optimizer = torch.optim.Adam(encoder.parameters(), lr=lr)
    base_lr = [group["lr"] for group in optimizer.param_groups]
    pw = None if pos_weight is None else torch.tensor(float(pos_weight), device=sampler.device)
    bar = None
    if progress and ranks.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="training encoder", unit="step")
    encoder.train()
    recent: List[float] = []
    best_value, best_auc, best_state, since_best = -math.inf, float("nan"), None, 0
    # The AUC watched for chance level: the monitored one, or the bag AUC when the loss is monitored.
    chance_key = "bag_auc" if monitor == "loss" else monitor
    chance_run, warned_loss, warned_auc = 0, False, False
    t0 = time.perf_counter()
    step = 0

    def validate() -> bool:
        """Score the validation set; returns True when patience has run out."""
        nonlocal best_value, best_auc, best_state, since_best, warned_auc
        with du.all_or_none(ranks.group):
            res = validator(encoder) if ranks.is_main else None
        res = {"step": step, **ranks.from_main(res), "seconds": time.perf_counter() - t0}
        history.validation.append(res)
        value = -res["loss"] if monitor == "loss" else res[monitor]  # larger is better
        auc = res.get(chance_key, float("nan"))
        if math.isfinite(auc) and abs(auc - 0.5) < 0.05 and not warned_auc:
            history.warn(step, f"validation {chance_key} {auc:.3f} is at chance (0.5): the encoder does not "
                               f"separate the volume labels yet")
            warned_auc = True
        if math.isfinite(value) and value > best_value:
            best_value, best_auc, since_best = value, auc, 0
            history.best = {"step": step, monitor: res[monitor]}
            if keep_best:
                best_state = copy.deepcopy(encoder.state_dict())
        else:
            since_best += 1
        return patience is not None and since_best >= patience

    try:
        while (steps is None or step < steps) and (seconds is None or not ranks.any(
                ranks.is_main and time.perf_counter() - t0 >= seconds)):
            if step < warmup_steps:
                for group, base in zip(optimizer.param_groups, base_lr):
                    group["lr"] = base * (step + 1) / warmup_steps
            elif step == warmup_steps and warmup_steps:
                for group, base in zip(optimizer.param_groups, base_lr):
                    group["lr"] = base
            # Failures are met by all_or_none before each collective of DDP: the bucket rebuild at the start of
            # the second forward, then the gradient all_reduce in backward.
            with du.all_or_none(ranks.group):
                if objective == "bag":
                    batch = sampler.sample_bags(bags_per_step, bag_size=bag_size, slice_spacing=bag_spacing)
                else:
                    batch = sampler.sample(batch_size)
                x = batch.slices if transform is None else transform(batch.slices)
            with du.all_or_none(ranks.group):
                logits = _logits(model, x).float()
                if isinstance(batch, BagBatch):
                    y = batch.labels.reshape(-1).to(logits.device)
                    loss = F.binary_cross_entropy_with_logits(pool_bags(logits, batch.sizes, pooling, r), y,
                                                              pos_weight=pw)
                    if slice_weight > 0:
                        loss = loss + slice_weight * F.binary_cross_entropy_with_logits(
                            logits, batch.slice_labels.reshape(-1).to(logits.device), pos_weight=pw)
                else:
                    loss = F.binary_cross_entropy_with_logits(logits, batch.labels.reshape(-1).to(logits.device),
                                                              pos_weight=pw)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            recent.append(float(loss.detach()))
            # Chance level: a balanced binary BCE sits at ln 2 while the encoder predicts nothing.
            chance_run = chance_run + 1 if abs(np.mean(recent[-log_every:]) - LN2) < chance_tolerance else 0
            if chance_run >= chance_steps and not warned_loss:
                history.warn(step, f"the training loss has stayed at ln 2 = {LN2:.3f} (chance) for {chance_run} "
                                   f"steps: the encoder has not started to learn (see docs/training.md)")
                warned_loss = True
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(recent[-log_every:]):.3f}")
            if step % log_every == 0:
                history.append({"step": step, "loss": float(np.mean(recent[-log_every:])),
                                "seconds": time.perf_counter() - t0})
            if validating and step % validate_every == 0 and validate():
                history.stopped_early = True
                break
    finally:
        if bar is not None:
            bar.close()
    if validating and (not history.validation or history.validation[-1]["step"] != step):
        validate()
    history.steps, history.seconds = step, time.perf_counter() - t0
    if validating and history.best is not None and math.isfinite(best_auc) and abs(best_auc - 0.5) < 0.05:
        history.warn(step, f"the validation {chance_key} of the weights kept is {best_auc:.3f}, at chance: the "
                           f"encoder has not learnt to separate the volume labels")
    if keep_best and best_state is not None:
        encoder.load_state_dict(best_state)
    ranks.sync_buffers(encoder)


@torch.no_grad()
def evaluate_encoder(encoder: Callable, sampler: ObliqueSliceSampler, *, n_slices: int = 2048,
                     batch_size: int = 256, threshold: float = 0.0) -> Dict[str, float]:
    """Slice-level accuracy (logit ``> threshold``) and AUC on ``n_slices`` random slices of ``sampler``
    (use a sampler over held-out volumes). With ``aux`` lesion masks in the sampler it also reports
    ``lesion_fraction``: the share of positive-volume slices that actually cross a lesion, and the AUC of
    lesion-crossing slices against negative-volume slices."""
    if hasattr(encoder, "eval"):
        encoder.eval()
    scores, labels, crosses = [], [], []
    done = 0
    with reuse_cpu_memory(TRAINING_POOL_LIMIT):  # batch after batch of slices and activations, as in training
        while done < n_slices:
            b = sampler.sample(min(batch_size, n_slices - done))
            scores.append(_logits(encoder, b.slices).float().cpu())
            labels.append(b.labels.reshape(-1).cpu())
            if b.aux is not None:
                crosses.append((b.aux.float().flatten(1).amax(1) > 0.5).cpu())
            done += b.slices.shape[0]
    s = torch.cat(scores).numpy()
    y = torch.cat(labels).numpy() > 0.5
    out = {"n_slices": int(s.size), "accuracy": float(((s > threshold) == y).mean()), "auc": roc_auc(s, y)}
    if crosses:
        c = torch.cat(crosses).numpy()
        out["lesion_fraction"] = float(c[y].mean()) if y.any() else float("nan")
        keep = c | ~y  # lesion-crossing positives vs all negatives
        out["auc_lesion_slices"] = roc_auc(s[keep], y[keep]) if (c & y).any() else float("nan")
    return out
