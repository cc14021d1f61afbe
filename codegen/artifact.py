"""Write a compiled model as an artifact directory, atomically.

Last step of codegen. Layout (names are fixed; the manifest says which is which)::

    OUT/
      model.so        # Executable.export_library: the Relax VM bytecode and every kernel
      weights.npz     # weights after LiftTransformParams, keys w0000.. in call order (no pickle)
      manifest.json   # versions, target, io specs, kernel choice per PrimFunc, sha256 per file

The directory is assembled under a temporary sibling and renamed into place, so a reader never
sees a half-written artifact; an existing ``OUT`` is replaced only once the new one is complete.
The manifest carries ``self_sha256`` (over its own canonical JSON without that field) so an edit
to the manifest itself is detected too. Builds are reproducible: with ``SOURCE_DATE_EPOCH`` set
(the reproducible-builds.org convention) ``created`` is that instant, and ``weights.npz`` is
always written with fixed zip timestamps, so replaying a recipe gives byte-identical files. Readers: :mod:`graphprune.runtime` and the ten-line
pure-TVM snippet in ``codegen/README_SNIPPET.md``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from graphprune.staging import existing_ancestor, make_staging_dir
from graphprune.ir.errors import ArtifactError, ConfigError
from graphprune.runtime import FORMAT, FORMAT_VERSION, file_sha256, manifest_digest

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LIBRARY",
    "MANIFEST",
    "WEIGHTS",
    "file_sha256",
    "manifest_digest",
    "write_artifact",
]

LIBRARY = "model.so"
WEIGHTS = "weights.npz"
MANIFEST = "manifest.json"


def _versions() -> dict:
    import tvm

    try:
        from importlib.metadata import version

        gp_version = version("graphprune")
    except Exception:  # running from a source tree without metadata
        gp_version = "unknown"
    return {"graphprune": gp_version, "tvm": tvm.__version__, "numpy": np.__version__}


def _created() -> str:
    """Build time for the manifest: ``SOURCE_DATE_EPOCH`` when set (reproducible builds)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        when = _dt.datetime.now(_dt.timezone.utc)
    else:
        try:
            when = _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc)
        except (ValueError, OverflowError, OSError) as e:
            raise ArtifactError(
                f"SOURCE_DATE_EPOCH={epoch!r} is not a Unix time in seconds (an integer)"
            ) from e
    return when.isoformat(timespec="seconds")


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` with fixed member timestamps (savez stamps each member with the current
    time, so two identical builds differ); readable by ``np.load`` like any ``.npz``."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(array, order="C"), allow_pickle=False)


def write_artifact(out_dir, executable, weights: list[np.ndarray], info: dict) -> Path:
    """Export ``executable`` and ``weights`` to ``out_dir`` with a manifest built from ``info``.

    ``info`` holds the JSON-able fields the compiler knows (target, frontend, inputs, outputs,
    kernels); this function adds versions, file names, weight names and hashes.
    """
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_staging_dir(out_dir)  # also removes what interrupted writes left beside it
    try:
        executable.export_library(str(tmp / LIBRARY))
        names = [f"w{i:04d}" for i in range(len(weights))]
        _save_npz(tmp / WEIGHTS, dict(zip(names, weights)))
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": _created(),
            "versions": _versions(),
            **info,
            "entry": "main",
            "library": LIBRARY,
            "weights": WEIGHTS,
            "weight_names": names,
            "weight_shapes": [list(w.shape) for w in weights],
            "files": {name: file_sha256(tmp / name) for name in (LIBRARY, WEIGHTS)},
        }
        manifest["self_sha256"] = manifest_digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for name in (LIBRARY, WEIGHTS, MANIFEST):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def check_out_dir(out_dir) -> None:
    """Refuse, before anything is built, an ``out_dir`` that could not take the artifact: an
    existing file or one on its path (``ConfigError``), or a folder that holds something other
    than a graphprune artifact (``ArtifactError``, as the write itself would raise)."""
    path = Path(out_dir).absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"out_dir {os.fspath(out_dir)!r} is an existing file, not a directory: the artifact is "
            f"a directory (library, weights, manifest); choose another out_dir"
        )
    if path.is_dir() and not (path / MANIFEST).exists() and any(path.iterdir()):
        raise ArtifactError(
            f"out_dir {os.fspath(out_dir)!r} exists and is not a graphprune artifact; refusing to "
            f"replace it (choose another out_dir or remove it)"
        )
    parent = existing_ancestor(path)[0]  # a file where a parent directory should be
    if not parent.is_dir():
        raise ConfigError(f"out_dir {os.fspath(out_dir)!r}: {parent} is a file, not a directory")


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    # rename() cannot replace a non-empty directory: move the old one aside first, then drop it.
    if out_dir.exists() or out_dir.is_symlink():
        if not (out_dir / MANIFEST).exists() and any(out_dir.iterdir()):
            raise ArtifactError(
                f"{out_dir} exists and is not a graphprune artifact; refusing to replace it "
                f"(choose another out_dir or remove it)"
            )
        old = make_staging_dir(out_dir, "old")
        os.rename(out_dir, old / "artifact")
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)
