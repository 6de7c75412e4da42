"""Several processes on ``torch.distributed``, as launched by ``torchrun``: who am I, which device, which share.

``torchrun --nproc-per-node K [--nnodes M ...] -m tonno_fast heatmap ...`` starts ``K × M`` copies of the
program with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and the rendezvous in the
environment. This module turns that into:

* :func:`context`: rank, world size, local rank (from the initialised process group, else the environment,
  else a single process);
* :func:`device_for_rank`: ``cuda:LOCAL_RANK`` where there is a GPU (one GPU per process), else the CPU;
* :func:`init_distributed` / :func:`session`: the process group (NCCL on GPUs, gloo on CPUs), created only when
  ``WORLD_SIZE > 1`` and destroyed again by whoever created it;
* :func:`shard` and :func:`direction_share`: the same deterministic split of a list (of scans) or of a range
  (of directions) computed independently on every rank, so no rank needs to be told what the others do;
* :func:`all_reduce_sum`, :func:`all_gather_rows`, :func:`gather_objects`, :func:`broadcast_object`: the few
  collectives the pipelines need, each working on gloo (CPU tensors) and NCCL (tensors moved to the rank's GPU
  and back);
* :func:`rank_generator`: a ``torch.Generator`` seeded from ``(seed, rank)``, so that ranks draw different
  random slices reproducibly, and :func:`wrap_ddp` for training under ``DistributedDataParallel``.

Everything works unchanged in a single process (no process group): the share is everything, the collectives
return their input.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterator, List, NamedTuple, Optional, Sequence, Tuple, TypeVar

import torch

__all__ = ["DistContext", "context", "device_for_rank", "init_distributed", "session", "shard", "direction_share",
           "split_directions", "reconstruct_split", "all_or_none", "all_reduce_sum", "all_gather_rows",
           "gather_objects", "broadcast_object", "barrier", "rank_seed", "rank_generator", "wrap_ddp", "default_backend"]

T = TypeVar("T")

#: How long a collective may wait for the other ranks. A cohort rank can be busy with its last scan for a long
#: time while another rank waits in the final gather, so this is far above torch's 10 minute default for NCCL.
DEFAULT_TIMEOUT = datetime.timedelta(hours=2)


class DistContext(NamedTuple):
    """Where this process stands: ``rank`` in ``[0, world_size)``, ``local_rank`` on its node, and
    ``local_world_size`` processes on its node; ``group`` is the process group (``torch.distributed.group.WORLD``
    for the default one; ``None`` in a single process), ready to pass as a pipeline's ``process_group``."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    group: Any = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def context(group=None) -> DistContext:
    """This process's :class:`DistContext`: from ``group`` (or the default process group) when one is
    initialised, else from torchrun's environment variables, else a single process (rank 0 of 1)."""
    local_rank = _env_int("LOCAL_RANK", 0)
    if _initialized():
        dist = torch.distributed
        group = group if group is not None else dist.group.WORLD  # a real group: None means "no split" here
        world = dist.get_world_size(group)
        local_world = _env_int("LOCAL_WORLD_SIZE", world)
        return DistContext(dist.get_rank(group), world, local_rank, local_world, group)
    world = _env_int("WORLD_SIZE", 1)
    return DistContext(_env_int("RANK", 0), world, local_rank, _env_int("LOCAL_WORLD_SIZE", world), None)


def device_for_rank(device: str = "auto", local_rank: Optional[int] = None) -> torch.device:
    """The device of this process: ``"auto"`` is ``cuda:LOCAL_RANK`` when CUDA is available (and made the
    current device, which NCCL collectives need), else the CPU; ``"cuda"`` is ``cuda:LOCAL_RANK``; anything else
    (``"cpu"``, ``"cuda:1"``) as given. Raises ``ValueError`` when the node has fewer GPUs than processes."""
    if local_rank is None:
        local_rank = _env_int("LOCAL_RANK", 0)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(f"LOCAL_RANK {local_rank} has no GPU: this node has {count} CUDA device(s); start at "
                             f"most {count} processes per node (torchrun --nproc-per-node {count})")
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def default_backend(device) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` for the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(device="auto", *, backend: Optional[str] = None,
                     timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Tuple[DistContext, torch.device, bool]:
    """Join the process group torchrun prepared, if there is one.

    Returns ``(context, device, created)``: ``device`` from :func:`device_for_rank`; ``created`` is True when
    this call initialised the default process group (then the caller destroys it, see :func:`session`). With
    ``WORLD_SIZE`` unset or 1, or a process group already initialised, nothing is created.
    ``backend`` defaults to NCCL on GPUs and gloo on CPUs.
    """
    dev = device_for_rank(device)
    ctx = context()
    if ctx.world_size <= 1 or _initialized():
        return ctx, dev, False
    if not torch.distributed.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = backend or default_backend(dev)
    kwargs = {"device_id": dev} if dev.type == "cuda" else {}
    torch.distributed.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return context(), dev, True


@contextlib.contextmanager
def session(device="auto", *, backend: Optional[str] = None,
            timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Iterator[Tuple[DistContext, torch.device]]:
    """``with session() as (ctx, device): ...``: :func:`init_distributed` on entry, and on exit the process
    group destroyed if this session created it (also after an exception, so no rank is left waiting in a
    half-torn group)."""
    ctx, dev, created = init_distributed(device, backend=backend, timeout=timeout)
    finished = False
    try:
        yield ctx, dev
        finished = True
    finally:
        if created and _initialized():
            if finished:
                # Every rank gets here before any rank closes its connections, so none tears its end down while
                # a peer is still inside the block's last collective. Not after an exception: the other ranks
                # may never arrive (all_or_none makes them raise too, but a bare exception does not).
                torch.distributed.barrier(group=ctx.group)
            torch.distributed.destroy_process_group()


def barrier(ctx: Optional[DistContext] = None) -> None:
    """Wait for every rank of ``ctx.group`` (no-op in a single process)."""
    ctx = ctx or context()
    if ctx.distributed and _initialized():
        torch.distributed.barrier(group=ctx.group)


# ---------------------------------------------------------------------------------------------------------
# Splitting work
# ---------------------------------------------------------------------------------------------------------
def direction_share(n: int, rank: int, world_size: int) -> slice:
    """The contiguous share ``slice(r0, r1)`` of ``range(n)`` for ``rank``: sizes differ by at most one, the
    first ``n % world_size`` ranks take one more. A rank may get an empty share when ``n < world_size``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank} of world_size {world_size}")
    base, extra = divmod(int(n), world_size)
    r0 = rank * base + min(rank, extra)
    return slice(r0, r0 + base + (1 if rank < extra else 0))


def shard(items: Sequence[T], rank: int, world_size: int, sizes: Optional[Sequence[float]] = None) -> List[T]:
    """This rank's items of ``items``: balanced by ``sizes`` when given (largest first, each to the rank with the
    least work so far; ties to the lower rank), else round robin. Deterministic: every rank computes the same
    split from the same list, so the shards are disjoint and cover ``items``; order within a shard follows
    ``items``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank} of world_size {world_size}")
    if sizes is None:
        return list(items[rank::world_size])
    if len(sizes) != len(items):
        raise ValueError(f"sizes must have one entry per item: {len(sizes)} sizes for {len(items)} items")
    load = [0.0] * world_size
    owner = [0] * len(items)
    for i in sorted(range(len(items)), key=lambda i: (-float(sizes[i]), i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += float(sizes[i])
    return [item for item, r in zip(items, owner) if r == rank]


@contextlib.contextmanager
def all_or_none(group=None) -> Iterator[None]:
    """Run the block on every rank of ``group``; when it raises on some ranks, every rank raises (the others a
    ``RuntimeError`` that says so) instead of waiting forever in the next collective. The ranks meet once at the
    end of the block (one small ``all_reduce``). ``group=None`` means no split (as for the pipelines'
    ``process_group=None``, even when a default process group exists): the block runs as is."""
    if group is None or not _initialized():
        yield
        return
    try:
        yield
    except Exception:
        _failures(1, group)
        raise
    failed = _failures(0, group)
    if failed:
        raise RuntimeError(f"{failed} other rank(s) of the process group failed (their error is in their output); "
                           f"this rank stops too")


def _failures(mine: int, group) -> int:
    flag = torch.tensor([float(mine)], dtype=torch.float64)
    return int(all_reduce_sum(flag, group).item())


def split_directions(geometry, group=None):
    """``(part, share)``: this rank's contiguous :func:`direction_share` of ``geometry``'s directions (same
    geometry, same weights) as a geometry of its own, and the ``slice`` it is of the whole. Without a process
    group: ``(geometry, slice(0, N))``. Raises ``ValueError`` when there are fewer directions than ranks."""
    n = geometry.n_directions
    if group is None:
        return geometry, slice(0, n)
    ctx = context(group)
    if n < ctx.world_size:
        raise ValueError(f"n_directions={n} cannot be split over {ctx.world_size} processes; use at least one "
                         f"direction per process")
    share = direction_share(n, ctx.rank, ctx.world_size)
    return geometry.with_directions(share), share


def reconstruct_split(sinogram: torch.Tensor, geometry, share: slice, group, method: str = "fbp", *,
                      filter: str = "ramp2", **kwargs) -> torch.Tensor:
    """Heatmap from this rank's share of the scores, the same on every rank of ``group``.

    ``sinogram`` ``(B, K, n, S)``: the scores of directions ``share`` of ``geometry``. ``"fbp"``: each rank
    filters and backprojects its share (the filter works along each direction's own row, so nothing is
    exchanged first) and an ``all_reduce(SUM)`` adds the partial volumes; ``filter="none"`` averages with
    weights over *all* directions, so each share is scaled by its part of the weight sum. Iterative methods
    (``"sirt"``, ``"cgls"``, ``"fista"``) need every direction in every iteration: the shares are gathered (the
    scores are ``B·K·N·S`` numbers, small next to the volume) and every rank runs the solver on the whole
    sinogram, which gives every rank the single-process result without one ``all_reduce`` per iteration (the
    solver's own work is not divided). ``kwargs``: the other arguments of :func:`tonno_fast.reconstruct`.
    """
    from .reconstruction import reconstruct

    if method != "fbp":
        whole = all_gather_rows(sinogram, 2, group)
        return reconstruct(whole, geometry, method, filter=filter, **kwargs)
    part = geometry.with_directions(share)
    with all_or_none(group):
        heat = reconstruct(sinogram, part, "fbp", filter=filter, **kwargs)
        if filter == "none":  # w_k / Σ_part w  →  w_k / Σ_all w
            heat = heat * (part.weights.sum() / geometry.weights.sum()).to(heat.dtype)
    return all_reduce_sum(heat, group)


# ---------------------------------------------------------------------------------------------------------
# Collectives that work on gloo and NCCL
# ---------------------------------------------------------------------------------------------------------
def _comm_device(group) -> torch.device:
    """Where tensors must be for ``group``'s backend: the current GPU for NCCL, the CPU otherwise."""
    backend = torch.distributed.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group``; every rank gets the sum, on ``tensor``'s device and dtype.
    In a single process it returns ``tensor``. The tensor is moved to the backend's device when needed (a CPU
    tensor under NCCL), and summed in place when it is already there."""
    if not _initialized():
        return tensor
    comm = _comm_device(group)
    work = tensor if tensor.device == comm and tensor.is_contiguous() else tensor.to(comm).contiguous()
    torch.distributed.all_reduce(work, op=torch.distributed.ReduceOp.SUM, group=group)
    if work is tensor:
        return tensor
    return work.to(tensor.device)


def all_gather_rows(tensor: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along ``dim`` in rank order (sizes along ``dim`` may differ between
    ranks; all other sizes must agree). Returns the whole on every rank, on ``tensor``'s device."""
    if not _initialized():
        return tensor
    dist = torch.distributed
    world = dist.get_world_size(group)
    comm = _comm_device(group)
    dim = dim % tensor.ndim
    size = torch.tensor([tensor.shape[dim]], dtype=torch.int64, device=comm)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    padded = tensor.to(comm)
    if tensor.shape[dim] < longest:  # all_gather needs equal shapes
        pad_shape = list(tensor.shape)
        pad_shape[dim] = longest - tensor.shape[dim]
        padded = torch.cat([padded, padded.new_zeros(pad_shape)], dim=dim)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    whole = torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)
    return whole.to(tensor.device)


def gather_objects(obj: Any, group=None) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` in a single process)."""
    if not _initialized():
        return [obj]
    out: List[Any] = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable; ``obj`` itself in a single process)."""
    if not _initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src, group=group)
    return box[0]


# ---------------------------------------------------------------------------------------------------------
# Training under DistributedDataParallel
# ---------------------------------------------------------------------------------------------------------
def rank_seed(seed: int, rank: Optional[int] = None) -> int:
    """A seed in ``[0, 2**63)`` mixed from ``(seed, rank)`` (``rank`` default: this process's) with a SplitMix64
    step rather than added, so ``(seed, rank + 1)`` and ``(seed + 1, rank)`` do not give the same stream."""
    if rank is None:
        rank = context().rank
    mask = (1 << 64) - 1
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(rank) + 1) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return z & ((1 << 63) - 1)


def rank_generator(seed: int, rank: Optional[int] = None, device="cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`rank_seed` ``(seed, rank)`` (``rank`` default: this
    process's), so every rank draws a different, reproducible stream."""
    return torch.Generator(device=device).manual_seed(rank_seed(seed, rank))


def wrap_ddp(model: torch.nn.Module, device=None, group=None, **kwargs) -> torch.nn.Module:
    """``model`` on ``device`` inside ``DistributedDataParallel`` when a process group is initialised (its
    gradients are averaged over the ranks at every ``backward``; parameters start equal because DDP broadcasts
    rank 0's at construction), else ``model`` on ``device`` unchanged. ``kwargs`` go to DDP."""
    if device is not None:
        model = model.to(device)
    if not _initialized():
        return model
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, process_group=group, **kwargs)
