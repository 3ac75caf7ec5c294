"""Several processes on one run, launched by ``torchrun`` (data-parallel training with
capture, and the embedding's independent parts spread over ranks).

``torchrun --nproc-per-node N -m dve_repro train …`` starts N copies of the command;
torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their
environment, and :func:`context` joins the process group (gloo on the CPU, nccl on CUDA)
the first time a stage asks for it. A plain ``dve …`` (no torchrun) is rank 0 of 1 and
none of this does anything.

Training is the functional step of ``train.py`` with one all-reduce in it: each rank
computes ∇_θ Σ_{i∈slice} w_i ℓ_i over its contiguous slice of the global batch (w_i =
1/|B_t|, the global batch size), the gradients are summed over ranks (what DDP's reducer
does for a module), and every rank applies the same update, so θ stays identical on every
rank. The sum in another order rounds differently from one process's backward over the
whole batch: a replay on one process equals an N-rank run up to that rounding (measured in
``tests/unit/test_distributed.py``), not bit for bit.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from dve_repro.errors import ConfigError, DveError

Tensors = dict[str, torch.Tensor]
T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """This process's place among ``world`` ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes shared files (checkpoints, tables, DONE)."""
        return self.rank == 0

    def device(self, device: str) -> str:
        """The device of this rank: ``cuda`` becomes ``cuda:<local rank>``."""
        if self.active and torch.device(device).type == "cuda":
            return f"cuda:{self.local_rank}"
        return device

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable object)."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0 (None on the others)."""
        if not self.active:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def batch_slice(self, n: int) -> slice:
        """This rank's contiguous part of a global batch of ``n`` rows (the first ``n mod
        world`` ranks take one row more); empty when ``n < world`` leaves none."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def sum_grads(self, grads: Tensors) -> Tensors:
        """Σ over ranks of every gradient, in sorted-name order (one all-reduce per tensor
        in the same order on every rank)."""
        if not self.active:
            return grads
        for k in sorted(grads):
            torch.distributed.all_reduce(grads[k], op=torch.distributed.ReduceOp.SUM)
        return grads

    def sum_scalar(self, value: float, device: str = "cpu") -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return float(t.item())


_CONTEXT: Context | None = None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ConfigError(f"{name}={raw!r} in the environment is not an integer (set by torchrun)") from None


def context(device: str = "cpu") -> Context:
    """This process's :class:`Context`; joins torchrun's process group on first use.

    ``device`` picks the backend: nccl for CUDA, gloo otherwise (the CPU, and CI)."""
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        _CONTEXT = Context()
        return _CONTEXT
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not torch.distributed.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not torch.distributed.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(local)
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    _CONTEXT = Context(rank, world, local)
    return _CONTEXT


def shutdown() -> None:
    """Leave the process group (end of a torchrun command); a no-op on one process."""
    global _CONTEXT
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "gloo":
            # Ranks meet before the group is torn down: a rank that destroys its gloo group
            # while a peer is still in the last collective can abort the peer (SIGABRT, seen
            # once in a 2-rank test). A peer that has already failed is not waited for long.
            with contextlib.suppress(RuntimeError):
                torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        torch.distributed.destroy_process_group()
    _CONTEXT = None


def on_main(ctx: Context, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 alone (checks, locks, the first files), its picklable result on
    every rank. A refusal (:class:`DveError`) on rank 0 is raised on every rank, so each
    prints the same one line and nothing more is done. (Any other failure ends rank 0's
    process, and torchrun then stops the others.)"""
    result, error, failure = None, "", None
    if ctx.is_main:
        try:
            result = fn()
        except DveError as exc:
            error, failure = str(exc), exc
    result, error = ctx.broadcast((result, error))
    if failure is not None:
        raise failure
    if error:
        raise ConfigError(error)
    return result


def split_contiguous(costs: list[int], parts: int) -> list[tuple[int, int]]:
    """Cut items 0..n−1 (in order) into ``parts`` contiguous ranges [a, b) of about equal
    total cost (each cut at the prefix sum nearest its share; some ranges are empty when
    n < parts)."""
    n, total = len(costs), float(sum(costs))
    cum = np.concatenate([[0.0], np.cumsum(costs, dtype=np.float64)])
    cuts = [0]
    for r in range(1, parts):
        target = total * r / parts
        hi = min(int(np.searchsorted(cum, target, side="left")), n)
        best = hi if hi == 0 or abs(cum[hi] - target) <= abs(cum[hi - 1] - target) else hi - 1
        cuts.append(max(cuts[-1], best))
    cuts.append(n)
    cuts = [min(c, n) for c in cuts]
    return [(cuts[r], cuts[r + 1]) for r in range(parts)]
