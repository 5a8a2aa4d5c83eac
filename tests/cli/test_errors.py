"""Bad input: one line naming the problem and the fix, exit 2, and nothing written."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from calq.cli.main import app

runner = CliRunner()


def _recipe(tmp_path: Path, model: str, **stage) -> Path:
    data = {"model": model, "calibration": {"num_samples": 2, "seq_len": 32},
            "stages": [{"method": "rtn", "bits": 4, "group_size": 32, **stage}],
            "evaluation": {"datasets": ["stdlib:test"], "seq_len": 32, "max_windows": 2}}
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(data))
    return f


def _fails(args, needle, out_dir=None):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    text = res.stderr if res.stderr else res.output
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, text                 # one line, no traceback
    assert needle in " ".join(text.split()), text
    if out_dir is not None:
        assert not out_dir.exists()
        assert not any(p.name.startswith(f".{out_dir.name}.tmp") for p in out_dir.parent.iterdir())


def test_missing_recipe(tmp_path):
    _fails(["compress", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "o")], "recipe not found")


def test_unknown_method(tmp_path):
    out = tmp_path / "o"
    _fails(["compress", str(_recipe(tmp_path, "zoo:llama", method="sparsegpt")), "-o", str(out)],
           "stages[0].method: unknown method 'sparsegpt'", out)


def test_unknown_key(tmp_path):
    _fails(["compress", str(_recipe(tmp_path, "zoo:llama", groupsize=32)), "-o", str(tmp_path / "o")],
           "stages[0].groupsize: unknown key")


def test_bits_out_of_range(tmp_path):
    _fails(["compress", str(_recipe(tmp_path, "zoo:llama", bits=12)), "-o", str(tmp_path / "o")],
           "stages[0].bits: Input should be less than or equal to 8")


def test_missing_model(tmp_path):
    out = tmp_path / "o"
    _fails(["compress", str(_recipe(tmp_path, str(tmp_path / "no-model"))), "-o", str(out)],
           "model not found", out)


def test_group_size_not_dividing(tmp_path, tiny_llama_dir):
    out = tmp_path / "o"
    _fails(["compress", str(_recipe(tmp_path, str(tiny_llama_dir), group_size=96)), "-o", str(out)],
           "stages[0].group_size: 96 does not divide in_features 128 of model.layers.0.self_attn.q_proj", out)


def test_dataset_missing_and_empty(tmp_path):
    r = _recipe(tmp_path, "zoo:llama")
    data = yaml.safe_load(r.read_text())
    data["calibration"]["dataset"] = str(tmp_path / "missing.txt")
    r.write_text(yaml.safe_dump(data))
    _fails(["compress", str(r), "-o", str(tmp_path / "o")], "calibration.dataset: dataset file not found")
    _fails(["evaluate", "zoo:llama", "--dataset", str(tmp_path / "missing.txt")], "dataset file not found")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _fails(["evaluate", "zoo:llama", "--dataset", str(empty), "--seq-len", "64"], "is empty")


def test_output_exists(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(["compress", str(_recipe(tmp_path, "zoo:llama")), "-o", str(out)], "exists and is not empty")
    assert (out / "keep.txt").read_text() == "mine"


def test_malformed_recipe_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("stages: [\n")
    _fails(["recipes", "validate", str(f)], "malformed YAML")


def test_unknown_target_and_unsupported_device(tmp_path, tiny_llama_dir):
    _fails(["compress", str(_recipe(tmp_path, str(tiny_llama_dir), targets=["re:.*nothing$"])), "-o",
            str(tmp_path / "o")], "stages[0].targets: no module")
    _fails(["evaluate", str(tiny_llama_dir), "--device", "tpu"], "unknown device")


@pytest.mark.parametrize("args", [["--version"], ["recipes", "list"], ["zoo", "list"]])
def test_informational_commands_succeed(args):
    assert runner.invoke(app, args).exit_code == 0


@pytest.mark.parametrize("exc", [MemoryError(), type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory")])
def test_out_of_memory_is_one_line(monkeypatch, tmp_path, exc):
    import calq.api

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(calq.api, "compress", boom)
    _fails(["compress", "quickstart", "-o", str(tmp_path / "o")], "out of")


def test_failed_expect_exits_3_and_keeps_the_checkpoint(tmp_path, tiny_llama_dir):
    r = _recipe(tmp_path, str(tiny_llama_dir))
    data = yaml.safe_load(r.read_text())
    data["expect"] = {"max_bits_per_weight": 2.0}          # W4 g32 stores about 4.5 bits per weight
    r.write_text(yaml.safe_dump(data))
    out = tmp_path / "o"
    res = runner.invoke(app, ["compress", str(r), "-o", str(out), "--no-eval"])
    assert res.exit_code == 3, res.output
    assert "max_bits_per_weight" in " ".join(res.output.split())
    assert (out / "report.json").is_file() and (out / "model.safetensors").is_file()


def test_inspect_of_a_dense_model_is_a_clear_error(tiny_llama_dir):
    _fails(["inspect", str(tiny_llama_dir)], "holds a dense model")


def test_offload_mode_and_hub_model_on_disk(tmp_path, tiny_llama_dir):
    out = tmp_path / "o"
    _fails(["compress", str(_recipe(tmp_path, str(tiny_llama_dir))), "-o", str(out), "--offload", "ram"],
           "unknown offload mode 'ram' — use auto, cpu or disk", out)
    _fails(["compress", str(_recipe(tmp_path, "org/model")), "-o", str(out), "--offload", "disk"],
           "disk offload reads safetensors files from a local folder", out)


def test_evaluate_offload(tmp_path):
    _fails(["evaluate", "org/some-model", "--offload", "disk"], "local folder")
    _fails(["evaluate", "zoo:llama", "--offload", "ram"], "unknown offload mode")
    _fails(["evaluate", "zoo:llama", "--offload", "disk", "--reference", "zoo:llama"], "use --offload cpu")
    ppl = {}
    for mode in ("cpu", "disk"):
        res = runner.invoke(app, ["evaluate", "zoo:llama", "--seq-len", "64", "--max-windows", "3", "--json",
                                  "--offload", mode, "--device", "cpu"])
        assert res.exit_code == 0, res.output
        ppl[mode] = json.loads(res.stdout.strip().splitlines()[-1])["ppl"]
    assert ppl["cpu"] == ppl["disk"]               # the same ops on the same batches, one block read at a time


def test_calibration_activations_that_cannot_fit_fail_before_any_work(tmp_path, tiny_llama_dir, monkeypatch):
    from calq.calibration import offload

    # 2 samples x 32 tokens x hidden 128 x 1 copy x fp32 = 32 KiB of activations; pretend 16 KiB are free
    monkeypatch.setattr(offload, "available_ram", lambda: 16 * 1024)
    out = tmp_path / "o"
    _fails(["compress", str(_recipe(tmp_path, str(tiny_llama_dir), method="gptq")), "-o", str(out), "--offload",
            "cpu", "--device", "cpu", "--no-eval"], "beyond the loaded weights (activations 32 KiB, block 1.1 MiB, "
           "hessians 1.9 MiB), but only 16 KiB of RAM is available — use fewer --num-samples", out)
    monkeypatch.setattr(offload, "available_ram", lambda: 4 * 2**20)
    res = runner.invoke(app, ["compress", str(_recipe(tmp_path, str(tiny_llama_dir), method="gptq")), "-o", str(out),
                              "--offload", "cpu", "--device", "cpu", "--no-eval"])
    assert res.exit_code == 0, res.output
