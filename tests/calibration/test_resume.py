"""--resume: a run interrupted after block k continues from there, and its checkpoint equals an uninterrupted run's
byte for byte (interrupted through the progress hook, by SIGINT, and by a real SIGKILL)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
import yaml

import calq
from calq.errors import CalqError
from calq.recipe.schema import validate_recipe

CALIB = {"num_samples": 4, "seq_len": 64}


class Stop(KeyboardInterrupt):
    pass


def stop_after(k: int):
    def progress(event):
        if event.get("event") == "block_end" and event["index"] == k:
            raise Stop
    return progress


def digest(folder: Path) -> dict[str, str]:
    """Every file of a checkpoint folder but the report (its timings differ from run to run)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(("report", "layer_errors"))}


def interrupted_then_resumed(recipe, out: Path, k: int, **kw):
    with pytest.raises(Stop):
        calq.compress(recipe, out, evaluate=False, device="cpu", progress=stop_after(k), resume=True, **kw)
    partial = out.parent / f".{out.name}.partial"
    saved = sorted(p.name for p in (partial / "resume").glob("block-*.json"))
    assert not out.exists() and saved == [f"block-{i:04d}.json" for i in range(k + 1)]
    assert [p.name for p in (partial / "resume").glob("streams-*")] == [f"streams-{k:04d}.safetensors"]
    return calq.compress(recipe, out, evaluate=False, device="cpu", resume=True, **kw)


@pytest.mark.parametrize("stages, offload", [
    ([{"method": "rtn", "bits": 4}], "cpu"),
    ([{"method": "gptq", "bits": 4}], "cpu"),
    ([{"method": "gptq", "bits": 3, "layout": "ic", "group_size": 64}], "cpu"),
    ([{"method": "gptq", "bits": 3, "layout": "adadim"}], "cpu"),
    ([{"method": "gptq", "bits": 4}, {"method": "eora", "rank": 8}], "cpu"),
    ([{"method": "gptq", "bits": 4}, {"method": "eora", "rank": 8}], "disk"),
    ([{"method": "corda", "rank": 8, "mode": "ipa"}, {"method": "gptq", "bits": 4}], "cpu"),
    ([{"method": "prune", "sparsity": "2:4", "criterion": "sparsegpt"}], "cpu"),
    ([{"method": "ptq161", "epochs": 1}], "cpu"),       # trains: the RNG state must be restored too
])
def test_resumed_checkpoint_is_byte_identical(stages, offload, tmp_path):
    recipe = validate_recipe({"model": "zoo:llama", "calibration": CALIB, "stages": stages})
    calq.compress(recipe, tmp_path / "full", evaluate=False, device="cpu", offload=offload)
    report = interrupted_then_resumed(recipe, tmp_path / "res", 1, offload=offload)
    assert report.resumed_blocks == 2
    assert digest(tmp_path / "res") == digest(tmp_path / "full")
    assert not (tmp_path / ".res.partial").exists() and not (tmp_path / "res" / "resume").exists()
    full = json.loads((tmp_path / "full" / "report.json").read_text())
    assert [m.rel_error for m in report.modules] == [m["rel_error"] for m in full["modules"]]


def test_moe_experts_resume_with_their_token_counts(tmp_path, tokenizer):
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                     num_local_experts=4, max_position_embeddings=256)
    transformers.MixtralForCausalLM(cfg).half().save_pretrained(tmp_path / "mixtral")
    tokenizer.save_pretrained(tmp_path / "mixtral")
    recipe = validate_recipe({"model": str(tmp_path / "mixtral"), "calibration": CALIB,
                              "stages": [{"method": "gptq", "bits": 4}]})
    full = calq.compress(recipe, tmp_path / "full", evaluate=False, device="cpu")
    report = interrupted_then_resumed(recipe, tmp_path / "res", 0)
    assert digest(tmp_path / "res") == digest(tmp_path / "full")
    assert report.expert_tokens == full.expert_tokens and len(report.expert_tokens) == 3


def test_a_different_recipe_does_not_resume_the_partial_run(tmp_path):
    recipe = {"model": "zoo:llama", "calibration": CALIB, "stages": [{"method": "gptq", "bits": 4}]}
    with pytest.raises(Stop):
        calq.compress(validate_recipe(recipe), tmp_path / "out", evaluate=False, device="cpu",
                      progress=stop_after(0), resume=True)
    recipe["stages"][0]["bits"] = 3
    with pytest.raises(CalqError, match=r"the partial run in .*\.out\.partial was made with a different recipe"):
        calq.compress(validate_recipe(recipe), tmp_path / "out", evaluate=False, device="cpu", resume=True)
    assert (tmp_path / ".out.partial" / "resume" / "block-0000.json").is_file()     # kept for the right recipe


@pytest.mark.parametrize("model, stage", [
    ("zoo:mamba", {"method": "quamba"}),
    ("zoo:mamba2", {"method": "quamba2", "precision": "w4a8", "lm_head": "w4a8", "embedding_bits": 4}),
], ids=["quamba", "quamba2"])
def test_quamba_mixers_resume_byte_identical(model, stage, tmp_path):
    """Their blocks hold new mixer modules: a resumed run rebuilds them from the saved record before loading."""
    recipe = validate_recipe({"model": model, "calibration": CALIB, "stages": [stage]})
    calq.compress(recipe, tmp_path / "full", evaluate=False, device="cpu")
    report = interrupted_then_resumed(recipe, tmp_path / "res", 0)
    assert report.resumed_blocks == 1
    assert digest(tmp_path / "res") == digest(tmp_path / "full")


def _cli(recipe: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "calq", "compress", str(recipe), "-o", str(out), "--no-eval",
                             "--device", "cpu", "--resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t = time.time()
    while not path.is_file():
        assert proc.poll() is None, f"the run ended before {path.name} appeared: {proc.stderr.read()[-2000:]}"
        assert time.time() - t < timeout
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("resume-cli")
    recipe = tmp / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "zoo:llama", "calibration": {"num_samples": 64, "seq_len": 256},
                                      "stages": [{"method": "gptq", "bits": 4}]}))
    full = _cli(recipe, tmp / "full")
    assert full.wait() == 0, full.stderr.read()[-2000:]
    return recipe, digest(tmp / "full")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_run_resumes_byte_identical(sig, tmp_path, uninterrupted):
    """A real signal in a `python -m calq compress --resume` process: SIGKILL leaves the partial folder as it was,
    SIGINT ends in one line and exit 130; the same command then finishes the run."""
    recipe, full = uninterrupted
    proc = _cli(recipe, tmp_path / "out")
    _wait_for(tmp_path / ".out.partial" / "resume" / "block-0000.json", proc)
    proc.send_signal(sig)
    rc = proc.wait()
    err = proc.stderr.read()
    if sig == signal.SIGINT:
        lines = [x for x in err.splitlines() if x.strip()]
        assert rc == 130 and len(lines) == 1 and "finished blocks are kept in" in lines[0], err
    else:
        assert rc == -signal.SIGKILL
    assert not (tmp_path / "out").exists()
    again = _cli(recipe, tmp_path / "out")
    assert again.wait() == 0, again.stderr.read()[-2000:]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["resumed_blocks"] >= 1
    assert digest(tmp_path / "out") == full


def test_bad_input_with_resume_leaves_nothing_behind(tmp_path):
    recipe = validate_recipe({"model": "zoo:llama", "calibration": CALIB,
                              "stages": [{"method": "gptq", "bits": 4, "targets": ["re:nothing.*"]}]})
    with pytest.raises(CalqError, match=r"stages\[0\].targets: no module"):
        calq.compress(recipe, tmp_path / "out", evaluate=False, device="cpu", resume=True)
    assert not any(tmp_path.iterdir())
