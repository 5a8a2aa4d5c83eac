"""Quamba2's H2T: quantized embedding and lm_head, in memory and read back from a checkpoint."""

import pytest
import torch

import calq
from calq.api import compress_model, load_model
from calq.export.writer import write_checkpoint
from calq.methods.ssm.h2t import QuantLinear, embedding_from, lm_head_weight, quant_embedding
from calq.methods.ssm.observers import fake_quant
from calq.recipe.schema import validate_recipe

RELOAD_RTOL = 1e-4
CALIB = {"dataset": "stdlib:train", "num_samples": 8, "seq_len": 128, "seed": 0, "batch_size": 4}


@pytest.mark.parametrize("bits", [8, 4])
def test_embedding_codes_round_trip(bits):
    E = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    E[3] = 0                                                    # a dead row keeps a usable scale
    tensors, W_hat = quant_embedding(E, bits)
    assert torch.equal(embedding_from(tensors), W_hat)
    assert tensors["weight.scale"].dtype == torch.float16
    if bits == 8:
        assert tensors["weight.codes"].abs().max() == 127       # each row's absmax maps to ±127
        assert (W_hat - E).abs().max() <= (E.abs().amax(1) / 127 / 2 * 1.01).max()
    else:
        assert tensors["weight.packed"].shape == (64, 16)
        codes = torch.round(W_hat / tensors["weight.scale"].float()[:, None])
        assert codes.min() >= -8 and codes.max() <= 7
    assert torch.all(W_hat[3] == 0)


def test_quant_linear_quantizes_its_input():
    W, s = torch.randn(5, 8), torch.tensor(0.05)
    x = torch.randn(2, 3, 8)
    assert torch.equal(QuantLinear(W, s)(x), fake_quant(x, s, 8) @ W.T)


def _compress(stage, ids):
    model, tok, dtype = load_model("zoo:mamba2")
    recipe = validate_recipe({"model": "zoo:mamba2", "calibration": CALIB, "stages": [stage]})
    result = compress_model(model, tok, recipe, torch.device("cpu"), dtype, rest_dtype=torch.float32)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        for p in model.parameters():            # what the checkpoint keeps of the dense tensors: fp16
            if p is not emb:
                p.copy_(p.half().float())
        mem = model(ids, use_cache=False).logits
    return model, dtype, result, mem


def test_h2t_reload_reproduces_in_memory_logits_and_shrinks_checkpoint(tmp_path):
    ids = torch.randint(0, 4096, (2, 96), generator=torch.Generator().manual_seed(1))
    base = {"method": "quamba2", "precision": "w8a8"}
    model, dtype, result, mem = _compress({**base, "embedding_bits": 8, "lm_head": "w8a8"}, ids)
    assert isinstance(model.lm_head, QuantLinear)
    recs = {m.record.name: m.record for m in result.modules}
    emb_rec, head_rec = recs["backbone.embeddings"], recs["lm_head"]
    # the in-memory weights are exactly what the records dequantize to
    assert torch.equal(model.get_input_embeddings().weight, embedding_from(emb_rec.tensors))
    assert torch.equal(model.lm_head.weight, lm_head_weight(head_rec.tensors))
    assert head_rec.tensors["weight.codes"].dtype == torch.int8 and head_rec.tensors["s_in"] > 0

    out = tmp_path / "h2t"
    out.mkdir()
    stats = write_checkpoint(model.to(dtype), [m.record for m in result.modules], out, [])
    reloaded = calq.load(out)
    assert isinstance(reloaded.lm_head, QuantLinear)
    with torch.no_grad():
        got = reloaded(ids, use_cache=False).logits
    scale = mem.abs().max().item()
    assert (got - mem).abs().max().item() < RELOAD_RTOL * scale
    rows = {r["name"]: r for r in calq.inspect(out)}
    assert rows["lm_head"]["bits"] == 8 and rows["backbone.embeddings"]["bits"] == 8
    assert rows["backbone.embeddings"]["bits_per_weight"] < 8.2

    model0, dtype0, result0, mem0 = _compress(base, ids)
    plain = tmp_path / "plain"
    plain.mkdir()
    stats0 = write_checkpoint(model0.to(dtype0), [m.record for m in result0.modules], plain, [])
    # fp16 embedding + lm_head (2 x 4096 x 256 x 2 bytes) become ~1 byte per weight each
    assert stats["checkpoint_bytes"] < stats0["checkpoint_bytes"] - 1.8 * 4096 * 256
    assert (mem - mem0).norm() / mem0.norm() < 0.2              # H2T costs little on top of W8A8
