"""Write files and directories all at once: build them beside their place, then rename.

A reader never sees half a file or half an artifact. The pipeline assembles an artifact in
``.NAME.tmp-*`` next to ``NAME`` and renames it only when every step succeeded, so an interrupted
or failed run leaves no partial artifact (a ``kill -9`` can leave the hidden folder, never a
half-written ``NAME``). An existing ``NAME`` is replaced only with ``force`` and only when it is
an earlier artifact (it holds ``manifest.json``) or empty. Reports, ``bench.json`` and the CLI's
``inspect --json/--dot`` files go through :func:`write_text_atomic`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from graphprune.ir.errors import ConfigError

__all__ = ["check_replaceable", "staging_dir", "swap_into_place", "write_text_atomic"]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a hidden temporary file beside ``path``, then rename it over ``path``.

    The file gets the usual permissions (``0o666`` less the umask), as a plain write would give.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "x") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_replaceable(out: Path, force: bool) -> None:
    """Refuse an existing ``out`` unless ``force`` and it is an artifact or an empty folder."""
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise ConfigError(f"output directory {out} exists: choose another out or pass --force "
                          f"(force=True) to replace it")  # fmt: skip
    if not out.is_dir() or ((not (out / "manifest.json").exists()) and any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not a graphprune artifact; refusing to replace it "
                          f"even with --force (remove it yourself or choose another out)")  # fmt: skip


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A fresh hidden folder beside ``out`` (``.NAME.tmp-*``), removed with what is left in it
    on leaving, whether the block succeeded, failed or was interrupted."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_into_place(new: Path, out: Path, force: bool) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is moved aside first and restored if the
    rename fails, then deleted."""
    if out.exists() or out.is_symlink():
        check_replaceable(out, force)  # re-check: it may have appeared while we were working
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "previous")
        try:
            os.rename(new, out)
        except BaseException:
            os.rename(old / "previous", out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, out)
