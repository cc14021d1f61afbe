"""Distributed one-shot sparsity on ``torch.distributed``: data-parallel calibration,
layer-parallel solves, results identical to one process.

Used by :func:`graphprune.passes.sparsity.sparsify.compute_masks` when
``gp.sparsify(..., distributed=True)`` runs on every rank of an initialised process group (e.g.
under ``torchrun``), each rank holding the same model and the same calibration batches:

- **calibration**: rank ``r`` runs batches ``r, r + W, r + 2W, ...`` (``W`` ranks). After each
  round of ``W`` batches every rank all-gathers the round's per-batch partial statistics
  (Wanda's ``sq``, DSnoT's ``s1``, SparseGPT's ``X^T X``, token counts, report samples) and folds
  them in batch order, exactly as one process folds its batches
  (:class:`~graphprune.passes.sparsity.calibration.LayerStats`). Sums of the same float64 numbers
  in the same order are the same bits, so every rank holds the single-process totals.
- **solves**: layer ``k`` (counted over the whole run) is solved by rank ``k mod W``; the masks
  (and SparseGPT's reconstructed weights) are broadcast from it, so every rank writes the same
  weights and feeds the next block the same activations.

Precondition: the per-batch forward is deterministic given the weights and the batch (CPU, or
GPUs with deterministic kernels), and all ranks run with the same thread count (matmul results
can depend on how the work is split). The gloo backend runs on CPU (tested: 2 ranks). For NCCL
the exchanged tensors are moved to ``torch.cuda.current_device()`` (call
``torch.cuda.set_device(local_rank)`` first); that path has not run on GPUs, and the statistics
themselves are accumulated on the CPU (:class:`LayerStats`), as in one process.

A failure on one rank (NaN activations, a singular Hessian) is sent to the others at the next
collective, so every rank raises instead of waiting forever.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.distributed as dist
from graphprune.passes.sparsity.calibration import BatchPartial, BatchReduce, LayerStats

from graphprune.ir.errors import ConfigError

__all__ = ["Ranks", "batch_fingerprint", "run_facts", "solve_split"]


class Ranks(BatchReduce):
    """The ranks of an initialised process group, as the sparsity pass uses them."""

    def __init__(self, group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError(
                "distributed=True needs an initialised torch.distributed process group: run "
                "the script under torchrun (python -m torch.distributed.run --nproc-per-node N "
                "script.py) and call torch.distributed.init_process_group() before gp.sparsify")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
        self._total = 0

    # --- agreement ------------------------------------------------------------------------
    def check_same(self, facts: dict[str, str]) -> None:
        """ConfigError on every rank unless all ranks passed equal ``facts`` (name -> text)."""
        every: list = [None] * self.world
        dist.all_gather_object(every, facts, group=self.group)
        for r, other in enumerate(every):
            for k in facts:
                if other.get(k) != every[0].get(k):
                    raise ConfigError(
                        f"distributed=True: ranks disagree on {k} (rank 0: {every[0].get(k)}, "
                        f"rank {r}: {other.get(k)}); every rank must call gp.sparsify with the "
                        "same model, options and calibration batches")

    # --- calibration ----------------------------------------------------------------------
    def local(self, calib: list) -> list:
        self._total = len(calib)
        if len(calib) < self.world:
            raise ConfigError(
                f"distributed=True with {len(calib)} calibration batches on {self.world} ranks: "
                "each rank needs at least one batch; pass more batches (or run fewer ranks)")
        return list(calib)[self.rank :: self.world]

    def after_batch(self, stats: dict[str, LayerStats], error: BaseException | None) -> None:
        self._round(stats, error, present=True)

    def finish(self, stats: dict[str, LayerStats], ran: int) -> None:
        # Ranks with one batch fewer join the last round with nothing to add.
        for _ in range(math.ceil(self._total / self.world) - ran):
            self._round(stats, None, present=False)

    def _round(self, stats: dict[str, LayerStats], error, present: bool) -> None:
        status: list = [None] * self.world
        mine = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(status, mine, group=self.group)
        if error is not None:
            raise error
        failed = [(r, s) for r, s in enumerate(status) if s is not None]
        if failed:
            r, s = failed[0]
            raise ConfigError(f"distributed calibration failed on rank {r}: {s}")
        for name in sorted(stats):
            st = stats[name]
            part = st.part if present else None
            st.part = None
            for p in self._gather(st, part):  # rank order = batch order within a round
                st.fold(p)

    def _gather(self, st: LayerStats, part: BatchPartial | None) -> list[BatchPartial]:
        zero = torch.zeros(st.red, dtype=torch.float64)
        n = torch.tensor([0 if part is None else part.n], dtype=torch.int64)
        sq = zero if part is None else part.sq
        s1 = zero if part is None else part.s1
        ns, sqs, s1s = self._all(n), self._all(sq), self._all(s1)
        Hs = [None] * self.world
        if st.want_hessian:
            H = part.H if part is not None and part.H is not None else None
            Hs = self._all(H if H is not None else torch.zeros(st.red, st.red))
        rows: list = [[] for _ in range(self.world)]
        if st.wants_samples:
            dist.all_gather_object(rows, [] if part is None else part.rows, group=self.group)
        return [BatchPartial(int(ns[r][0]), sqs[r], s1s[r], Hs[r], rows[r])
                for r in range(self.world)]

    def _all(self, t: torch.Tensor) -> list[torch.Tensor]:
        src = t.contiguous() if self.device is None else t.to(self.device)
        out = [torch.empty_like(src) for _ in range(self.world)]
        dist.all_gather(out, src, group=self.group)
        return out if self.device is None else [o.cpu() for o in out]

    # --- solves ---------------------------------------------------------------------------
    def owner(self, k: int) -> int:
        """The rank that solves the ``k``-th layer of the run."""
        return k % self.world

    def share(self, k: int, solution, error: BaseException | None, keep_shape, new_like):
        """Every rank gets the owner's ``(keep, new, seconds, error)`` for layer ``k``.

        The owner passes its solution (or the error its solve raised, which every rank then
        raises); the others pass ``None``. ``new_like`` is a tensor of the reconstructed weights'
        shape and dtype when the method reconstructs weights, else ``None``.
        """
        src = self.owner(k)
        msg = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(msg, src=self._global(src), group=self.group)
        if error is not None:
            raise error
        if msg[0] is not None:
            raise ConfigError(f"distributed solve of layer {k} failed on rank {src}: {msg[0]}")
        mine = self.rank == src
        keep = solution[0].to(torch.uint8) if mine else torch.empty(keep_shape, dtype=torch.uint8)
        err = solution[3] if mine else None
        nums = torch.tensor([solution[2] if mine else 0.0, math.nan if err is None else err],
                            dtype=torch.float64)
        keep, nums = self._bcast(keep, src), self._bcast(nums, src)
        new = None
        if new_like is not None:
            new = self._bcast(solution[1] if mine else torch.empty_like(new_like), src)
        err = None if math.isnan(float(nums[1])) else float(nums[1])
        return keep.bool(), new, float(nums[0]), err

    def _bcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        buf = t.contiguous() if self.device is None else t.to(self.device)
        dist.broadcast(buf, src=self._global(src), group=self.group)
        return buf if self.device is None else buf.cpu()

    def _global(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)


def batch_fingerprint(calib: list) -> str:
    """A short digest of the calibration batches' tensors (shapes, dtypes and values)."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict) or hasattr(x, "keys"):
            for k in sorted(x.keys()):
                h.update(str(k).encode())
                walk(x[k])
        elif isinstance(x, (tuple, list)):
            for v in x:
                walk(v)
        else:
            h.update(repr(x).encode())

    for b in calib:
        walk(b)
    return f"{len(calib)} batches, sha256 {h.hexdigest()[:16]}"


def solve_split(ranks: Ranks, first: int, targets: list, solve, reconstructs: bool) -> list:
    """``(keep, new, seconds, error)`` for each target, each solved by its owner and shared.

    ``first`` numbers the first target among the run's solves (owners rotate over the whole run,
    so the widest layer of each block does not always land on one rank). Each rank first solves
    its share, then the solutions are broadcast in target order.
    """
    mine = {}
    for j, t in enumerate(targets):
        if ranks.owner(first + j) == ranks.rank:
            try:
                mine[j] = (solve(t), None)
            except Exception as e:  # noqa: BLE001 - raised on every rank by share()
                mine[j] = (None, e)
    out = []
    for j, t in enumerate(targets):
        sol, err = mine.get(j, (None, None))
        w = t.weight2d()
        out.append(ranks.share(first + j, sol, err, tuple(w.shape), w if reconstructs else None))
    return out


def run_facts(cfg, targets: list, calib: list) -> dict[str, str]:
    """What every rank must agree on before calibrating: options, layers, weights, batches.

    Weights are compared through a strided sample of each target's values (a different seed or
    checkpoint differs there), not a full hash: reading every byte of a large model twice costs
    seconds per GiB.
    """
    h = hashlib.sha256()
    for t in targets:
        w = t.module.weight.detach()
        h.update(f"{t.name}{tuple(w.shape)}{w.dtype}".encode())
        flat = w.reshape(-1)
        h.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return {"options": repr(cfg), "layers and weights": f"{len(targets)} layers, sha256 "
            f"{h.hexdigest()[:16]}", "calibration batches": batch_fingerprint(calib or [])}
