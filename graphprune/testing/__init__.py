"""Testing helpers for tests and cautious users: the dead-channel oracle (torch and ONNX).

Make a group's channels provably dead, remove them, compare with the original: see
:func:`graphprune.testing.oracle.run_oracle`. Imported by tests and by the application layer
(the CLI's ``demo``); never by the IR, frontends, passes or codegen.
"""

from graphprune.testing.oracle import OracleResult, dead_positions, run_oracle

__all__ = ["OracleResult", "dead_positions", "run_oracle"]
