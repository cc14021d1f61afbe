"""Hidden staging entries beside an output, and the removal of those an interrupted run left.

An artifact directory (:mod:`graphprune.codegen.artifact`), an ONNX file with its external
data (:func:`graphprune.frontends.onnx.files.save_onnx`), a pipeline artifact and every file
the application writes atomically (:mod:`graphprune.app.atomic`) are assembled in a hidden
sibling and renamed into place. A ``kill -9`` (or a power cut) leaves that sibling behind, and nothing else would
ever remove it. So every staging entry is named ``.NAME.tmp-PID-XXXXXXXX`` (``.old-`` for an
artifact moved aside while it is replaced) after the process that made it, and each new staging
entry first removes the stale ones in the same directory: those whose process is gone, or older
than :data:`STALE_AFTER_S` (a process id reused by an unrelated process). An entry of a live
process is never touched, so concurrent writers into one directory are safe. Entries named the
old way (``.NAME.tmp-`` and eight random characters, from ``tempfile.mkdtemp``) are removed only
for the same ``NAME`` and only past :data:`STALE_AFTER_S`.

Process ids are those of this machine: two machines writing into one shared (NFS) directory
could each see the other's live writer as gone. In the bottom layer (beside the IR and the
runtime; standard library only) so that every writer uses it: the ONNX frontend's
``save_onnx``, codegen's artifacts and the application's files.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path

__all__ = ["STALE_AFTER_S", "existing_ancestor", "make_staging_dir", "remove_stale", "staging_path"]

#: age after which a staging entry is stale even if a process of its id is running
STALE_AFTER_S = 48 * 3600
_OURS = re.compile(r"^\..+\.(?:tmp|old)-(\d+)-[0-9a-f]{8}$")


def staging_path(out: str | os.PathLike, kind: str = "tmp") -> Path:
    """A fresh hidden name beside ``out``: ``.NAME.{kind}-PID-XXXXXXXX`` (not created)."""
    out = Path(out)
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def make_staging_dir(out: str | os.PathLike, kind: str = "tmp") -> Path:
    """Create and return an empty private (``0o700``) staging folder beside ``out``, after
    removing the stale staging entries of its directory (:func:`remove_stale`)."""
    out = Path(out)
    remove_stale(out.parent, out.name)
    while True:
        path = staging_path(out, kind)
        try:
            path.mkdir(mode=0o700)
            return path
        except FileExistsError:  # 2**32 names: only a collision with an earlier one of ours
            continue


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OverflowError:  # not a pid this system can have
        return False
    return True


def remove_stale(directory: str | os.PathLike, name: str | None = None,
                 now: float | None = None) -> list[Path]:  # fmt: skip
    """Remove the stale staging entries of ``directory``; return what was removed.

    Stale: named ``.X.tmp-PID-XXXXXXXX`` / ``.X.old-PID-XXXXXXXX`` with ``PID`` not running, or
    older than :data:`STALE_AFTER_S`; and, when ``name`` is given, ``.NAME.tmp-XXXXXXXX`` (the
    names ``tempfile.mkdtemp`` gave before) older than :data:`STALE_AFTER_S`. A missing
    ``directory`` has nothing stale; an entry that cannot be removed is left.
    """
    now = time.time() if now is None else now
    legacy = re.compile(rf"^\.{re.escape(name)}\.(?:tmp|old)-[A-Za-z0-9_]{{8}}$") if name else None
    removed = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return removed
    for e in entries:
        m = _OURS.match(e.name)
        if m is None and not (legacy is not None and legacy.match(e.name)):
            continue
        try:
            age = now - e.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:  # another writer removed it first
            continue
        if age < STALE_AFTER_S and (m is None or _pid_alive(int(m.group(1)))):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
            removed.append(Path(e.path))
        except OSError:
            continue
    return removed


def existing_ancestor(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """The nearest ancestor of ``path`` that exists (it may be a file, which a writer must
    refuse), and the topmost missing directory between them (``None``: the parent exists)."""
    top = None
    for d in Path(os.path.abspath(path)).parents:
        if d.exists() or d.is_symlink():
            return d, top
        top = d
    raise AssertionError("unreachable: the filesystem root exists")
