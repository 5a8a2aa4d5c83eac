"""Signals during `calq compress`, sent from outside to a real process paused at a chosen point.

SIGKILL cannot be caught: the output must not exist, a temp folder with a run file is all that is left, and the
next run into the same folder sweeps it (or puts back the output a killed replacement had moved aside).
SIGINT and SIGTERM clean up themselves: one line, exit 130 / 143, nothing left.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from calq.cli.main import app
from calq.export.staging import RUN_FILE

REPO = Path(__file__).resolve().parents[2]

# Runs the CLI with one function wrapped so that the process touches `marker` and sleeps at that point.
DRIVER = """
import importlib, os, sys, time
from pathlib import Path
point, marker, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]

def pause():
    marker.touch()
    time.sleep(600)

def wrap(module, name, before):
    mod = importlib.import_module(module)
    orig = getattr(mod, name)
    def paused(*a, **k):
        if before(*a):
            pause()
        out = orig(*a, **k)
        if not before(*a):
            pause()
        return out
    setattr(mod, name, paused)

if point == "load":             # after the model is read, the temp folder exists
    wrap("calq.calibration.source", "load_model", lambda *a: False)
elif point == "calibration":    # inside block 0, before its first result is installed
    wrap("calq.calibration.engine", "_install", lambda *a: True)
elif point == "write":          # model.safetensors written into the temp folder
    wrap("calq.export.writer", "save_file", lambda *a: False)
elif point == "swap":           # the old output moved aside, the new one not yet renamed into place
    real = os.replace
    def replace(src, dst):
        if Path(src).name.startswith(".out.tmp-"):
            pause()
        return real(src, dst)
    os.replace = replace
from calq.cli.main import app
app(args, prog_name="calq")
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, shared_tiny_llama) -> Path:
    f = tmp_path_factory.mktemp("recipe") / "r.yaml"
    f.write_text(yaml.safe_dump({"model": str(shared_tiny_llama), "stages": [{"method": "rtn", "group_size": 32}]}))
    return f


def _paused(point: str, args: list[str], tmp_path: Path) -> subprocess.Popen:
    marker = tmp_path / f"at-{point}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, point, str(marker), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"never reached {point}: {proc.communicate()}")
        time.sleep(0.1)
    return proc


def _compress(recipe, out, *extra):
    return ["compress", str(recipe), "-o", str(out), "--device", "cpu", "--no-eval", *extra]


def _stale(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith(".out."))


@pytest.mark.parametrize("point", ["load", "calibration", "write"])
def test_sigkill_leaves_no_output_and_the_next_run_sweeps_the_temp_folder(tmp_path, recipe, point):
    parent = tmp_path / "runs"
    out = parent / "out"
    proc = _paused(point, _compress(recipe, out), tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    stale = _stale(parent)
    assert len(stale) == 1 and stale[0].name.startswith(".out.tmp-") and (stale[0] / RUN_FILE).is_file()
    if point == "write":
        assert (stale[0] / "model.safetensors").is_file()         # killed with half an output written
    res = CliRunner().invoke(app, _compress(recipe, out))
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in parent.iterdir()) == ["out"]   # swept, and the new output in place


def test_sigkill_while_replacing_an_output_loses_neither(tmp_path, recipe):
    parent = tmp_path / "runs"
    out = parent / "out"
    assert CliRunner().invoke(app, _compress(recipe, out)).exit_code == 0
    (out / "marker-of-the-old-output").write_text("old")
    proc = _paused("swap", _compress(recipe, out, "--overwrite"), tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    assert not out.exists()                                       # moved aside, the new one not yet in place
    names = [p.name for p in _stale(parent)]
    assert len(names) == 2 and any(n.startswith(".out.old-") for n in names), names
    from calq.export.staging import sweep

    sweep(parent)                                                 # what the next run does first
    assert (out / "marker-of-the-old-output").read_text() == "old"
    assert sorted(p.name for p in parent.iterdir()) == ["out"]


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_sigint_and_sigterm_print_one_line_and_clean_up(tmp_path, recipe, sig, code, word):
    parent = tmp_path / "runs"
    out = parent / "deeper" / "out"
    proc = _paused("calibration", _compress(recipe, out), tmp_path)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and word in lines[0] and "Traceback" not in stdout + stderr, stderr
    assert not parent.exists()                                    # the temp folder and the parents it made
