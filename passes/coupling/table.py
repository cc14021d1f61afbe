"""The dimension-variable table of BuildCoupling: a union-find with refinements.

Every tensor axis of the graph gets a variable (:meth:`VarTable.new`). Op rules relate them:

* :meth:`VarTable.unify`: the same index space (a Linear's in-features and its input's last axis);
* :meth:`VarTable.refine` ``(v, "prod", parts)``: ``v`` factorises row-major into ``parts``
  (C → heads × head_dim in a reshape, C → groups × per-group in a grouped conv);
* :meth:`VarTable.refine` ``(v, "cat", parts)``: ``v`` is the concatenation of ``parts`` (cat,
  split, slice).

When two refined variables meet, their refinements are reconciled: both are split at the union of
their boundaries and tied leaf by leaf, or the variable is *frozen* with the reason why they
cannot agree. Freezing records a reason and never raises: the group is then reported as not
prunable. Stating that axes of different sizes are one index space (``unify``), or that an axis
is a product or concatenation of axes whose sizes do not add up (``refine``), is a contradiction
no freezing explains: it raises :class:`~graphprune.ir.CouplingError`, which BuildCoupling
re-raises naming the op. Pure data structure otherwise: knows nothing of ops or graphs.
"""

from __future__ import annotations

import math

from graphprune.ir.errors import CouplingError

Axis = tuple[str, int]  # (value id, axis)


class VarTable:
    """Union-find over dimension variables with row-major/concat refinements."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.parts: dict[int, tuple[str, list[int]]] = {}
        self.frozen: dict[int, list[str]] = {}
        self.reductions: dict[int, list[str]] = {}

    def new(self, size: int, frozen: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        v = len(self.parent) - 1
        if frozen:
            self.frozen[v] = [frozen]
        return v

    def find(self, v: int) -> int:
        root = v
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[v] != root:
            self.parent[v], v = root, self.parent[v]
        return root

    def freeze(self, v: int, reason: str) -> None:
        r = self.find(v)
        lst = self.frozen.setdefault(r, [])
        if reason not in lst and len(lst) < 8:
            lst.append(reason)

    def reduce(self, v: int, note: str) -> None:
        r = self.find(v)
        lst = self.reductions.setdefault(r, [])
        if note not in lst:
            lst.append(note)

    def unify(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise CouplingError(f"axes of sizes {self.size[ra]} and {self.size[rb]} are stated to "
                                "be one index space")  # fmt: skip
        pa, pb = self.parts.pop(ra, None), self.parts.pop(rb, None)
        self.parent[rb] = ra
        for table in (self.frozen, self.reductions):
            if rb in table:
                for x in table.pop(rb):
                    if x not in table.setdefault(ra, []):
                        table[ra].append(x)
        if pa and pb:
            self.parts[ra] = pa
            self._reconcile(ra, pa, pb)
        elif pa or pb:
            self.parts[ra] = pa or pb

    def refine(self, v: int, mode: str, parts: list[int]) -> None:
        """State ``v == mode(parts)`` ("prod": row-major product, "cat": concatenation)."""
        if mode == "prod":
            parts = [p for p in parts if self.size[self.find(p)] != 1]
        else:
            parts = [p for p in parts if self.size[self.find(p)] != 0]
        if len(parts) == 1:
            self.unify(v, parts[0])
            return
        if not parts:
            return
        r = self.find(v)
        total = math.prod(self.size[self.find(p)] for p in parts) if mode == "prod" else sum(
            self.size[self.find(p)] for p in parts)
        if total != self.size[r]:
            sizes = [self.size[self.find(p)] for p in parts]
            what = "row-major product" if mode == "prod" else "concatenation"
            raise CouplingError(f"an axis of size {self.size[r]} is stated to be the {what} of "
                                f"axes of sizes {sizes} (= {total})")  # fmt: skip
        if any(self.find(p) == r for p in parts):
            self.freeze(r, "axis refines into itself")
            return
        old = self.parts.get(r)
        if old is None:
            self.parts[r] = (mode, list(parts))
        else:
            self._reconcile(r, old, (mode, list(parts)))

    def _reconcile(self, r: int, a: tuple[str, list[int]], b: tuple[str, list[int]]) -> None:
        """Make two refinements of the same variable agree (or freeze it, saying why)."""
        (ma, pa), (mb, pb) = a, b
        if ma != mb:
            # cat of k equal parts == prod(k, part): tie each part to the inner factor; the
            # "which part" factor cannot be pruned (it would remove a whole cat input).
            cat, prod = (pa, pb) if ma == "cat" else (pb, pa)
            sizes = {self.size[self.find(p)] for p in cat}
            outer = self.size[self.find(prod[0])]
            if len(sizes) == 1 and outer == len(cat):
                self.freeze(prod[0], "a concatenation is also reshaped into groups")
                inner = prod[1] if len(prod) == 2 else self.new(sizes.pop())
                if len(prod) > 2:
                    self.refine(inner, "prod", prod[1:])
                for p in cat:
                    self.unify(p, inner)
                self.parts[r] = ("prod", prod)
                return
            self._freeze_both(r, a, b, "an axis is both concatenated and reshaped in "
                              "incompatible ways")
            return
        la, lb = self.leaves_of(pa, ma), self.leaves_of(pb, mb)
        if ma == "prod":
            ok = self._align(la, lb, prod=True)
        else:
            ok = self._align(la, lb, prod=False)
        if not ok:
            self._freeze_both(r, a, b, "reshapes of this axis factorise it in incompatible ways")
        self.parts[r] = a

    def _freeze_both(self, r: int, a: tuple[str, list[int]], b: tuple[str, list[int]],
                     reason: str) -> None:  # fmt: skip
        # Only ``a`` stays r's refinement; ``b``'s parts (a slice's output, a chunk) would leave
        # the axis unfrozen, so they are frozen here with the same reason.
        self.freeze(r, reason)
        self.parts[r] = a
        for p in b[1]:
            self.freeze(p, reason)

    def leaves_of(self, parts: list[int], mode: str) -> list[int]:
        out: list[int] = []
        for p in parts:
            rp = self.find(p)
            sub = self.parts.get(rp)
            if sub and sub[0] == mode:
                out.extend(self.leaves_of(sub[1], mode))
            else:
                out.append(rp)
        return out

    def _align(self, la: list[int], lb: list[int], prod: bool) -> bool:
        """Split the items of two same-size sequences at their union of boundaries, then tie."""
        def bounds(lst: list[int]) -> list[int]:
            acc, out = (1 if prod else 0), []
            for v in lst:
                acc = acc * self.size[v] if prod else acc + self.size[v]
                out.append(acc)
            return out

        ba, bb = bounds(la), bounds(lb)
        merged = sorted(set(ba) | set(bb))
        if prod and any(merged[i + 1] % merged[i] for i in range(len(merged) - 1)):
            return False
        atoms, prev = [], (1 if prod else 0)
        for m in merged:
            atoms.append(m // prev if prod else m - prev)
            prev = m
        for lst, bl in ((la, ba), (lb, bb)):
            k = 0
            for v, end in zip(lst, bl):
                mine = []
                while k < len(merged) and merged[k] <= end:
                    mine.append(atoms[k])
                    k += 1
                if len(mine) > 1:
                    self.refine(v, "prod" if prod else "cat", [self.new(s) for s in mine])
        la2 = self.leaves_of(la, "prod" if prod else "cat")
        lb2 = self.leaves_of(lb, "prod" if prod else "cat")
        if [self.size[v] for v in la2] != [self.size[v] for v in lb2]:
            return False
        for x, y in zip(la2, lb2):
            self.unify(x, y)
        return True