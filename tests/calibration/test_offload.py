"""Disk offload (issue #3): the checkpoint of the in-RAM path, with one block of weights in RAM at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import calq
from calq.calibration import offload
from calq.calibration.offload import DiskBlocks, choose_offload, weights_bytes
from calq.errors import CalqError
from calq.recipe.schema import validate_recipe

SMALL = {"calibration": {"num_samples": 4, "seq_len": 64, "batch_size": 2},
         "evaluation": {"seq_len": 64, "max_windows": 4, "batch_size": 2}}
STAGES = {
    "rtn": [{"method": "rtn", "bits": 4, "group_size": 64}],
    "gptq": [{"method": "gptq", "bits": 4, "group_size": 64, "symmetric": False}],
    "rtn+eora": [{"method": "rtn", "bits": 3, "group_size": 64}, {"method": "eora", "rank": 8}],
    "rtn+eora-own-data": [{"method": "rtn", "bits": 3, "group_size": 64},
                          {"method": "eora", "rank": 8, "calibration": {"dataset": "stdlib:test"}}],
    "ptq161": [{"method": "ptq161", "epochs": 1}],      # calq-packed records, block-wise training
}
# transformers' CT path dequantizes with fp16 scales into fp32 weights: ~1e-3 of the logit scale.
HF_RELOAD_RTOL = 5e-3


def _recipe(stages: str, model: str = "zoo:llama"):
    return validate_recipe({"model": model, **SMALL, "stages": STAGES[stages]})


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.rglob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({f"{f.parent.name}/{k}": st.get_tensor(k) for k in st.keys()})
    return out


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(k.split("/")[1] for k in ta) == sorted(k.split("/")[1] for k in tb)
    ta = {k.split("/", 1)[1] if not k.startswith("adapter/") else k: v for k, v in ta.items()}
    tb = {k.split("/", 1)[1] if not k.startswith("adapter/") else k: v for k, v in tb.items()}
    for k, v in ta.items():
        assert v.dtype == tb[k].dtype and torch.equal(v, tb[k]), k
    assert any(k.endswith((".weight_packed", ".signs")) for k in ta)   # compressed, not a dense copy
    assert (a / "config.json").read_text() == (b / "config.json").read_text()


@pytest.fixture
def watch_onload(monkeypatch):
    """Blocks holding real weights right after each onload, across every DiskBlocks."""
    seen = []
    onload = DiskBlocks.onload

    def counted(self, i, block, *rest):
        onload(self, i, block, *rest)
        seen.append(self.loaded())
    monkeypatch.setattr(DiskBlocks, "onload", counted)
    return seen


@pytest.mark.parametrize("stages", list(STAGES))
def test_disk_writes_the_in_ram_checkpoint(stages, tmp_path, tokenizer, watch_onload):
    ram = calq.compress(_recipe(stages), tmp_path / "ram", offload="cpu", device="cpu")
    disk = calq.compress(_recipe(stages), tmp_path / "disk", offload="disk", device="cpu")
    assert (ram.offload, disk.offload) == ("cpu", "disk")
    # 4 blocks read for the dense evaluation, the compression and the checkpoint's evaluation; one at a time
    assert watch_onload == [1] * 12
    _assert_same_checkpoint(tmp_path / "ram", tmp_path / "disk")
    files = json.loads((tmp_path / "disk" / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(files)) == 5 and not (tmp_path / "disk" / "model.safetensors").exists()
    # block-streamed evaluation runs the same ops on the same batches as the in-RAM model's forward
    assert [(e.baseline_ppl, e.ppl) for e in disk.evaluation] == [(e.baseline_ppl, e.ppl) for e in ram.evaluation]
    assert disk.evaluation[0].ppl != disk.evaluation[0].baseline_ppl
    assert [m.bytes for m in disk.modules] == [m.bytes for m in ram.modules]
    assert disk.bits_per_weight == ram.bits_per_weight
    # `calq evaluate --offload disk` streams the written checkpoint the same way
    kw = {"seq_len": 64, "max_windows": 4, "batch_size": 2, "device": "cpu"}
    streamed = calq.evaluate(str(tmp_path / "disk"), offload="disk", **kw)
    assert watch_onload == [1] * 16 and streamed[0]["offload"] == "disk"
    assert streamed[0]["ppl"] == calq.evaluate(str(tmp_path / "ram"), offload="cpu", **kw)[0]["ppl"] \
        == disk.evaluation[0].ppl
    if stages == "gptq":
        _assert_same_logits(tmp_path / "ram", tmp_path / "disk", tokenizer)


def _assert_same_logits(ram_dir: Path, disk_dir: Path, tokenizer) -> None:
    """The sharded checkpoint reloads, in calq and transformers, with the in-RAM checkpoint's logits."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ids = torch.randint(0, len(tokenizer), (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = calq.load("zoo:llama")(ids).logits
        ram = calq.load(ram_dir)(ids).logits
        disk = calq.load(disk_dir)(ids).logits
        hf = AutoModelForCausalLM.from_pretrained(disk_dir, dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))(ids)
    scale = ram.abs().max().item()
    assert (ram - dense).abs().max().item() > 1e-3 * scale             # compression changed the model
    assert torch.equal(disk, ram)
    assert (hf.logits - disk).abs().max().item() < HF_RELOAD_RTOL * scale


def test_sharded_input_and_auto_mode(tmp_path, tokenizer, zoo_llama_path, monkeypatch, watch_onload):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(zoo_llama_path, dtype="auto").save_pretrained(src, max_shard_size="2MB")
    tokenizer.save_pretrained(src)
    assert len(list(src.glob("*.safetensors"))) > 2 and (src / "model.safetensors.index.json").is_file()

    monkeypatch.setattr(offload, "available_ram", lambda: weights_bytes(src))    # the weights exceed half of it
    report = calq.compress(_recipe("rtn", str(src)), tmp_path / "disk", device="cpu", evaluate=False)
    assert report.offload == "disk" and watch_onload == [1] * 4
    calq.compress(_recipe("rtn", str(src)), tmp_path / "ram", offload="cpu", device="cpu", evaluate=False)
    _assert_same_checkpoint(tmp_path / "ram", tmp_path / "disk")


def _tiny(arch: str, tmp_path: Path, tokenizer) -> Path:
    """A random 2-block model saved to disk; Llama with tied embeddings, OPT, Mamba."""
    kw = {"vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2}
    cfg, cls = {
        "llama-tied": (transformers.LlamaConfig(**kw, intermediate_size=128, num_attention_heads=4,
                                                num_key_value_heads=2, max_position_embeddings=128,
                                                tie_word_embeddings=True), transformers.LlamaForCausalLM),
        "opt": (transformers.OPTConfig(**kw, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64),
                transformers.OPTForCausalLM),
        "mamba": (transformers.MambaConfig(**kw, state_size=8, expand=2, time_step_rank=16),
                  transformers.MambaForCausalLM),
    }[arch]
    torch.manual_seed(0)
    path = tmp_path / arch
    cls(cfg).half().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("arch", ["llama-tied", "opt", "mamba"])
def test_other_architectures(arch, tmp_path, tokenizer, watch_onload):
    path = str(_tiny(arch, tmp_path, tokenizer))
    recipe = validate_recipe({"model": path, **SMALL, "stages": [{"method": "gptq", "bits": 4, "group_size": 16}]})
    ram = calq.compress(recipe, tmp_path / "ram", offload="cpu", device="cpu")
    disk = calq.compress(recipe, tmp_path / "disk", offload="disk", device="cpu")
    assert watch_onload == [1] * 6
    _assert_same_checkpoint(tmp_path / "ram", tmp_path / "disk")
    assert [(e.baseline_ppl, e.ppl) for e in disk.evaluation] == [(e.baseline_ppl, e.ppl) for e in ram.evaluation]


def test_choose_offload(zoo_llama_path, monkeypatch):
    assert offload.available_ram() > 0
    size = weights_bytes(zoo_llama_path)
    monkeypatch.setattr(offload, "available_ram", lambda: 3 * size)
    assert choose_offload("auto", zoo_llama_path) == "cpu"
    monkeypatch.setattr(offload, "available_ram", lambda: size)
    assert choose_offload("auto", zoo_llama_path) == "disk"
    assert choose_offload("cpu", zoo_llama_path) == "cpu"
    assert choose_offload("auto", "org/model") == "cpu"                 # a hub id: nothing local to stream
    with pytest.raises(CalqError, match="local folder"):
        choose_offload("disk", "org/model")
    with pytest.raises(CalqError, match="unknown offload mode"):
        choose_offload("ram", zoo_llama_path)


def test_available_ram_when_nothing_can_measure_it(monkeypatch):
    import sys
    from pathlib import Path

    def no_sysconf(name):
        raise ValueError(f"unrecognized configuration name {name}")

    def no_proc(self, *args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setitem(sys.modules, "psutil", None)                   # import psutil raises ImportError
    monkeypatch.setattr(Path, "read_text", no_proc)
    monkeypatch.setattr(offload.os, "sysconf", no_sysconf)
    assert offload.available_ram() == offload.UNKNOWN_RAM              # unknown: nothing is refused
