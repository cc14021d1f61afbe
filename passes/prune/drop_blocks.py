"""DropBlocks: depth pruning — remove whole residual branches f from y = x + f(x).

``find_blocks`` finds every ``add`` whose one input (the skip ``x``) is an ancestor of the other
(the branch output ``f(x)``) with identical shapes; the branch's ops are those between the two
that nothing outside the branch reads. Ranking by Block Influence (Men et al. 2024, ShortGPT):
BI = 1 − E[cos(x, y)] over calibration tokens/pixels (cosine over the channel axis) — a branch
that barely turns its input is the cheapest to drop. Removal rewires the add's users to ``x``;
dead ops and their parameters then disappear. Runs after capture; does not use the coupling.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import networkx as nx
import numpy as np
import torch

from graphprune.ir.errors import ConfigError
from graphprune.ir import PruneGraph
from graphprune.passes.base import PassResult


@dataclass
class Block:
    """A residual branch: ``add`` computes ``skip + branch`` and ``ops`` compute ``branch``."""

    id: int
    add: str
    skip: str
    branch: str
    ops: set[str] = field(default_factory=set)
    params: set[str] = field(default_factory=set)
    # For a whole layer (``unit="layer"``): its residual branches in order; ``skip`` is the first
    # one's input and ``add`` the last one's add.
    parts: list[Block] = field(default_factory=list)

    @property
    def branches(self) -> list[Block]:
        return self.parts or [self]

    @property
    def name(self) -> str:
        """Where the branch's parameters live: ``layers.3.{mlp,post_norm}`` (a layer: ``layers.3``)."""
        key = _layer_key(self) if self.parts else None
        if key:
            return key
        mods = sorted({p.rsplit(".", 1)[0] for p in self.params})
        if not mods:
            return self.add
        prefix = mods[0].split(".")
        for m in mods[1:]:
            parts = m.split(".")
            n = 0
            while n < min(len(prefix), len(parts)) and prefix[n] == parts[n]:
                n += 1
            prefix = prefix[:n]
        heads = sorted({m.split(".")[len(prefix)] for m in mods if len(m.split(".")) > len(prefix)})
        base = ".".join(prefix)
        if heads and not all(h.isdigit() for h in heads):
            tail = heads[0] if len(heads) == 1 else "{" + ",".join(heads) + "}"
            return f"{base}.{tail}" if base else tail
        return base


def find_blocks(pg: PruneGraph) -> list[Block]:
    """Every identity-skip residual branch of ``pg``, in graph order."""
    g = pg.nx
    blocks = []
    for o in pg.ops():
        if pg.op(o).kind != "add":
            continue
        ins = [v for v in pg.op_inputs(o) if v is not None]
        out = pg.op_outputs(o)[0]
        if len(ins) != 2 or ins[0] == ins[1]:
            continue
        shapes = {tuple(pg.value(v).shape or ()) for v in ins + [out]}
        if len(shapes) != 1:
            continue
        for skip, branch in ((ins[0], ins[1]), (ins[1], ins[0])):
            anc = nx.ancestors(g, branch)
            if skip not in anc:
                continue
            region = (anc & nx.descendants(g, skip)) | {branch}
            ops = {n for n in region if pg.is_op(n)}
            # Only ops whose every output stays inside the branch (or is the branch) can go.
            inside = True
            for op in ops:
                for v in pg.op_outputs(op):
                    if v != branch and any(c not in ops for c, _ in pg.consumers(v)):
                        inside = False
            if branch in pg.outputs or not inside or not ops:
                continue
            params = {pg.value(v).param for op in ops for v in pg.op_inputs(op)
                      if v is not None and pg.value(v).role == "param"
                      and all(c in ops for c, _ in pg.consumers(v))}  # fmt: skip
            if params:  # a parameter-free "branch" is arithmetic (GELU's x + c·x³), not a block
                blocks.append(Block(len(blocks), o, skip, branch, ops, params))
            break
    return blocks


def _layer_key(b: Block) -> str | None:
    """The per-layer container a branch lives in (``model.layers.3``), or None."""
    mods = sorted({p.rsplit(".", 1)[0] for p in b.params})
    parts = mods[0].split(".") if mods else []
    common = 0
    while common < len(parts) and all(m.split(".")[common:common + 1] == [parts[common]]
                                      for m in mods):  # fmt: skip
        common += 1
    digits = [i for i in range(common) if parts[i].isdigit()]
    return ".".join(parts[: digits[-1] + 1]) if digits else None


_NO_OPS = {"to", "_to_copy", "clone", "contiguous", "alias", "detach", "identity", "dropout"}


def _through_no_ops(pg: PruneGraph, v: str) -> str:
    """``v`` with value-preserving casts/copies before it peeled off (``h.to(float32)``)."""
    while (op := pg.producer(v)) is not None:
        node, ins = pg.op(op), [i for i in pg.op_inputs(op) if i is not None]
        name = str(node.attrs.get("aten", node.kind)).lower()
        same = len(ins) == 1 and pg.value(ins[0]).shape == pg.value(v).shape and (
            pg.value(ins[0]).dtype == pg.value(v).dtype)  # fmt: skip
        if not same or (name not in _NO_OPS and node.kind not in _NO_OPS):
            return v
        v = ins[0]
    return v


def find_layers(pg: PruneGraph) -> list[Block]:
    """Whole layers: runs of residual branches chained skip-to-add in the same numbered
    container (a pre-norm transformer layer's attention and MLP branches, as ShortGPT drops
    them). A branch with no partner stays a unit of its own."""
    runs: list[list[Block]] = []
    for b in find_blocks(pg):
        prev = runs[-1][-1] if runs else None
        key = _layer_key(b)
        if (prev is not None and key is not None and key == _layer_key(prev)
                and _through_no_ops(pg, b.skip) == pg.op_outputs(prev.add)[0]):  # fmt: skip
            runs[-1].append(b)
        else:
            runs.append([b])
    layers = []
    for i, run in enumerate(runs):
        if len(run) == 1:
            layers.append(dataclasses.replace(run[0], id=i))
            continue
        ops = set().union(*(b.ops for b in run)) | {b.add for b in run[:-1]}
        layers.append(Block(i, run[-1].add, run[0].skip, run[-1].branch, ops,
                            set().union(*(b.params for b in run)), run))  # fmt: skip
    return layers


def _channel_rows(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().float()
    if t.dim() == 4:  # NCHW: cosine over channels at each pixel
        t = t.movedim(1, -1)
    return t.reshape(-1, t.shape[-1])


def block_influence(pg: PruneGraph, blocks: list[Block], calib: Any) -> np.ndarray:
    """BI = 1 − mean cos(x, x + f(x)) per block over the calibration batches."""
    if pg.frontend != "torch":
        raise ConfigError("block_influence needs a torch capture (it runs calibration data)")
    from graphprune.passes.prune.calibration import calibration_batches

    skips = {b.skip for b in blocks}
    y_of = {pg.op_outputs(b.add)[0]: b.id for b in blocks}
    seen: dict[tuple[str, int], torch.Tensor] = {}
    sums = np.zeros(len(blocks))
    counts = np.zeros(len(blocks))

    def record(v: str, t: torch.Tensor) -> None:
        if v in y_of:
            seen[("y", y_of[v])] = t
        for b in blocks:  # several blocks may share one skip input
            if b.skip == v:
                seen[("x", b.id)] = t

    def batches():
        for batch in calibration_batches(calib, pg):
            seen.clear()
            yield batch
            score()

    def score() -> None:
        for b in blocks:
            x, y = seen.get(("x", b.id)), seen.get(("y", b.id))
            if x is None or y is None:
                continue
            cos = torch.nn.functional.cosine_similarity(_channel_rows(x), _channel_rows(y),
                                                        dim=-1, eps=1e-8)  # fmt: skip
            sums[b.id] += float(cos.sum())
            counts[b.id] += cos.numel()

    pg.source.observe(batches(), skips | set(y_of), record)
    if (counts == 0).any():
        missing = [blocks[i].name for i in np.flatnonzero(counts == 0)]
        raise ConfigError(f"block influence could not observe blocks {missing}")
    return 1.0 - sums / counts


def drop(pg: PruneGraph, dropped: list[Block]) -> Any:
    """The captured model (in its frontend's form) with each dropped branch removed: its add
    returns the skip input, and whatever only the branch used disappears."""
    return pg.source.bypass(pg, {br.add: br.skip for b in dropped for br in b.branches})


def choose(blocks: list[Block], scores: np.ndarray, k: int) -> list[Block]:
    if not 0 < k < len(blocks) + 1:
        raise ConfigError(f"drop_blocks={k}: the model has {len(blocks)} residual blocks "
                          f"({', '.join(b.name for b in blocks[:6])}...)")  # fmt: skip
    order = np.argsort(scores, kind="stable")
    return [blocks[i] for i in sorted(order[:k].tolist())]


def scores_for(pg: PruneGraph, blocks: list[Block], criterion: Any, calib: Any) -> np.ndarray:
    if criterion in ("block_influence", "bi"):
        if calib is None:
            raise ConfigError("criterion 'block_influence' needs calib=[batch, ...]")
        return block_influence(pg, blocks, calib)
    if isinstance(criterion, dict):
        unknown = set(criterion) - {b.name for b in blocks}
        if unknown:
            raise ConfigError(f"block scores for unknown blocks {sorted(unknown)}; blocks are "
                              f"{[b.name for b in blocks]}")  # fmt: skip
        return np.array([criterion.get(b.name, np.inf) for b in blocks], dtype=float)
    if callable(criterion):
        return np.asarray(criterion(pg, blocks), dtype=float)
    raise ConfigError(f"depth pruning criterion {criterion!r}: use 'block_influence', a dict "
                      "{block name: score} or a callable (graph, blocks) -> scores")


def block_cost(pg: PruneGraph, blocks: list[Block]) -> tuple[int, int]:
    """MACs and trainable parameters inside ``blocks``."""
    from graphprune.passes import cost as cost_model

    c = cost_model.count(pg)
    macs = sum(c.per_op.get(o, 0) for b in blocks for o in b.ops)
    params = sum(c.per_param.get(p, 0) for b in blocks for p in b.params)
    return macs, params


Scorer = Callable[[PruneGraph, list[Block]], np.ndarray]


@dataclass
class BlockSelection:
    """What :class:`DropBlocks` chose: every candidate block, its score, and the dropped ones."""

    blocks: list[Block]
    scores: np.ndarray
    dropped: list[Block]


class DropBlocks:
    """Depth pruning as a pass: ``run(pg, k=..., criterion=..., calib=..., unit="branch")`` gives
    ``PassResult(BlockSelection)``. Plans only: :func:`drop` writes the model. The report lists
    each block's score (lower goes first)."""

    name: str = "DropBlocks"
    requires: tuple[str, ...] = ()

    def run(self, graph: PruneGraph, *, k: int, criterion: Any = "block_influence",
            calib: Any = None, unit: str = "branch") -> PassResult[BlockSelection]:  # fmt: skip
        if unit not in ("branch", "layer"):
            raise ConfigError(f"depth_unit={unit!r}: use 'branch' or 'layer'")
        blocks = find_blocks(graph) if unit == "branch" else find_layers(graph)
        if not blocks:
            raise ConfigError(f"{graph.name} has no identity residual blocks (y = x + f(x)) to drop")
        scores = scores_for(graph, blocks, criterion, calib)
        dropped = choose(blocks, scores, k)
        report = {"scores": {b.name: float(s) for b, s in zip(blocks, scores)},
                  "dropped": [b.name for b in dropped]}  # fmt: skip
        return PassResult(BlockSelection(blocks, scores, dropped), bool(dropped), report)
