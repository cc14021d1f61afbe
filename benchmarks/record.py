"""Write one benchmark's section into BENCHMARKS.md (atomically), keeping the other sections."""

from __future__ import annotations

import os
import re
import tempfile

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")


def write_section(title: str, body: str, path: str = PATH) -> None:
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    block = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + block
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".bench-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
