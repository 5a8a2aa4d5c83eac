"""A table of bad inputs, per command: recipes, model folders, checkpoints, datasets, flags, output paths.

Each must end with the exit code (2), one line on stderr naming the problem, no traceback, and nothing new on
disk: every output path lies under the module's work folder, whose tree must be the same afterwards (the
output's missing parents included). Fixtures are built once per module, from a tiny model, inside the test.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from calq.cli.main import app

runner = CliRunner()
Q = "model.layers.0.self_attn.q_proj"
RTN = {"method": "rtn", "group_size": 32}


class Evil:
    """A pickle whose loading would run a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# --- fixtures: corrupt copies of a good model and of a good checkpoint --------------------------------------------

def _tensors(d: Path, edit, name="model.safetensors"):
    t = load_file(d / name)
    edit(t)
    save_file(t, d / name, metadata={"format": "pt"})


def _config(d: Path, edit, name="config.json"):
    c = json.loads((d / name).read_text())
    edit(c)
    (d / name).write_text(json.dumps(c))


def _bytes(d: Path, edit, name="model.safetensors"):
    (d / name).write_bytes(edit((d / name).read_bytes()))


def _pickle_only(d: Path, payload=None):
    t = load_file(d / "model.safetensors")
    torch.save(payload if payload is not None else t, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()


def _bert(d: Path):
    from transformers import BertConfig, BertForMaskedLM

    tok = d / "tokenizer.json"
    keep = tok.read_bytes(), (d / "tokenizer_config.json").read_bytes()
    shutil.rmtree(d)
    BertForMaskedLM(BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(d)
    tok.write_bytes(keep[0])
    (d / "tokenizer_config.json").write_bytes(keep[1])


MODEL_VARIANTS = {
    "truncated": lambda d: _bytes(d, lambda b: b[: len(b) // 2]),
    "bad-header": lambda d: _bytes(d, lambda b: b[:8] + b"{not json" + b[17:]),
    "oversized-header": lambda d: _bytes(d, lambda b: struct.pack("<Q", 2**62) + b[8:]),
    "empty-weights": lambda d: _bytes(d, lambda b: b""),
    "missing-block": lambda d: _tensors(d, lambda t: [t.pop(k) for k in list(t) if ".layers.1." in k]),
    "missing-norm": lambda d: _tensors(d, lambda t: t.pop("model.norm.weight")),
    "wrong-shape": lambda d: _tensors(d, lambda t: t.update({Q + ".weight": t[Q + ".weight"][:, :10].contiguous()})),
    "nan-weight": lambda d: _tensors(d, lambda t: t["model.layers.1.mlp.down_proj.weight"].__setitem__((0, 0),
                                                                                                     float("nan"))),
    "inf-norm": lambda d: _tensors(d, lambda t: t["model.norm.weight"].__setitem__(0, float("inf"))),
    "pickle-only": _pickle_only,
    "no-weights": lambda d: (d / "model.safetensors").unlink(),
    "no-config": lambda d: (d / "config.json").unlink(),
    "config-bad-json": lambda d: (d / "config.json").write_text("{nope"),
    "config-list": lambda d: (d / "config.json").write_text("[1, 2]"),
    "config-binary": lambda d: (d / "config.json").write_bytes(b"\xff\xfe\x00\x01"),
    "config-unknown-type": lambda d: _config(d, lambda c: c.update(model_type="nonsense")),
    "qconfig-str": lambda d: _config(d, lambda c: c.update(quantization_config="gptq")),
    "qconfig-awq": lambda d: _config(d, lambda c: c.update(quantization_config={"quant_method": "awq", "bits": 4})),
    "qconfig-ct-no-groups": lambda d: _config(d, lambda c: c.update(
        quantization_config={"quant_method": "compressed-tensors"})),
    "index-missing-shard": lambda d: (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})),
    "index-bad-json": lambda d: (d / "model.safetensors.index.json").write_text("{"),
    "encoder-bert": _bert,
    "no-tokenizer": lambda d: [(d / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
}

CKPT_VARIANTS = {
    "truncated": lambda d: _bytes(d, lambda b: b[:5000]),
    "no-config-groups": lambda d: _config(d, lambda c: c["quantization_config"].pop("config_groups")),
    "qconfig-list": lambda d: _config(d, lambda c: c.update(quantization_config=[1])),
    "qconfig-awq": lambda d: _config(d, lambda c: c["quantization_config"].update(quant_method="awq")),
    "bits-99": lambda d: _config(d, lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"]
                                 .update(num_bits=99)),
    "bits-str": lambda d: _config(d, lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"]
                                  .update(num_bits="four")),
    "target-regex": lambda d: _config(d, lambda c: c["quantization_config"]["config_groups"]["group_0"]
                                      .update(targets=["re:("])),
    "group-not-dict": lambda d: _config(d, lambda c: c["quantization_config"]["config_groups"]
                                        .update(group_0="weights")),
    "ignore-int": lambda d: _config(d, lambda c: c["quantization_config"].update(ignore=5)),
    "config-bad-json": lambda d: (d / "config.json").write_text("{"),
    "drop-scale": lambda d: _tensors(d, lambda t: t.pop(Q + ".weight_scale")),
    "drop-shape": lambda d: _tensors(d, lambda t: t.pop(Q + ".weight_shape")),
    "drop-norm": lambda d: _tensors(d, lambda t: t.pop("model.norm.weight")),
    "extra-tensor": lambda d: _tensors(d, lambda t: t.update({"model.bogus.weight": torch.zeros(2)})),
    "weight-shape": lambda d: _tensors(d, lambda t: t.update({Q + ".weight_shape": torch.tensor([3, 3])})),
    "scale-shape": lambda d: _tensors(d, lambda t: t.update({Q + ".weight_scale": t[Q + ".weight_scale"][:, :1]
                                                             .contiguous()})),
    "packed-float": lambda d: _tensors(d, lambda t: t.update({Q + ".weight_packed": t[Q + ".weight_packed"]
                                                              .float()})),
    "nan-scale": lambda d: _tensors(d, lambda t: t[Q + ".weight_scale"].__setitem__((0, 0), float("nan"))),
    "adapter-config": lambda d: (d / "adapter" / "adapter_config.json").write_text("nope"),
    "adapter-no-alpha": lambda d: _config(d, lambda c: c.pop("lora_alpha"), "adapter/adapter_config.json"),
    "adapter-truncated": lambda d: _bytes(d, lambda b: b[:8], "adapter/adapter_model.safetensors"),
    "adapter-no-B": lambda d: _tensors(d, lambda t: [t.pop(k) for k in list(t) if "lora_B" in k],
                                       "adapter/adapter_model.safetensors"),
    "adapter-shape": lambda d: _tensors(d, lambda t: [t.update({k: torch.zeros(3, 3)}) for k in list(t)
                                                      if "lora_B" in k], "adapter/adapter_model.safetensors"),
}
ADAPTER_CASES = {k for k in CKPT_VARIANTS if k.startswith("adapter")}


class Work:
    """Paths of the module's fixtures; `out` is a never-created output under missing parents."""

    def __init__(self, root: Path):
        self.root = root
        self.out = root / "missing" / "deeper" / "out"

    def model(self, name="good") -> str:
        return str(self.root / "models" / name)

    def ckpt(self, name="good") -> str:
        return str(self.root / "ckpts" / name)

    def recipe(self, name="good", **top) -> str:
        data = {"model": self.model(), "calibration": {"num_samples": 2, "seq_len": 32},
                "stages": [dict(RTN)], "evaluation": {"seq_len": 32, "max_windows": 2}}
        data.update(top)
        f = self.root / "recipes" / f"{name}-{abs(hash(json.dumps(top, sort_keys=True, default=str)))}.yaml"
        if not f.exists():
            f.write_text(yaml.safe_dump(data))
        return str(f)

    def stage(self, **stage) -> str:
        return self.recipe("stage", stages=[{**RTN, **stage}])

    def file(self, name: str, content: str | bytes) -> str:
        f = self.root / "files" / name
        if not f.exists():
            f.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(f)


@pytest.fixture(scope="module")
def work(tmp_path_factory, shared_tiny_llama) -> Work:
    w = Work(tmp_path_factory.mktemp("bad-inputs"))
    for sub in ("models", "ckpts", "recipes", "files"):
        (w.root / sub).mkdir()
    shutil.copytree(shared_tiny_llama, w.model())
    for name, make in MODEL_VARIANTS.items():
        shutil.copytree(shared_tiny_llama, w.model(name))
        make(Path(w.model(name)))
    _pickle_only_evil(Path(w.model("evil-pickle")), shared_tiny_llama, w.root / "EVIL-RAN")
    for name, stages in (("good", [RTN]), ("adapter", [RTN, {"method": "eora", "rank": 4}])):
        res = runner.invoke(app, ["compress", w.recipe(name, stages=stages), "-o", w.ckpt(name), "--no-eval",
                                  "--device", "cpu"])
        assert res.exit_code == 0, res.output
    for name, make in CKPT_VARIANTS.items():
        shutil.copytree(w.ckpt("adapter" if name in ADAPTER_CASES else "good"), w.ckpt(name))
        make(Path(w.ckpt(name)))
    return w


def _pickle_only_evil(d: Path, src: Path, marker: Path):
    shutil.copytree(src, d)
    _pickle_only(d, {"model.norm.weight": Evil(marker)})


# --- the table ----------------------------------------------------------------------------------------------------

def compress(recipe, *extra):
    return lambda w: ["compress", recipe(w) if callable(recipe) else recipe, "-o", str(w.out), "--device", "cpu",
                      *extra]


def with_model(model):
    """compress the good recipe with --model `model(w)` (a string is taken as it is)."""
    return lambda w: ["compress", w.recipe(), "-o", str(w.out), "--device", "cpu", "--no-eval", "--model",
                      model(w) if callable(model) else model]


def evaluate(target, *extra):
    return lambda w: ["evaluate", target(w) if callable(target) else target, "--seq-len", "32", "--max-windows",
                      "2", "--device", "cpu", *extra]


CASES: list[tuple[str, object, str]] = []


def case(name, args, needle):
    CASES.append(pytest.param(args, needle, id=name))


# recipes: files
case("recipe-binary", compress(lambda w: w.file("bin.yaml", b"\x00\xff\xfe\x89PNG")), "is not UTF-8 text")
case("recipe-latin1", compress(lambda w: w.file("l1.yaml", "model: caf\xe9".encode("latin-1"))), "is not UTF-8")
case("recipe-nul", compress(lambda w: w.file("nul.yaml", b"model: a\x00b\n")), "malformed YAML")
case("recipe-deep", compress(lambda w: w.file("deep.yaml", "a: " + "[" * 5000 + "]" * 5000)), "nested too deeply")
case("recipe-malformed", compress(lambda w: w.file("mal.yaml", "stages: [\n")), "malformed YAML at line")
case("recipe-list", compress(lambda w: w.file("list.yaml", "- a\n- b\n")), "must be a YAML mapping, got list")
case("recipe-scalar", compress(lambda w: w.file("scalar.yaml", "42\n")), "must be a YAML mapping, got int")
case("recipe-empty", compress(lambda w: w.file("empty.yaml", "")), "stages: Field required")
case("recipe-dir", compress(lambda w: str(w.root / "recipes")), "recipe not found")
case("recipe-missing", compress(lambda w: str(w.root / "nope.yaml")), "recipe not found")
case("recipe-bundled-unknown", compress("no-such-recipe"), "recipe not found: no-such-recipe")
# recipes: keys
for name, top, needle in [
    ("model-empty", {"model": ""}, "model: String should have at least 1 character"),
    ("model-int", {"model": 5}, "model: Input should be a valid string"),
    ("unknown-top-key", {"calibraton": {}}, "calibraton: unknown key"),
    ("stages-empty", {"stages": []}, "stages: List should have at least 1 item"),
    ("stages-str", {"stages": "rtn"}, "stages: must be a list of stages"),
    ("stage-none", {"stages": [None]}, "stages[0].method: each stage needs a `method:` key"),
    ("stage-no-method", {"stages": [{"bits": 4}]}, "each stage needs a `method:` key"),
    ("method-list", {"stages": [{"method": ["rtn", "gptq"]}]}, "unknown method ['rtn', 'gptq']"),
    ("method-dict", {"stages": [{"method": {"rtn": 1}}]}, "stages[0].method: unknown method"),
    ("method-int", {"stages": [{"method": 4}]}, "stages[0].method: unknown method 4"),
    ("method-unknown", {"stages": [{"method": "awq"}]}, "unknown method 'awq'; available"),
    ("calibration-str", {"calibration": "x"}, "calibration: Input should be a valid dictionary"),
    ("seed-2^63", {"calibration": {"seed": 2**63}}, "calibration.seed: Input should be less than"),
    ("seed-negative", {"calibration": {"seed": -1}}, "calibration.seed: Input should be greater than or equal to 0"),
    ("seed-float", {"calibration": {"seed": 1.5}}, "calibration.seed: Input should be a valid integer"),
    ("num-samples-0", {"calibration": {"num_samples": 0}}, "calibration.num_samples: Input should be greater"),
    ("cal-seq-len-4", {"calibration": {"seq_len": 4}}, "calibration.seq_len: Input should be greater"),
    ("cal-batch-0", {"calibration": {"batch_size": 0}}, "calibration.batch_size: Input should be greater"),
    ("massive-nan", {"calibration": {"massive_token_ratio": float("nan")}}, "Input should be a finite number"),
    ("massive-below-1", {"calibration": {"massive_token_ratio": 0.5}}, "massive_token_ratio: Input should be greater"),
    ("propagate", {"calibration": {"propagate": "both"}}, "calibration.propagate: Input should be 'quantized'"),
    ("cal-dataset-unknown", {"calibration": {"dataset": "nope:nope"}}, "calibration.dataset: unknown dataset"),
    ("cal-dataset-missing", {"calibration": {"dataset": "/no/such.txt"}}, "dataset file not found"),
    ("cal-dataset-suffix", {"calibration": {"dataset": "/etc/hostname"}}, "unsupported dataset file type"),
    ("eval-datasets-empty", {"evaluation": {"datasets": []}}, "evaluation.datasets: List should have at least 1"),
    ("eval-seq-len-0", {"evaluation": {"seq_len": 0}}, "evaluation.seq_len: Input should be greater"),
    ("eval-max-windows-0", {"evaluation": {"max_windows": 0}}, "evaluation.max_windows: Input should be greater"),
    ("expect-negative", {"expect": {"max_ppl_ratio": -1}}, "expect.max_ppl_ratio: Input should be greater than 0"),
    ("expect-inf", {"expect": {"max_bits_per_weight": float("inf")}}, "Input should be a finite number"),
    ("expect-unknown", {"expect": {"max_ppl": 2}}, "expect.max_ppl: unknown key"),
    ("output-format", {"output": {"format": "onnx"}}, "output.format: Input should be"),
    ("eora-first", {"stages": [{"method": "eora"}]}, "eora compensates an earlier compression stage"),
    ("fp-with-stage-data", {"calibration": {"propagate": "fp"}, "stages": [
        {**RTN, "calibration": {"dataset": "stdlib:test"}}]}, "per-stage data needs calibration.propagate"),
]:
    case(f"recipe-{name}", compress(lambda w, top=top: w.recipe("keys", **top)), needle)
# recipes: one stage's keys
for name, stage, needle in [
    ("unknown-key", {"groupsize": 32}, "stages[0].groupsize: unknown key"),
    ("bits-12", {"bits": 12}, "stages[0].bits: Input should be less than or equal to 8"),
    ("bits-1", {"bits": 1}, "stages[0].bits: Input should be greater than or equal to 2"),
    ("bits-str", {"bits": "four"}, "stages[0].bits: Input should be a valid integer"),
    ("group-0", {"group_size": 0}, "stages[0].group_size: must be -1"),
    ("group-negative", {"group_size": -5}, "stages[0].group_size: must be -1"),
    ("layout", {"layout": "diagonal"}, "stages[0].layout: Input should be 'oc', 'ic' or 'adadim'"),
    ("symmetric-str", {"symmetric": "maybe"}, "stages[0].symmetric: Input should be a valid boolean"),
    ("targets-str", {"targets": "Linear"}, "stages[0].targets: Input should be a valid list"),
    ("targets-regex", {"targets": ["re:("]}, "stages[0].targets: bad regex"),
    ("ignore-int", {"ignore": [1]}, "stages[0].ignore[0]: Input should be a valid string"),
    ("stage-cal-seed", {"calibration": {"dataset": "stdlib", "seed": -1}}, "stages[0].calibration.seed"),
    ("stage-cal-dataset", {"calibration": {"dataset": "nope:x"}}, "stages[0].calibration.dataset: unknown dataset"),
    ("stage-cal-extra", {"calibration": {"dataset": "stdlib", "n": 1}}, "stages[0].calibration.n: unknown key"),
]:
    case(f"stage-{name}", compress(lambda w, s=stage: w.stage(**s)), needle)
for name, stage, needle in [
    ("gptq-damp-nan", {"method": "gptq", "dampening_frac": float("nan")}, "dampening_frac: Input should be a finite"),
    ("gptq-damp-2", {"method": "gptq", "dampening_frac": 2}, "dampening_frac: Input should be less than or equal"),
    ("gptq-block-0", {"method": "gptq", "block_size": 0}, "block_size: Input should be greater"),
    ("eora-rank-0", {"method": "eora", "rank": 0}, "stages[1].rank: Input should be greater"),
    ("eora-rank-pattern-negative", {"method": "eora", "rank_pattern": {"q_proj": -3}},
     "stages[1].rank_pattern.q_proj: Input should be greater than 0"),
    ("eora-rank-pattern-regex", {"method": "eora", "rank_pattern": {"(": 3}}, "stages[1].rank_pattern: bad regex"),
    ("eora-basis", {"method": "eora", "basis": "pca"}, "stages[1].basis: Input should be"),
    ("eora-adapter-bits", {"method": "eora", "adapter_bits": 9}, "stages[1].adapter_bits"),
    ("corda-mode", {"method": "corda", "mode": "both"}, "stages[1].mode: Input should be 'ipa' or 'kpa'"),
    ("prune-3:2", {"method": "prune", "sparsity": "3:2"}, "'3:2' is not N:M with 0 < N < M"),
    ("prune-1.5", {"method": "prune", "sparsity": "1.5"}, "'1.5' is not N:M"),
    ("prune-criterion", {"method": "prune", "criterion": "random"}, "stages[1].criterion"),
    ("ptq161-salient-1", {"method": "ptq161", "salient_ratio": 1}, "salient_ratio: Input should be less than 1"),
    ("ptq161-lr-inf", {"method": "ptq161", "preprocess": {"lr": float("inf")}}, "Input should be a finite number"),
    ("ptq161-preprocess-key", {"method": "ptq161", "preprocess": {"epochs": 3}}, "preprocess.epochs: unknown key"),
    ("quamba2-damp-inf", {"method": "quamba2", "dampening_frac": float("inf")}, "Input should be a finite number"),
    ("quamba2-precision", {"method": "quamba2", "precision": "w2a2"}, "stages[1].precision: Input should be"),
    ("quamba2-clusters", {"method": "quamba2", "clusters": 99}, "clusters: Input should be less than or equal"),
    ("quamba-percentile", {"method": "quamba", "percentile": 2}, "percentile: Input should be less than or equal"),
]:
    case(f"stage-{name}", compress(lambda w, s=stage: w.recipe("m", stages=[RTN, s])), needle)
# recipes that need the model to be refused (the model loads, then nothing is written)
for name, top, needle in [
    ("group-not-dividing", {"stages": [{**RTN, "group_size": 48}]}, f"stages[0].group_size: 48 does not divide "
                                                                      f"in_features 128 of {Q}"),
    ("no-target-matches", {"stages": [{**RTN, "targets": ["re:.*nothing$"]}]}, "stages[0].targets: no module"),
    ("prune-3:7", {"stages": [{"method": "prune", "sparsity": "3:7"}]}, "7 does not divide in_features 128"),
    ("gptq-gptq", {"stages": [{"method": "gptq", "group_size": 32}] * 2}, "quantize the same weight twice"),
    ("rtn-prune", {"stages": [RTN, {"method": "prune"}]}, "prune after rtn changes a weight"),
    ("gptq-corda", {"stages": [{"method": "gptq", "group_size": 32}, {"method": "corda"}]}, "corda after gptq"),
    ("eora-eora", {"stages": [RTN, {"method": "eora"}, {"method": "eora"}]}, "both add an adapter"),
    ("corda-rtn-eora", {"stages": [{"method": "corda"}, RTN, {"method": "eora"}]}, "both add an adapter"),
    ("quamba2-group", {"model": "zoo:mamba2", "stages": [{"method": "quamba2", "precision": "w4a8",
                                                          "group_size": 48}]}, "stages[0].group_size: 48 does not"),
    ("seq-len-past-positions", {"stages": [{"method": "gptq", "group_size": 32}], "calibration": {"seq_len": 1024}},
     "calibration.seq_len 1024 is longer than the model's max_position_embeddings 256"),
]:
    case(f"model-{name}", compress(lambda w, top=top: w.recipe("model", **top), "--no-eval"), needle)
case("expect-ppl-with-no-eval", compress(lambda w: w.recipe("exp", expect={"max_ppl_ratio": 1.5}), "--no-eval"),
     "expect.max_ppl_ratio needs the evaluation that --no-eval skips")
# model folders: compress, evaluate, evaluate with disk offload
MODEL_NEEDLES = {
    "truncated": "is not a readable safetensors file", "bad-header": "invalid JSON in header",
    "oversized-header": "header too large", "empty-weights": "header too small",
    "missing-block": "lacks 9 weights the architecture needs", "missing-norm": "lacks 1 weights",
    "wrong-shape": f"{Q}.weight has shape [128, 10]", "nan-weight": "model.layers.1.mlp.down_proj.weight of",
    "inf-norm": "model.norm.weight of", "pickle-only": "holds only pickle weights (pytorch_model.bin)",
    "no-weights": "holds no weights", "no-config": "is not a model folder (no config.json)",
    "config-bad-json": "config.json is not valid JSON", "config-list": "config.json holds a JSON list",
    "config-binary": "config.json is not UTF-8 text", "config-unknown-type": "model type `nonsense`",
    "qconfig-str": "quantization_config is a str, not a mapping", "qconfig-awq": "quant_method 'awq' is not one",
    "qconfig-ct-no-groups": "quantization_config has no config_groups", "index-missing-shard": "is listed in",
    "index-bad-json": "index.json is not valid JSON", "encoder-bert": "is a BertForMaskedLM, not a causal",
    "no-tokenizer": "could not load the tokenizer",
}
DISK_NEEDLES = {"pickle-only": "disk offload reads safetensors files from a local folder",
                "no-weights": "disk offload reads safetensors files", "missing-block": "lacks 9 weights",
                "missing-norm": "lacks 1 weights", "wrong-shape": "has shape [128, 10], the architecture needs"}
for name, needle in MODEL_NEEDLES.items():
    case(f"compress-model-{name}", with_model(lambda w, n=name: w.model(n)), needle)
    case(f"evaluate-model-{name}", evaluate(lambda w, n=name: w.model(n)), needle)
    if name not in ("no-tokenizer", "encoder-bert"):
        case(f"evaluate-disk-{name}", evaluate(lambda w, n=name: w.model(n), "--offload", "disk"),
             DISK_NEEDLES.get(name, needle))
case("evaluate-reference-nan", lambda w: evaluate(w.model(), "--reference", w.model("nan-weight"))(w),
     "model.layers.1.mlp.down_proj.weight of")
case("evaluate-evil-pickle", evaluate(lambda w: w.model("evil-pickle")), "holds only pickle weights")
case("evaluate-evil-pickle-allowed", evaluate(lambda w: w.model("evil-pickle"), "--allow-pickle"),
     "weights_only loader refused")
case("compress-model-file", with_model(lambda w: w.file("afile.txt", "x")), "is a file, not a model folder")
case("compress-model-missing", with_model(lambda w: str(w.root / "no")), "model not found")
case("compress-zoo-unknown", with_model("zoo:nope"), "unknown zoo model 'nope'")
case("compress-zoo-empty", with_model("zoo:"), "unknown zoo model ''")
case("compress-gguf-missing", with_model(lambda w: str(w.root / "a.gguf")), "GGUF file not found")
case("compress-gguf-foreign", with_model(lambda w: w.file("foreign.gguf", b"PK\x03\x04zip")), "is not a GGUF file")
case("compress-gguf-garbage", with_model(lambda w: w.file("garbage.gguf", b"GGUF\x03\x00\x00\x00garbage")),
     "is not a readable GGUF file")
case("evaluate-dir-without-config", evaluate(lambda w: str(w.root / "files")), "is not a model folder")
case("evaluate-zoo-unknown", evaluate("zoo:nope"), "unknown zoo model")
# checkpoints: inspect, export, evaluate
CKPT_NEEDLES = {
    "truncated": "is not a readable safetensors file", "no-config-groups": "has no config_groups",
    "qconfig-list": "quantization_config is a list", "qconfig-awq": "quant_method 'awq' is not one",
    "bits-99": "99-bit integer weights", "bits-str": "weights.num_bits: Input should be a valid integer",
    "target-regex": "targets has 're:('", "group-not-dict": "config_groups.group_0 needs targets",
    "ignore-int": "quantization_config ignore is not a list", "config-bad-json": "config.json is not valid JSON",
    "drop-scale": f"{Q}.weight_scale is missing", "drop-shape": f"{Q}.weight_shape is missing",
    "drop-norm": "missing ['model.norm.weight']", "extra-tensor": "unexpected ['model.bogus.weight']",
    "weight-shape": f"{Q}.weight_shape is missing, not finite, or does not fit a 128x128 Linear",
    "scale-shape": f"{Q}.weight_scale is missing, not finite, or does not fit",
    "packed-float": f"{Q}.weight_packed is missing, not finite, or does not fit",
    "nan-scale": f"{Q}.weight_scale is missing, not finite",
    "adapter-config": "adapter_config.json is not valid JSON", "adapter-no-alpha": "has no lora_alpha",
    "adapter-truncated": "adapter_model.safetensors is not a readable safetensors file",
    "adapter-no-B": "does not fit the model (module, lora_B or shapes)",
    "adapter-shape": "does not fit the model (module, lora_B or shapes)",
}
INSPECT_READS = {"truncated", "no-config-groups", "qconfig-list", "qconfig-awq", "bits-99", "bits-str",
                 "target-regex", "group-not-dict", "ignore-int", "config-bad-json", "drop-scale", "drop-shape"}
EXPORT_READS = set(CKPT_NEEDLES) - {"adapter-no-B", "adapter-shape"}    # adapters are copied, not merged
for name, needle in CKPT_NEEDLES.items():
    case(f"evaluate-ckpt-{name}", evaluate(lambda w, n=name: w.ckpt(n)), needle)
    if name in INSPECT_READS:
        case(f"inspect-ckpt-{name}", lambda w, n=name: ["inspect", w.ckpt(n)], needle)
    if name in EXPORT_READS:
        case(f"export-ckpt-{name}", lambda w, n=name: ["export", w.ckpt(n), "-o", str(w.out)], needle)
case("inspect-missing", lambda w: ["inspect", str(w.root / "no")], "is not a model directory (no config.json)")
case("inspect-file", lambda w: ["inspect", w.file("afile.txt", "x")], "is not a model directory")
case("inspect-dense", lambda w: ["inspect", w.model()], "holds a dense model")
case("export-dense", lambda w: ["export", w.model(), "-o", str(w.out)], "only compressed-tensors checkpoints")
case("export-missing", lambda w: ["export", str(w.root / "no"), "-o", str(w.out)], "is not a checkpoint folder")
case("export-format", lambda w: ["export", w.ckpt(), "-o", str(w.out), "--format", "awq"], "unknown export format")
# datasets
for name, content, needle in [
    ("text-number.jsonl", '{"text": 5}\n', "row 1's `text` is a int, not a string"),
    ("text-list.jsonl", '{"text": ["a"]}\n', "row 1's `text` is a list"),
    ("text-mixed.jsonl", '{"text": "a"}\n{"text": {"b": 1}}\n', "row 2's `text` is a dict"),
    ("broken.jsonl", '{"text": \n', "could not read"),
    ("no-text.jsonl", '{"body": "x"}\n', "has no `text` field (columns: body)"),
    ("empty.jsonl", "", "could not read"),
    ("garbage.parquet", "\x00\x01garbage", "could not read"),
    ("empty.txt", "", "is empty"),
    ("short.txt", "a few words", "fewer than seq_len 32"),
]:
    case(f"dataset-{name}", lambda w, n=name, c=content: evaluate(w.model(), "--dataset", w.file(n, c))(w), needle)
case("dataset-missing", evaluate(lambda w: w.model(), "--dataset", "/no/such.txt"), "dataset file not found")
case("dataset-empty-spec", evaluate(lambda w: w.model(), "--dataset", ""), "empty dataset spec")
case("dataset-stdlib-split", evaluate(lambda w: w.model(), "--dataset", "stdlib:dev"), "unknown stdlib split 'dev'")
case("dataset-hub-split", evaluate(lambda w: w.model(), "--dataset", "c4:test"), "unknown split 'test' for c4")
case("dataset-suffix", evaluate(lambda w: w.model(), "--dataset", "/etc/hostname"), "unsupported dataset file type")
case("dataset-calibration-number", lambda w: compress(w.recipe(
    "cal", stages=[{"method": "gptq", "group_size": 32}], calibration={
        "dataset": w.file("cal-number.jsonl", '{"text": 7}\n'), "num_samples": 2, "seq_len": 32}), "--no-eval")(w),
     "row 1's `text` is a int")
# flags
for name, extra, needle in [
    ("seq-len-0", ["--seq-len", "0"], "--seq-len 0: Input should be greater than or equal to 8"),
    ("seq-len-negative", ["--seq-len", "-5"], "--seq-len -5: Input should be greater"),
    ("seq-len-text", ["--seq-len", "abc"], "Invalid value for '--seq-len'"),
    ("seq-len-past-positions", ["--seq-len", "100000"], "longer than the model's max_position_embeddings 256"),
    ("max-windows-0", ["--max-windows", "0"], "--max-windows 0: Input should be greater than or equal to 1"),
    ("max-windows-negative", ["--max-windows", "-1"], "--max-windows -1"),
    ("batch-size-0", ["--batch-size", "0"], "--batch-size 0: Input should be greater than or equal to 1"),
    ("batch-size-negative", ["--batch-size", "-1"], "--batch-size -1"),
    ("device-mps", ["--device", "mps"], "device mps requested but MPS is not available"),
    ("device-xpu", ["--device", "xpu"], "device xpu requested but XPU is not available"),
    ("device-meta", ["--device", "meta"], "device 'meta' cannot run calq"),
    ("device-tpu", ["--device", "tpu"], "unknown device 'tpu'"),
    ("device-empty", ["--device", ""], "unknown device ''"),
    ("offload-ram", ["--offload", "ram"], "unknown offload mode 'ram'"),
    ("unknown-option", ["--frobnicate"], "No such option: --frobnicate"),
    ("reference-missing", ["--reference", "/no/such/model"], "model not found"),
    ("reference-with-disk", ["--reference", "zoo:llama", "--offload", "disk"], "use --offload cpu"),
]:
    case(f"evaluate-flag-{name}", evaluate(lambda w: w.model(), *extra), needle)     # the last of a flag wins
for name, extra, needle in [
    ("seed-2^63", ["--seed", str(2**63)], "calibration.seed: Input should be less than"),
    ("seed-negative", ["--seed", "-1"], "calibration.seed: Input should be greater than or equal to 0"),
    ("num-samples-0", ["--num-samples", "0"], "calibration.num_samples"),
    ("seq-len-4", ["--seq-len", "4"], "calibration.seq_len"),
    ("seed-text", ["--seed", "x"], "Invalid value for '--seed'"),
    ("device-cuda-7", ["--device", "cuda:7"], "device cuda:7 requested"),
    ("device-meta", ["--device", "meta"], "cannot run calq"),
    ("offload-ram", ["--offload", "ram"], "unknown offload mode"),
    ("model-empty", ["--model", ""], "model: String should have at least 1 character"),
]:
    case(f"compress-flag-{name}", lambda w, e=extra: ["compress", w.recipe(), "-o", str(w.out), "--device", "cpu",
                                                      *e], needle)
case("compress-no-args", lambda w: ["compress"], "Missing argument 'recipe'")
case("compress-no-output", lambda w: ["compress", w.recipe()], "Missing option '--output'")
case("unknown-command", lambda w: ["frobnicate"], "No such command 'frobnicate'")
case("recipes-validate-missing", lambda w: ["recipes", "validate", str(w.root / "x.yaml")], "recipe not found")
case("recipes-validate-binary", lambda w: ["recipes", "validate", w.file("bin2.yaml", b"\xff\xfe")], "not UTF-8")
case("recipes-show-missing", lambda w: ["recipes", "show", "nope"], "recipe not found: nope")
case("zoo-train-unknown", lambda w: ["zoo", "train", "nope"], "unknown zoo model 'nope'")
case("zoo-train-steps-0", lambda w: ["zoo", "train", "llama", "--steps", "0", "--out", str(w.out)], "--steps 0")
# output paths
case("output-is-file", lambda w: ["compress", w.recipe(), "-o", w.file("out-file", "x"), "--device", "cpu"],
     "is a file — give the path of a folder")
case("output-under-file", lambda w: ["compress", w.recipe(), "-o", w.file("out-file", "x") + "/sub", "--device",
                                     "cpu"], "is a file, so")
case("output-name-too-long", lambda w: ["compress", w.recipe(), "-o", str(w.root / ("x" * 300)), "--device", "cpu"],
     "the file system allows 255")
case("output-path-too-long", lambda w: ["compress", w.recipe(), "-o", str(w.root.joinpath(*["y" * 200] * 25)),
                                        "--device", "cpu", "--no-eval"], "File name too long")
case("output-not-empty", lambda w: ["compress", w.recipe(), "-o", str(w.root / "recipes"), "--device", "cpu"],
     "exists and is not empty — pass --overwrite")
case("output-overwrite-non-model", lambda w: ["compress", w.recipe(), "-o", str(w.root / "recipes"), "--overwrite"],
     "holds no model (no config.json); --overwrite replaces model folders only")
case("output-is-the-model", lambda w: ["compress", w.recipe(), "-o", w.model(), "--overwrite", "--device", "cpu"],
     "is the model folder the recipe reads")
case("export-output-is-file", lambda w: ["export", w.ckpt(), "-o", w.file("out-file", "x")], "is a file")
case("export-output-not-empty", lambda w: ["export", w.ckpt(), "-o", w.ckpt("adapter")], "exists and is not empty")
if Path("/sys/kernel").is_dir():      # sysfs: read-only even for root, unlike a chmod-ed folder
    case("output-read-only", lambda w: ["compress", w.recipe(), "-o", "/sys/calq-test-out", "--device", "cpu",
                                        "--no-eval"], "cannot write /sys/calq-test-out")


def _tree(root: Path) -> set:
    return {(str(p.relative_to(root)), p.is_dir()) for p in root.rglob("*")}


@pytest.mark.parametrize("args, needle", CASES)
def test_bad_input(work, args, needle):
    argv = args(work)                       # writes the case's input files, if any
    before = _tree(work.root)
    res = runner.invoke(app, argv)
    err = res.stderr
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output, res.exception
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in " ".join(err.split()), err
    assert _tree(work.root) == before and not work.out.parent.parent.exists()
    assert not Path("/sys/calq-test-out").exists()


def test_the_table_is_large():
    assert len(CASES) >= 150


def test_a_malicious_pickle_never_runs(work):
    marker = work.root / "EVIL-RAN"
    for extra in ([], ["--allow-pickle"]):
        res = runner.invoke(app, ["evaluate", work.model("evil-pickle"), "--device", "cpu", "--seq-len", "32", *extra])
        assert res.exit_code == 2 and not marker.exists(), res.output
    res = runner.invoke(app, ["compress", work.recipe(), "-o", str(work.out), "--model", work.model("evil-pickle"),
                              "--allow-pickle", "--no-eval", "--device", "cpu"])
    assert res.exit_code == 2 and not marker.exists() and not work.out.parent.parent.exists(), res.output


def test_allow_pickle_reads_plain_tensors_as_the_safetensors_model(work):
    ppl = {}
    for name, extra in (("good", []), ("pickle-only", ["--allow-pickle"])):
        res = runner.invoke(app, ["evaluate", work.model(name), "--device", "cpu", "--seq-len", "32", "--max-windows",
                                  "2", "--json", *extra])
        assert res.exit_code == 0, res.output
        ppl[name] = json.loads(res.stdout.strip().splitlines()[-1])["ppl"]
    assert ppl["good"] == ppl["pickle-only"]
