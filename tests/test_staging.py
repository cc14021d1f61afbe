"""Staging entries an interrupted run left (``.NAME.tmp-PID-*``) are removed by the next write
into the same directory when their process is gone (or they are very old); live ones are kept."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graphprune.app.atomic import staging_dir, write_file_atomic, write_text_atomic
from graphprune.staging import STALE_AFTER_S, make_staging_dir, remove_stale


@pytest.fixture(scope="module")
def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # reaped: no process has this id now (barring reuse within the test)


@pytest.fixture
def live_pid():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p.pid
    p.kill()
    p.wait()


def _leftovers(d, dead, live):
    stale_dir = d / f".art.tmp-{dead}-0badc0de"
    (stale_dir / "artifact").mkdir(parents=True)
    (stale_dir / "artifact" / "model.so").write_bytes(b"half")
    stale_file = d / f".report.md.tmp-{dead}-deadbeef"
    stale_file.write_text("half")
    stale_old = d / f".art.old-{dead}-12345678"
    stale_old.mkdir()
    live_dir = d / f".art.tmp-{live}-aaaaaaaa"
    live_dir.mkdir()
    mine = d / f".art.tmp-{os.getpid()}-bbbbbbbb"
    mine.mkdir()
    return [stale_dir, stale_file, stale_old], [live_dir, mine]


@pytest.mark.parametrize("write", ["text", "file", "staging_dir", "artifact"])
def test_next_write_removes_dead_writers_leftovers_and_keeps_live_ones(tmp_path, dead_pid,
                                                                        live_pid, write):  # fmt: skip
    stale, kept = _leftovers(tmp_path, dead_pid, live_pid)
    user = tmp_path / ".art.tmp-notours"  # not a name we give: never touched
    user.mkdir()
    if write == "text":
        write_text_atomic(tmp_path / "out.json", "{}")
        assert (tmp_path / "out.json").read_text() == "{}"
    elif write == "file":
        write_file_atomic(tmp_path / "m.onnx", lambda p: Path(p).write_bytes(b"x"))
    elif write == "staging_dir":
        with staging_dir(tmp_path / "art") as tmp:
            assert tmp.name.startswith(f".art.tmp-{os.getpid()}-") and tmp.is_dir()
    else:  # what codegen.artifact.write_artifact calls
        made = make_staging_dir(tmp_path / "art")
        assert made.is_dir() and made.stat().st_mode & 0o777 == 0o700
        kept.append(made)
    assert not any(p.exists() for p in stale), [p for p in stale if p.exists()]
    assert all(p.exists() for p in kept) and user.exists()


def test_old_entries_go_by_age_even_with_a_live_pid_and_legacy_names_only_by_age(tmp_path,
                                                                                 live_pid):  # fmt: skip
    reused = tmp_path / f".art.tmp-{live_pid}-cccccccc"  # a pid reused by an unrelated process
    legacy_old = tmp_path / ".art.tmp-k2j4h5g6"  # tempfile.mkdtemp's names before this change
    legacy_new = tmp_path / ".art.tmp-a1b2c3d4"
    other_name = tmp_path / ".other.tmp-z9y8x7w6"
    for p in (reused, legacy_old, legacy_new, other_name):
        p.mkdir()
    past = time.time() - STALE_AFTER_S - 60
    for p in (reused, legacy_old, other_name):
        os.utime(p, (past, past))
    removed = remove_stale(tmp_path, "art")
    assert sorted(removed) == sorted([reused, legacy_old])
    assert legacy_new.exists() and other_name.exists()  # too young / another output's name
    assert remove_stale(tmp_path / "missing") == []


def test_failed_write_leaves_nothing(tmp_path):
    def fails(p):
        Path(p).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_file_atomic(tmp_path / "m.pt", fails)
    assert list(tmp_path.iterdir()) == []
