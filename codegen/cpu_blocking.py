"""Row blocking (the GEMM "M-block") for :mod:`graphprune.codegen.cpu_rules`' K-blocked schedule.

The K-blocked contraction runs ``panel (parallel) -> K slice -> row tiles``: a ``kc x bn`` slice
of the packed weight stays in L1 while every row tile passes it, and the activation rows are
re-read once per panel. Two costs grow with the row count and the panel count:

* **L2 reuse of the activation.** All rows x K of the activation are read for every panel; once
  that block (``rows * K * 4`` bytes: 1.5 MiB for BERT-base's FFN down-projection at sequence
  128) no longer fits L2 next to the streaming panel, each panel re-reads it from L3.
* **Thread balance.** Only the panels were parallel: a pruned layer with 3 panels on 2 threads
  ran 2 + 1, a third of the second core idle, and one panel ran serially.

Splitting the rows into ``blocks`` M-blocks and running ``(panel, block)`` pairs in parallel fixes
both: each pair's activation block is sized for L2, and the parallel extent is made even and at
least :data:`MIN_PARALLEL` where the rows allow. A block is a whole number of register tiles (at
least :data:`MIN_TILES_PER_BLOCK`, so a weight slice loaded into L1 still serves several row
tiles). Runs at schedule time; constant row counts only (a symbolic row count keeps one block:
its tail is padded to the register tile, not to a block).
"""

from __future__ import annotations

from graphprune.codegen.cpu_tiles import row_tile_fits

__all__ = ["L2_ROW_BLOCK_BYTES", "MIN_PARALLEL", "MIN_TILES_PER_BLOCK", "row_blocks"]

# Activation bytes per M-block: half of the smallest L2 of the project's machines (AMD Zen 4:
# 1 MiB per core; Sapphire Rapids: 2 MiB), the other half for the streaming weight panel.
L2_ROW_BLOCK_BYTES = 512 * 1024
# Parallel (panel, block) pairs wanted: an even count, so 1, 2 and 4 threads split it evenly.
MIN_PARALLEL = 4
MIN_TILES_PER_BLOCK = 4


def row_blocks(rows: int, rt: int, k: int, panels: int, dtype_bits: int = 32,
               row_extents: list[int] | None = None) -> int:  # fmt: skip
    """How many M-blocks to split ``rows`` (a multiple of ``rt``) into, for a K-blocked
    contraction with reduction length ``k`` and ``panels`` output-channel panels.

    The fewest blocks whose activation block (``rows / blocks * k`` elements) fits
    :data:`L2_ROW_BLOCK_BYTES`, then more while the parallel extent ``panels * blocks`` is odd or
    below :data:`MIN_PARALLEL` (where the rows allow an even extent); never fewer than
    :data:`MIN_TILES_PER_BLOCK` register tiles per block.
    1 = no row blocking (the rule's previous schedule).

    ``row_extents`` (the row axes fused into ``rows``, outermost first): a block must be a box of
    them (:func:`.cpu_tiles.row_tile_fits`). The epilogue runs once per (panel, block) over the
    block's region, and TVM covers a block that straddles an outer row axis (224 rows of a
    ``2 x 28 x 28`` conv output: half of image 0's last rows and image 1's first) with the bounding
    box of both images, so it would read rows another thread is still accumulating.

    >>> row_blocks(128, 4, 3072, 16)  # BERT-base FFN down: 1.5 MiB of activation -> 4 x 384 KiB
    4
    >>> row_blocks(128, 8, 768, 32)  # FFN up: 384 KiB, 32 panels: one block
    1
    >>> row_blocks(128, 8, 768, 3)  # 3 panels: 2 blocks, 6 pairs for 2 threads
    2
    >>> row_blocks(1568, 4, 512, 2, row_extents=[2, 28, 28])  # not 7 x 224 rows: 8 x 7 image rows
    8
    """
    if rt <= 0 or rows % rt:
        return 1
    tiles = rows // rt
    options = [
        b for b in range(1, tiles + 1) if tiles % b == 0 and tiles // b >= MIN_TILES_PER_BLOCK
        and (b == 1 or row_extents is None or row_tile_fits(rows // b, row_extents))
    ]
    if not options:
        return 1
    row_bytes = k * dtype_bits // 8
    fits = [b for b in options if rows // b * row_bytes <= L2_ROW_BLOCK_BYTES]
    blocks = fits[0] if fits else options[-1]
    more = [b for b in options if b >= blocks and (panels * b) % 2 == 0]
    for b in more:
        if panels * b >= MIN_PARALLEL:
            return b
    # Too few rows for MIN_PARALLEL pairs: the most even split they allow.
    return more[-1] if more and panels * blocks % 2 else blocks
