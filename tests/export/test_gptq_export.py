"""`calq export --format gptq`: the GPTQ v1 layout of formats.md §2 (bit streams, z − 1 zeros, transposes), exact
against the compressed-tensors weights, files carried along, and one-line refusals for what GPTQ cannot hold."""

from __future__ import annotations

import json
import stat

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import calq
from calq.cli.main import app
from calq.export.ct import ct_dequantize, ct_tensors, weight_scheme
from calq.export.gptq import _gptq_tensors, gptq_dequantize, pack_stream, unpack_stream
from calq.methods.base import Compressed
from calq.recipe.schema import validate_recipe

runner = CliRunner()
SMALL = {"calibration": {"num_samples": 4, "seq_len": 64}, "evaluation": {"seq_len": 64, "max_windows": 2}}


def _tensors(path, suffixes):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out |= {k: st.get_tensor(k) for k in st.keys() if k.endswith(suffixes)}
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bit_stream_round_trip_and_layout(bits):
    gen = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 2**bits, (64, 5), generator=gen)
    words = pack_stream(v, bits)
    assert words.dtype == torch.int32 and words.shape == (64 * bits // 32, 5)
    assert torch.equal(unpack_stream(words, bits, 64), v)
    # independently: each column is one little-endian integer, value i at bit i·bits, cut into 32-bit words
    col = sum(int(x) << (bits * i) for i, x in enumerate(v[:, 0].tolist()))
    expect = [(col >> (32 * w)) & 0xFFFFFFFF for w in range(words.shape[0])]
    assert [w & 0xFFFFFFFF for w in words[:, 0].tolist()] == expect


def test_worked_example_word():
    # formats.md §1.4: the first eight codes of row 0, offset to 0..15, pack to 0xF81B4E71
    v = torch.tensor([1, 7, 14, 4, 11, 1, 8, 15])[:, None]
    assert pack_stream(v, 4)[0, 0].item() & 0xFFFFFFFF == 0xF81B4E71


def test_three_bit_is_the_10_1_10_1_10_split():
    v = torch.arange(32) % 8
    w = [x & 0xFFFFFFFF for x in pack_stream(v[:, None], 3)[:, 0].tolist()]
    assert all((w[0] >> (3 * j)) & 7 == v[j] for j in range(10))
    assert (w[0] >> 30) | ((w[1] & 1) << 2) == v[10]                       # value 10 straddles words 0 and 1
    assert all((w[1] >> (3 * (j - 11) + 1)) & 7 == v[j] for j in range(11, 21))
    assert (w[1] >> 31) | ((w[2] & 3) << 1) == v[21]                       # value 21 straddles words 1 and 2
    assert all((w[2] >> (3 * (j - 22) + 2)) & 7 == v[j] for j in range(22, 32))


def test_symmetric_4bit_matches_the_ct_tensors_bit_for_bit(tmp_path, tiny_llama_dir):
    recipe = validate_recipe({"model": str(tiny_llama_dir), **SMALL,
                              "stages": [{"method": "gptq", "bits": 4, "group_size": 64},
                                         {"method": "eora", "rank": 4}]})
    calq.compress(recipe, tmp_path / "ct", device="cpu")
    res = runner.invoke(app, ["export", str(tmp_path / "ct"), "-o", str(tmp_path / "gptq")])
    assert res.exit_code == 0, res.output
    ct = _tensors(tmp_path / "ct", ("weight_packed", "weight_scale"))
    gq = _tensors(tmp_path / "gptq", ("qweight", "qzeros", "scales", "g_idx"))
    names = [k[: -len(".weight_packed")] for k in ct if k.endswith(".weight_packed")]
    assert len(names) == 14
    for n in names:
        # formats.md §2.1: for symmetric 4-bit, qweight is CT's weight_packed transposed and scales its scale
        assert torch.equal(gq[f"{n}.qweight"], ct[f"{n}.weight_packed"].t())
        assert torch.equal(gq[f"{n}.scales"], ct[f"{n}.weight_scale"].t())
        assert (gq[f"{n}.qzeros"] == 0x77777777).all()                     # stored z − 1 = 7 per nibble
        assert torch.equal(gq[f"{n}.g_idx"], torch.arange(gq[f"{n}.g_idx"].numel(), dtype=torch.int32) // 64)
    cfg = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert cfg | json.loads((tmp_path / "gptq" / "quantize_config.json").read_text()) == cfg
    assert (cfg["quant_method"], cfg["bits"], cfg["group_size"], cfg["sym"], cfg["checkpoint_format"],
            cfg["desc_act"]) == ("gptq", 4, 64, True, "gptq", False)
    # everything but the weights comes along: tokenizer, recipe, report, the EoRA adapter
    for f in ("tokenizer.json", "recipe.yaml", "report.json", "adapter/adapter_model.safetensors"):
        assert (tmp_path / "gptq" / f).read_bytes() == (tmp_path / "ct" / f).read_bytes()
    # `calq inspect` reads the GPTQ layout from the files: qzeros and g_idx cost more than CT's scales alone
    rows, ct_rows = calq.inspect(tmp_path / "gptq"), {r["name"]: r for r in calq.inspect(tmp_path / "ct")}
    assert {r["name"] for r in rows} == set(ct_rows) and all(r["group_size"] == 64 for r in rows)
    for r in rows:
        n = r["name"]
        assert r["shape"] == ct_rows[n]["shape"] and r["method"] == "gptq" and r["bits"] == 4
        assert r["bytes"] == sum(gq[f"{n}.{s}"].nbytes for s in ("qweight", "qzeros", "scales", "g_idx"))
        assert r["bits_per_weight"] > ct_rows[n]["bits_per_weight"]
    mode = (tmp_path / "gptq" / "model.safetensors").stat().st_mode
    assert mode & stat.S_IRGRP and mode & stat.S_IROTH                      # not owner-only like mkdtemp


@pytest.mark.parametrize("bits,symmetric", [(3, False), (2, True), (8, False)])
def test_dequantized_weights_are_the_ct_weights(bits, symmetric, tmp_path, tiny_llama_dir):
    recipe = validate_recipe({"model": str(tiny_llama_dir), **SMALL,
                              "stages": [{"method": "rtn", "bits": bits, "group_size": 32, "symmetric": symmetric}]})
    calq.compress(recipe, tmp_path / "ct", device="cpu", evaluate=False)
    calq_cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    scheme = next(iter(calq_cfg["config_groups"].values()))["weights"]
    from calq.export.gptq import export_gptq

    export_gptq(tmp_path / "ct", tmp_path / "gptq")
    ct = _tensors(tmp_path / "ct", ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point"))
    gq = _tensors(tmp_path / "gptq", ("qweight", "qzeros", "scales", "g_idx"))
    for n in [k[: -len(".weight_packed")] for k in ct if k.endswith(".weight_packed")]:
        mine = {s: v for k, v in ct.items() if k.startswith(n + ".") for s in [k[len(n) + 1:]]}
        theirs = {s: v for k, v in gq.items() if k.startswith(n + ".") for s in [k[len(n) + 1:]]}
        OC, IC = mine["weight_shape"].tolist()
        assert theirs["qweight"].shape == (IC * bits // 32, OC) and theirs["qzeros"].shape == (IC // 32,
                                                                                              OC * bits // 32)
        assert torch.equal(gptq_dequantize(theirs, bits, OC, IC), ct_dequantize(mine, scheme))


def test_zero_point_at_the_bottom_is_refused():
    codes = torch.zeros(32, 32, dtype=torch.int8)
    zero = torch.full((32, 1), -8.0)                       # z = zp + 8 = 0: v1 would store −1
    rec = Compressed("m", "rtn", 4, "oc", -1, False, codes, torch.ones(32, 1), zero, None)
    with pytest.raises(ValueError, match="bottom of the range"):
        _gptq_tensors(ct_tensors(rec, torch.float16), weight_scheme(rec))


@pytest.mark.parametrize("stage,needle", [({"method": "rtn", "bits": 4, "group_size": 32, "layout": "ic"},
                                           "per-output-channel"),
                                          ({"method": "ptq161", "epochs": 1}, "quant_method calq")])
def test_what_gptq_cannot_hold_is_one_line_and_no_output(stage, needle, tmp_path, tiny_llama_dir):
    recipe = validate_recipe({"model": str(tiny_llama_dir), **SMALL, "stages": [stage]})
    calq.compress(recipe, tmp_path / "ct", device="cpu", evaluate=False)
    res = runner.invoke(app, ["export", str(tmp_path / "ct"), "-o", str(tmp_path / "gptq")])
    assert res.exit_code == 2
    text = res.stderr or res.output
    assert len(text.strip().splitlines()) == 1 and needle in " ".join(text.split()), text
    assert not (tmp_path / "gptq").exists() and not list(tmp_path.glob(".gptq.tmp-*"))


def test_sharded_checkpoint_exports_shard_by_shard(tmp_path, tiny_llama_dir):
    from calq.export.gptq import export_gptq

    recipe = validate_recipe({"model": str(tiny_llama_dir), **SMALL,
                              "stages": [{"method": "gptq", "bits": 4, "group_size": 32}]})
    calq.compress(recipe, tmp_path / "ct", device="cpu", offload="disk", evaluate=False)   # one shard per block
    export_gptq(tmp_path / "ct", tmp_path / "gptq")
    index = json.loads((tmp_path / "gptq" / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(p.name for p in (tmp_path / "gptq").glob("*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "ct").glob("*.safetensors")) and len(shards) == 3
    assert set(index.values()) == set(shards)
    for key, shard in index.items():
        with safe_open(tmp_path / "gptq" / shard, "pt") as st:
            assert key in st.keys()
    assert sum(k.endswith(".qweight") for k in index) == 14 and not any("weight_packed" in k for k in index)


def test_dequantize_follows_a_permuted_g_idx_and_v2_zeros():
    # desc_act checkpoints (AutoGPTQ, GPTQModel) assign columns to groups out of order through g_idx
    gen = torch.Generator().manual_seed(7)
    OC, IC, g, bits = 64, 128, 32, 4
    q = torch.randint(0, 16, (IC, OC), generator=gen)
    z = torch.randint(1, 16, (IC // g, OC), generator=gen)
    scales = torch.rand(IC // g, OC, generator=gen).half()
    g_idx = (torch.randperm(IC, generator=gen) // g).to(torch.int32)
    expect = ((q - z[g_idx.long()]).float() * scales.float()[g_idx.long()]).t()
    t = {"qweight": pack_stream(q, bits), "scales": scales, "g_idx": g_idx}
    v1 = gptq_dequantize(t | {"qzeros": pack_stream((z - 1).t(), bits).t().contiguous()}, bits, OC, IC)
    v2 = gptq_dequantize(t | {"qzeros": pack_stream(z.t(), bits).t().contiguous()}, bits, OC, IC, zero_offset=0)
    assert torch.equal(v1, expect) and torch.equal(v2, expect)


def test_calq_reads_gptq_checkpoints_v1_and_v2(tmp_path, tiny_llama_dir):
    from safetensors.torch import save_file

    from calq.export.gptq import export_gptq

    recipe = validate_recipe({"model": str(tiny_llama_dir), **SMALL,
                              "stages": [{"method": "gptq", "bits": 3, "group_size": 32}]})
    calq.compress(recipe, tmp_path / "ct", device="cpu", evaluate=False)
    export_gptq(tmp_path / "ct", tmp_path / "v1")
    ids = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = calq.load(tmp_path / "ct")(ids).logits
        assert torch.equal(calq.load(tmp_path / "v1")(ids).logits, ref)
        # the same weights as GPTQModel's v2: zeros stored as z, said so in the config
        import shutil
        shutil.copytree(tmp_path / "v1", tmp_path / "v2")
        with safe_open(tmp_path / "v1" / "model.safetensors", "pt") as st:
            t = {k: st.get_tensor(k) for k in st.keys()}
        for k in [k for k in t if k.endswith(".qzeros")]:
            OC = t[k.replace("qzeros", "scales")].shape[1]
            z = unpack_stream(t[k].t().contiguous(), 3, OC).t() + 1
            t[k] = pack_stream(z.t(), 3).t().contiguous()
        save_file(t, tmp_path / "v2" / "model.safetensors", metadata={"format": "pt"})
        cfg = json.loads((tmp_path / "v2" / "config.json").read_text())
        cfg["quantization_config"]["checkpoint_format"] = "gptq_v2"
        (tmp_path / "v2" / "config.json").write_text(json.dumps(cfg))
        assert torch.equal(calq.load(tmp_path / "v2")(ids).logits, ref)
    row = calq.evaluate(str(tmp_path / "v1"), seq_len=64, max_windows=2, device="cpu", offload="disk")[0]
    assert row["ppl"] == calq.evaluate(str(tmp_path / "ct"), seq_len=64, max_windows=2, device="cpu")[0]["ppl"]
