"""The application layer: recipes and the run pipeline, the CLI, reports, evaluation, benchmarks.

Top of the stack: may import every layer below (API, codegen, passes, frontends, IR) and the
testing helpers (the CLI's ``demo`` runs the oracle). Nothing below imports it.
"""
