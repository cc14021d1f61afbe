"""Write one benchmark's section into BENCHMARKS.md (atomically), keeping the other sections."""

from __future__ import annotations

import gc
import os
import re
import tempfile
import time
from collections.abc import Callable

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")


def _read(path: str) -> str:
    return open(path).read() if os.path.exists(path) else "# Benchmarks\n"


def _replace(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".bench-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_section(title: str, body: str, path: str = PATH) -> None:
    text = _read(path)
    block = f"## {title}\n\n{body.strip()}\n"
    # A section ends at the next heading or at the next marked block's start marker.
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |^<!-- |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + block
    _replace(path, text)


def write_block(start: str, end: str, body: str, path: str = PATH,
                insert: Callable[[str, str], str] | None = None) -> None:
    """Replace what lies between the ``start`` and ``end`` markers (markers kept) with ``body``;
    where they are missing, ``insert(text, block)`` places the block (default: at the end)."""
    text = _read(path)
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    elif insert is not None:
        text = insert(text, block)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    _replace(path, text)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the architecture where there is none)."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``): the memory benchmarks'
    measure. Reset ``VmHWM`` with ``Path("/proc/self/clear_refs").write_text("5")``."""
    from pathlib import Path

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def md_table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def best_time(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    """Best wall time (s) of ``repeat`` calls of ``fn`` (garbage collected before each), and
    the last call's result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out
