"""Output folders: written beside the output, swapped in safely, removed on failure, swept after a kill."""

import json
import os
import re
import socket
import subprocess

import pytest

from calq.errors import CalqError
from calq.export.staging import PREVIOUS, RUN_FILE, staged, sweep


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _run_folder(parent, name, pid, host=None, output="out"):
    d = parent / name
    d.mkdir()
    (d / RUN_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "output": output}))
    return d


def _model(path, text):
    path.mkdir()
    (path / "config.json").write_text(text)


def test_replacing_an_output_keeps_nothing_of_the_old_one_and_leaves_no_temp(tmp_path):
    out = tmp_path / "out"
    _model(out, "old")
    (out / "stale.bin").write_text("x")
    with staged(out, overwrite=True) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-") and (tmp / RUN_FILE).is_file()
        (tmp / "config.json").write_text("new")
        assert (out / "config.json").read_text() == "old"          # untouched until the block ends
    assert sorted(p.name for p in out.iterdir()) == ["config.json"] and (out / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())     # not mkdtemp's owner-only 0700


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("exc", [RuntimeError("bug"), KeyboardInterrupt()])
def test_a_failure_removes_the_temp_folder_and_the_parents_it_made(tmp_path, exc):
    (tmp_path / "have").mkdir()
    out = tmp_path / "have" / "missing" / "deeper" / "out"
    with pytest.raises(type(exc)):
        with staged(out) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise exc
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["have"]


def test_a_failed_replacement_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    _model(out, "old")
    with pytest.raises(RuntimeError), staged(out, overwrite=True):
        raise RuntimeError("bug")
    assert (out / "config.json").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("make, overwrite, needle", [
    (lambda p: p.write_text("x"), True, "is a file"),
    (lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")), False, "exists and is not empty"),
    (lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")), True, "holds no model (no config.json)"),
], ids=["file", "not-empty", "overwrite-non-model"])
def test_outputs_that_are_refused(tmp_path, make, overwrite, needle):
    out = tmp_path / "out"
    make(out)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(CalqError, match=re.escape(needle)), staged(out, overwrite):
        pass
    assert sorted(tmp_path.rglob("*")) == before


def test_sweep_removes_only_dead_runs_of_this_host(tmp_path):
    dead = _dead_pid()
    gone = [_run_folder(tmp_path, ".out.tmp-a", dead), _run_folder(tmp_path, ".other.tmp-b", dead, output="other")]
    kept = [_run_folder(tmp_path, ".out.tmp-live", os.getpid()),
            _run_folder(tmp_path, ".out.tmp-elsewhere", dead, host="another-host"),
            tmp_path / ".out.tmp-norunfile", tmp_path / ".cache"]
    kept[2].mkdir()
    kept[3].mkdir()
    (kept[2] / "x").write_text("not calq's")
    assert sorted(sweep(tmp_path)) == sorted(gone)
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def test_sweep_puts_back_an_output_a_killed_run_had_moved_aside(tmp_path):
    aside = _run_folder(tmp_path, ".out.old-x", _dead_pid())
    _model(aside / PREVIOUS, "old")
    sweep(tmp_path)
    assert (tmp_path / "out" / "config.json").read_text() == "old" and sorted(tmp_path.iterdir()) == [tmp_path / "out"]


def test_sweep_drops_the_aside_copy_once_a_new_output_is_in_place(tmp_path):
    aside = _run_folder(tmp_path, ".out.old-x", _dead_pid())
    _model(aside / PREVIOUS, "old")
    _model(tmp_path / "out", "new")
    sweep(tmp_path)
    assert (tmp_path / "out" / "config.json").read_text() == "new" and sorted(tmp_path.iterdir()) == [tmp_path / "out"]


def test_staging_sweeps_dead_runs_next_to_the_output(tmp_path):
    stale = _run_folder(tmp_path, ".out.tmp-old", _dead_pid())
    with staged(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
