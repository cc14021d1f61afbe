"""Register-tile and cache-blocking arithmetic for the CPU contraction rule (:mod:`.cpu_rules`):
pure functions of the loop extents, so they can be tested and A/B-ed without building anything."""

from __future__ import annotations

__all__ = [
    "L1_PANEL_BYTES",
    "L2_LOAD_COST",
    "k_block",
    "l2_panel_bytes",
    "register_tile",
    "row_tile_fits",
]


def row_tile_fits(rt: int, extents: list[int]) -> bool:
    """``rt`` consecutive rows of the fused spatial axes form a box (no partial inner rows), so
    the epilogue computed at the tile covers exactly the tile."""
    for e in reversed(extents):
        if rt <= e:
            return e % rt == 0
        if rt % e:
            return False
        rt //= e
    return rt == 1


L1_PANEL_BYTES = 32 * 1024  # of the 48 KiB L1d on recent x86 cores; the rest for rows/output


def k_block(extents, n_spatial, rt, bn, dtype_bits) -> int | None:
    """Reduction slice for GEMM blocking, or ``None`` when the whole panel fits L1 or the
    contraction is not GEMM-like (one reduction axis that is not unit: matmul, 1x1 conv)."""
    reduce = extents[n_spatial:]
    rows = 1
    for e in extents[: n_spatial - 1]:
        rows *= e
    if any(e != 1 for e in reduce[:-1]) or rows <= rt or n_spatial < 2:
        return None
    k = reduce[-1]
    per_k = bn * dtype_bits // 8
    if k * per_k <= L1_PANEL_BYTES:
        return None
    limit = L1_PANEL_BYTES // per_k
    for kc in range(min(limit, k), 31, -1):
        if k % kc == 0:
            return kc
    return None


# Relative cost of a weight-vector load that misses L1 (the panel is streamed from L2).
L2_LOAD_COST = 2


def l2_panel_bytes(extents, n_spatial, vec, dtype_bits) -> int:
    """Bytes of packed weight panel per column vector of the tile, where that panel is read
    from L2 at every row tile: a contraction that is not GEMM-like (a kh x kw > 1 conv: more
    than one non-unit reduction axis) gets no K-blocking, so a panel over L1 stays out of L1.
    0 where the weight loads hit L1 (GEMM-like: K-blocked to fit)."""
    reduce = extents[n_spatial:]
    if all(e == 1 for e in reduce[:-1]):
        return 0
    k = 1
    for e in reduce:
        k *= e
    return k * vec * dtype_bits // 8


def register_tile(
    row_extents: list[int], col_vectors: int, max_acc: int, panel_bytes_per_ct: int = 0
) -> tuple[int, int]:
    """Rows x column-vectors of the accumulator tile: the most FMAs per load (rows * cols /
    (rows + w * cols)) within ``max_acc`` registers, rows a box of the fused spatial axes.
    ``w`` = :data:`L2_LOAD_COST` where the tile's weight panel (``ct * panel_bytes_per_ct``)
    exceeds L1, else 1: fewer columns, more rows then, since every row tile re-reads the panel
    from L2 (ResNet-50's 3x3 convs: 2x8 -> 7x2 tiles, 28-31% faster on AVX-512)."""
    total = 1
    for e in row_extents:
        total *= e
    best, best_score = (1, 1), -1.0
    for ct in range(1, min(col_vectors, max_acc) + 1):
        if col_vectors % ct:
            continue
        w = L2_LOAD_COST if ct * panel_bytes_per_ct > L1_PANEL_BYTES else 1
        for rt in range(1, max_acc // ct + 1):
            if total % rt or not row_tile_fits(rt, row_extents):
                continue
            score = rt * ct / (rt + w * ct)
            if score > best_score + 1e-9:
                best, best_score = (rt, ct), score
    return best
