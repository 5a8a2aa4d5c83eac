"""Calibration over several processes (calibration/distributed.py): the shares, the reduced statistics, and
end-to-end runs of 2 ranks (gloo, 1 thread each) whose checkpoint equals a single process's, file for file."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

import calq
from calq.calibration.distributed import FAIL_ENV, Solo
from calq.calibration.statistics import Statistics
from calq.recipe.schema import validate_recipe

# 4 batches of 2 windows: each of the 2 ranks takes 2
CALIB = {"num_samples": 8, "seq_len": 64, "batch_size": 2}


@pytest.fixture
def one_thread():
    """The single-process reference computes with one thread, as each rank does: fp32 GEMMs sum in a
    thread-dependent order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ranks(size: int) -> list[Solo]:
    out = []
    for r in range(size):
        g = Solo()
        g.rank, g.size = r, size
        out.append(g)
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_shares_are_contiguous_and_cover_every_batch_once(size):
    for n in range(12):
        items = list(range(n))
        shares = [g.share(items) for g in _ranks(size)]
        assert [x for s in shares for x in s] == items
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_solves_go_to_the_least_loaded_rank():
    g = _ranks(2)[0]
    assert g.assign([5.0, 1.0, 4.0, 1.0, 1.0]) == [0, 1, 1, 0, 1]      # loads 6 and 6
    assert g.assign([]) == [] and _ranks(1)[0].assign([3.0, 2.0]) == [0, 0]


def _statistics(batches: list[torch.Tensor], group=None) -> dict:
    lin = nn.Linear(16, 8, bias=False)
    kw = {} if group is None else {"group": group}
    with Statistics({"l": lin}, sample_covariance=True, massive_ratio=1000.0, **kw) as hess, torch.no_grad():
        for x in batches:
            lin(x)
    H_all, n_all = hess.of("l", robust=False)
    return {"H": hess.of("l")[0], "n": hess.of("l")[1], "H_all": H_all, "n_all": n_all,
            "massive": torch.cat(hess.massive["l"]), "absmean": hess.absmean_of("l"), "absmax": hess.absmax_of("l"),
            "cov": hess.covariance_of("l"), "diag_all": hess.diag_all("l")}


def _batches() -> list[torch.Tensor]:
    """4 batches [2, 32, 16]; in each, token 0 of a sample is an attention sink (massive on channel 3)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for b in range(4):
        X = torch.randn(2, 32, 16, generator=gen) * (1 + b)
        X[b % 2, 0, 3] = 1e3 * (b + 1)
        out.append(X)
    return out


def _rank_main(rank: int, size: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from calq.calibration.distributed import Group

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    group = Group(rank, size)
    stats = _statistics(group.share(_batches()), group)
    if rank == 0:
        torch.save(stats, out)


def test_statistics_summed_over_ranks_equal_one_process(tmp_path, one_thread):
    """H with and without the massive tokens (their rows gathered in batch order), mean and max |x|, the sample
    covariance and every count: the same from 2 ranks' halves as from all 4 batches in one process."""
    single = _statistics(_batches())
    mp.spawn(_rank_main, args=(2, f"file://{tmp_path / 'rdzv'}", str(tmp_path / "stats.pt")), nprocs=2)
    two = torch.load(tmp_path / "stats.pt")
    assert single["massive"].shape[0] == 4 and single["n"] == 4 * 64 - 4
    for k, v in single.items():
        assert torch.equal(two[k], v) if isinstance(v, torch.Tensor) else two[k] == v, k


# --- end to end: torchrun, 2 ranks ------------------------------------------------------------------------------

def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(calq.__file__).parents[1])}


def _torchrun(recipe: Path, out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "calq", "compress",
           str(recipe), "-o", str(out), "--no-eval", "--device", "cpu", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=600)


def _nproc(recipe: Path, out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "calq", "compress", str(recipe), "-o", str(out), "--no-eval", "--device", "cpu",
           "--nproc", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=600)


def _single(recipe: dict, out: Path, **kw) -> None:
    calq.compress(validate_recipe(recipe), out, evaluate=False, device="cpu", **kw)


def _write(recipe: dict, path: Path) -> Path:
    path.write_text(json.dumps(recipe))         # JSON is YAML
    return path


def digest(folder: Path) -> dict[str, str]:
    """Every file of an output folder but the report (its timings differ from run to run)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(("report", "layer_errors"))}


def _differing(a: Path, b: Path) -> dict[str, int]:
    """Elements that differ, per tensor of the two folders' safetensors files (for a readable failure)."""
    ta = {k: v for f in sorted(a.rglob("*.safetensors")) for k, v in load_file(f).items()}
    tb = {k: v for f in sorted(b.rglob("*.safetensors")) for k, v in load_file(f).items()}
    assert ta.keys() == tb.keys()
    return {k: int((ta[k] != tb[k]).sum()) for k in ta if not torch.equal(ta[k], tb[k])}


@pytest.mark.slow
@pytest.mark.parametrize("model, stages", [
    ("zoo:llama", [{"method": "rtn", "bits": 4}]),
    ("zoo:llama", [{"method": "gptq", "bits": 4}]),
    ("zoo:llama", [{"method": "gptq", "bits": 3, "layout": "ic", "group_size": 64}]),
    ("zoo:llama", [{"method": "gptq", "bits": 3, "layout": "adadim"}]),      # unit errors summed over ranks
    ("zoo:llama", [{"method": "gptq", "bits": 4}, {"method": "eora", "rank": 8}]),
    ("zoo:mamba2", [{"method": "quamba2", "precision": "w4a8"}]),         # observers see the whole set
], ids=["rtn", "gptq-oc", "gptq-ic", "gptq-adadim", "gptq-eora", "quamba2"])
def test_two_ranks_write_the_single_process_checkpoint(model, stages, tmp_path, one_thread):
    recipe = {"model": model, "calibration": CALIB, "stages": stages}
    _single(recipe, tmp_path / "one")
    run = _torchrun(_write(recipe, tmp_path / "recipe.yaml"), tmp_path / "two")
    assert run.returncode == 0, run.stderr[-3000:]
    assert _differing(tmp_path / "one", tmp_path / "two") == {}
    assert digest(tmp_path / "two") == digest(tmp_path / "one")
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two")]
    assert [m["rel_error"] for m in reports[1]["modules"]] == [m["rel_error"] for m in reports[0]["modules"]]


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank_with_one_message(tmp_path):
    recipe = _write({"model": "zoo:llama", "calibration": CALIB, "stages": [{"method": "gptq", "bits": 4}]},
                    tmp_path / "recipe.yaml")
    run = _nproc(recipe, tmp_path / "out", env={**_env(), FAIL_ENV: "1:1"})
    assert run.returncode == 2
    assert run.stderr.splitlines() == [f"error: rank 1 of 2 failed: test failure injected on rank 1 at block 1 "
                                       f"({FAIL_ENV}) — unset {FAIL_ENV}"]
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


@pytest.mark.slow
def test_two_ranks_resume_after_a_failure_with_disk_offload(tmp_path, one_thread):
    """Rank 0 saves the whole streams after each block; the run continues from them, on both ranks."""
    recipe = {"model": "zoo:llama", "calibration": CALIB,
              "stages": [{"method": "gptq", "bits": 4}, {"method": "eora", "rank": 8}]}
    path = _write(recipe, tmp_path / "recipe.yaml")
    first = _nproc(path, tmp_path / "res", "--resume", "--offload", "disk", env={**_env(), FAIL_ENV: "1:2"})
    assert first.returncode == 2, first.stderr[-3000:]
    saved = sorted(p.name for p in (tmp_path / ".res.partial" / "resume").glob("block-*.json"))
    assert saved == ["block-0000.json", "block-0001.json"]
    again = _torchrun(path, tmp_path / "res", "--resume", "--offload", "disk")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "res" / "report.json").read_text())["resumed_blocks"] == 2
    _single(recipe, tmp_path / "one", offload="disk")
    assert digest(tmp_path / "res") == digest(tmp_path / "one")
    assert not (tmp_path / ".res.partial").exists()
