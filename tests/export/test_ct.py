"""compressed-tensors export: golden packing (formats.md §1.4), exact round trips, and checkpoints that load
both through calq's reader and through transformers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, CompressedTensorsConfig, LlamaConfig, LlamaForCausalLM

from calq.export.ct import ct_dequantize, ct_quantization_config, ct_tensors, weight_scheme
from calq.export.reader import load_checkpoint
from calq.export.writer import write_checkpoint
from calq.methods.base import Compressed
from calq.methods.quantizer import QuantArgs, quantize_rtn

# The reader's weights equal the reference's bit for bit, but the reference went through model.half(), which
# also rounds the rotary inv_freq buffer to fp16; a loaded model recomputes it in fp32 (~1e-5 of logit scale).
READER_RTOL = 1e-4
# transformers' dequantize=True works in the stored fp16 scale dtype: each weight is rounded to fp16
# (rel. 2^-11), which moves the logits of this 2-layer model by ~4e-4 of their scale; 5x margin.
TRANSFORMERS_RTOL = 2e-3
# transformers' default (compressed) path decompresses with fp32 scales when loaded in fp32: as exact as ours.
TRANSFORMERS_DEFAULT_RTOL = READER_RTOL
# 4-bit RTN must move the logits by far more than any tolerance (it moves them ~0.1 of their scale here),
# or the round trips prove nothing.
MIN_QUANT_EFFECT = 2e-2


def _record(W: torch.Tensor, args: QuantArgs, name: str = "m") -> Compressed:
    codes, scale, zero, W_hat = quantize_rtn(W, args)
    return Compressed(name, "rtn", args.bits, args.layout, args.group_size, args.symmetric,
                      codes, scale, zero, W_hat)


def _as_u32(x: torch.Tensor) -> list[int]:
    return [v & 0xFFFFFFFF for v in x.flatten().tolist()]


# ---- golden example, formats.md §1.4 ----

def _example_W() -> torch.Tensor:
    i, j = torch.arange(8)[:, None], torch.arange(16)[None, :]
    return ((((16 * i + j) * 7) % 17) - 8) / 8  # [8, 16]


def test_golden_symmetric():
    args = QuantArgs(bits=4, group_size=8, symmetric=True, scale_dtype=torch.bfloat16)
    rec = _record(_example_W(), args)
    t = ct_tensors(rec, torch.bfloat16)
    assert set(t) == {"weight_packed", "weight_scale", "weight_shape"}
    assert t["weight_packed"].dtype == torch.int32 and t["weight_packed"].shape == (8, 2)
    assert _as_u32(t["weight_packed"][0]) == [0xF81B4E71, 0x3D6F92C5]
    assert t["weight_scale"].dtype == torch.bfloat16 and t["weight_scale"].shape == (8, 2)
    assert t["weight_scale"][0, 0].item() == pytest.approx(0.13379, abs=1e-5)
    assert t["weight_shape"].dtype == torch.int64 and t["weight_shape"].tolist() == [8, 16]
    W_hat = ct_dequantize(t, weight_scheme(rec))
    assert (W_hat - _example_W()).abs().max().item() == pytest.approx(0.0625, abs=1e-3)


def test_golden_asymmetric():
    args = QuantArgs(bits=4, group_size=8, symmetric=False, scale_dtype=torch.bfloat16)
    rec = _record(_example_W(), args)
    t = ct_tensors(rec, torch.bfloat16)
    assert rec.zero[:, 0].tolist() == [0, 1, 1, 1, 1, -1, -1, -1]
    zp = t["weight_zero_point"]
    assert zp.dtype == torch.int32 and zp.shape == (1, 2)
    assert _as_u32(zp[0, 0]) == [0x77799998]
    assert torch.equal(ct_dequantize(t, weight_scheme(rec)), rec.W_hat)


# ---- exact round trips ----

LAYOUTS = {"group": ("oc", 32), "channel": ("oc", -1), "block": ("ic", 16)}


@pytest.mark.parametrize("strategy", list(LAYOUTS))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", range(2, 9))
def test_round_trip_exact(bits, symmetric, strategy):
    layout, g = LAYOUTS[strategy]
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(bits))
    rec = _record(W, QuantArgs(bits=bits, group_size=g, symmetric=symmetric, layout=layout))
    scheme = weight_scheme(rec)
    assert scheme["strategy"] == strategy
    t = ct_tensors(rec, torch.float16)
    assert t["weight_packed"].shape == (64, (128 * bits + 31) // 32)
    assert ("weight_zero_point" in t) == (not symmetric)
    assert torch.equal(ct_dequantize(t, scheme), rec.W_hat)


def test_w4_g128_bytes():
    W = torch.randn(256, 768, generator=torch.Generator().manual_seed(0))
    t = ct_tensors(_record(W, QuantArgs(bits=4, group_size=128)), torch.float16)
    ratio = sum(v.nbytes for v in t.values()) / (W.numel() * 2)
    assert 0.25 < ratio < 0.30


def test_config_groups_by_scheme():
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    recs = [_record(W, QuantArgs(group_size=32), "a"), _record(W, QuantArgs(group_size=16, layout="ic"), "b"),
            _record(W, QuantArgs(group_size=32), "c")]
    cfg = ct_quantization_config(recs, ["lm_head"])
    assert (cfg["quant_method"], cfg["format"], cfg["quantization_status"]) == (
        "compressed-tensors", "pack-quantized", "compressed")
    groups = cfg["config_groups"]
    assert [g["targets"] for g in groups.values()] == [["a", "c"], ["b"]]
    assert groups["group_1"]["weights"]["block_structure"] == [16, 1]
    assert groups["group_0"]["weights"]["actorder"] is None
    assert cfg["ignore"] == ["lm_head"]
    json.dumps(cfg)


# ---- end to end on a tiny Llama ----

def _tiny_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).half().eval()


def _quantize_model(model, args_for) -> tuple[list[Compressed], nn.Module]:
    """RTN every Linear in the decoder layers. Returns the records and an fp32 reference holding exact W_hat."""
    ref = copy.deepcopy(model).float()
    records = []
    for name, module in model.model.layers.named_modules(prefix="model.layers"):
        if isinstance(module, nn.Linear):
            rec = _record(module.weight.float(), args_for(name), name)
            records.append(rec)
            module.weight.data = rec.W_hat.to(module.weight.dtype)
            ref.get_submodule(name).weight.data = rec.W_hat.clone()
    return records, ref


def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits.float()


def _check_checkpoint(tmp_path, args_for, tied=False, hf_modes=("dequantize",)):
    model = _tiny_llama(tied)
    dense = _logits(copy.deepcopy(model).float())
    records, ref = _quantize_model(model, args_for)
    expected = _logits(ref)
    scale = expected.abs().max().item()
    assert (expected - dense).abs().max().item() > MIN_QUANT_EFFECT * scale

    stats = write_checkpoint(model, records, tmp_path, ["lm_head"])
    assert stats["checkpoint_bytes"] < stats["dense_bytes"]
    assert set(stats["modules"]) == {r.name for r in records}

    loaded = load_checkpoint(tmp_path)
    assert loaded.dtype == torch.float32
    assert (_logits(loaded) - expected).abs().max().item() < READER_RTOL * scale
    for mode in hf_modes:
        hf = AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=CompressedTensorsConfig(dequantize=mode == "dequantize"),
            dtype=torch.float32)
        rtol = TRANSFORMERS_RTOL if mode == "dequantize" else TRANSFORMERS_DEFAULT_RTOL
        assert (_logits(hf) - expected).abs().max().item() < rtol * scale, mode
    return stats


def test_checkpoint_sym_group(tmp_path):
    stats = _check_checkpoint(tmp_path, lambda name: QuantArgs(bits=4, group_size=32),
                              hf_modes=("dequantize", "default"))
    down = stats["modules"]["model.layers.0.mlp.down_proj"]
    assert down["dense_bytes"] == 128 * 256 * 2
    assert 4 < down["bits_per_weight"] < 5


def test_checkpoint_tied_embeddings(tmp_path):
    _check_checkpoint(tmp_path, lambda name: QuantArgs(bits=4, group_size=32), tied=True)
    from safetensors import safe_open
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        stored = set(f.keys())
    assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored


def test_checkpoint_asym_group(tmp_path):
    # transformers 5.23's default path rejects the packed zero point's shape (formats.md §1.5).
    _check_checkpoint(tmp_path, lambda name: QuantArgs(bits=4, group_size=32, symmetric=False))


def test_checkpoint_asym_block(tmp_path):
    _check_checkpoint(tmp_path, lambda name: QuantArgs(bits=4, group_size=16, layout="ic", symmetric=False),
                      hf_modes=("dequantize", "default"))


def test_checkpoint_mixed_layouts(tmp_path):
    def args_for(name):
        if name.endswith(("q_proj", "up_proj")):
            return QuantArgs(bits=4, group_size=16, layout="ic")
        return QuantArgs(bits=4, group_size=32)

    # transformers 5.23's dequantize=True applies the first config group to every module, so a checkpoint
    # with several groups loads correctly only through its default (compressed) path.
    _check_checkpoint(tmp_path, args_for, hf_modes=("default",))
    groups = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == 2


def test_reader_loads_plain_dense_folder(tmp_path):
    model = _tiny_llama(tied=True)
    model.save_pretrained(tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    expected = model.float().state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    ref = _logits(model)
    assert (_logits(loaded) - ref).abs().max().item() < READER_RTOL * ref.abs().max().item()
