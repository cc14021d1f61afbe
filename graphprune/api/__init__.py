"""The Python API layer: ``capture``/``explain``, ``prune``, iterative schedules, ``remove_channels``.

Each entry point chains frontends (capture, write-back) and passes (coupling, planning,
criteria); the application layer (recipes, CLI) and :mod:`graphprune` re-export them. May import
the IR, the frontends, the passes and codegen; never the application layer or the testing helpers.
"""
