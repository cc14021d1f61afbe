"""Write files and directories all at once: build them beside their place, then rename.

A reader never sees half a file or half an artifact. The pipeline assembles an artifact in
``.NAME.tmp-PID-*`` next to ``NAME`` and renames it only when every step succeeded, so an
interrupted or failed run leaves no partial artifact (a ``kill -9`` can leave the hidden entry,
never a half-written ``NAME``; the next write into that directory removes it, see
:mod:`graphprune.staging`). An existing ``NAME`` is replaced only with ``force`` and
only when it is an earlier artifact (it holds ``manifest.json``) or empty. Reports,
``bench.json`` and the CLI's ``inspect --json/--dot`` files go through :func:`write_text_atomic`,
the CLI's models through :func:`write_file_atomic`.

A missing parent directory is created (:func:`make_parent` says which, so that the CLI can
report it); a parent that cannot be written to is a :class:`ConfigError` naming it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from graphprune.ir.errors import ConfigError
from graphprune.staging import existing_ancestor, make_staging_dir, remove_stale, staging_path

__all__ = ["check_output", "check_replaceable", "check_writable", "make_parent",
           "missing_parent", "staging_dir", "swap_into_place", "write_file_atomic",
           "write_text_atomic"]  # fmt: skip


def missing_parent(path: str | os.PathLike) -> Path | None:
    """The topmost directory above ``path`` that does not exist yet (``None``: the parent
    exists). An ancestor that is a file is a :class:`ConfigError`."""
    anc, top = existing_ancestor(path)
    if not anc.is_dir():
        raise ConfigError(f"cannot write {path}: {anc} is a file, not a directory")
    return top


def make_parent(path: str | os.PathLike) -> Path | None:
    """Create the missing directories above ``path``; return the topmost one created (``None``
    when the parent existed)."""
    top = missing_parent(path)
    parent = Path(os.path.abspath(path)).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the directory {parent} for {path}: {e.strerror}") from e
    return top


def check_output(path: str | os.PathLike, force: bool, *, directory: bool = False) -> None:
    """Refuse, before any work, an output the command would fail to write or must not replace.

    An existing ``path`` needs ``force``, and is replaced only by the same kind of thing: a file
    by a file, a directory (``directory=True``) only when it is an earlier artifact or empty.
    The nearest existing directory above ``path`` must take a new file (tried, not inferred
    from permission bits, which root and read-only mounts do not follow); missing directories
    between are created when the output is written (:func:`make_parent`).
    """
    p = Path(os.path.abspath(path))
    if p.exists() or p.is_symlink():
        if directory and not p.is_dir():
            raise ConfigError(f"{path} is an existing file, and an artifact is a directory: choose "
                              "another output directory or remove the file")  # fmt: skip
        if directory:
            check_replaceable(p, force)
        elif p.is_dir():
            raise ConfigError(f"{path} is a directory: give a file path, e.g. "
                              f"{os.path.join(str(path), 'model.onnx')}")  # fmt: skip
        elif not force:
            raise ConfigError(f"{path} exists: choose another output or pass --force to replace it")
    missing_parent(path)  # an ancestor that is a file is refused there
    anc = existing_ancestor(p)[0]
    probe = staging_path(anc / "probe", "tmp")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {anc} does not take new files ({e.strerror}); "
                          "choose another output path")  # fmt: skip
    os.close(fd)
    os.unlink(probe)


def check_writable(path: str | os.PathLike) -> None:
    """A :class:`ConfigError` when ``path``'s (existing) directory cannot be written to."""
    parent = Path(os.path.abspath(path)).parent
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {path}: the directory {parent} is not writable "
                          "(permission denied); choose another output path")  # fmt: skip


def write_file_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` writes a hidden file beside ``path`` (stale ones of interrupted runs are
    removed first), which is then renamed over ``path``; on any failure it is removed."""
    path = Path(path)
    check_writable(path)
    remove_stale(path.parent, path.name)
    tmp = staging_path(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except PermissionError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror}") from e
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a hidden temporary file beside ``path``, then rename it over ``path``.

    The file gets the usual permissions (``0o666`` less the umask), as a plain write would give.
    """

    def write(tmp: str) -> None:
        with open(tmp, "x") as f:
            f.write(text)

    write_file_atomic(path, write)


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
    """A fresh hidden folder beside ``out`` (``.NAME.tmp-PID-*``), removed with what is left in
    it on leaving, whether the block succeeded, failed or was interrupted. Stale ones that
    interrupted runs left beside it are removed first."""
    make_parent(out)
    check_writable(out)
    tmp = make_staging_dir(out)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_into_place(new: Path, out: Path, force: bool) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is moved aside first and restored if the
    rename fails, then deleted."""
    if out.exists() or out.is_symlink():
        check_replaceable(out, force)  # re-check: it may have appeared while we were working
        old = make_staging_dir(out, "old")
        os.rename(out, old / "previous")
        try:
            os.rename(new, out)
        except BaseException:
            os.rename(old / "previous", out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, out)
