"""XQuant's pieces on their own: the group quantizer and its axes, bit packing, SVD latents, the CL accumulator,
the size formula."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from calq.errors import CalqError
from calq.methods.xquant import (
    KVCacheSpec,
    Stream,
    build_codecs,
    dequantize_groups,
    fake_quantize,
    pack_codes,
    quantize_groups,
    size_summary,
    stream_bits_per_token,
    svd_factors,
    unpack_codes,
)


def _attns(kv_heads: int, layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=32)
    return [layer.self_attn for layer in LlamaForCausalLM(cfg).model.layers]


def test_token_groups_with_partial_last_group():
    x = torch.randn(2, 3, 200)                            # 200 channels, G 128: groups of 128 and 72
    q, scale, mn, pad = quantize_groups(x, 3, 128, "token")
    assert q.shape == (2, 3, 2, 128) and scale.shape == (2, 3, 2) and pad == 56
    assert scale.dtype == mn.dtype == torch.float16 and int(q.max()) <= 7
    assert torch.equal(mn[..., 1], x[..., 128:].amin(-1).half())         # the partial group is its own group
    assert torch.allclose(scale[..., 1].float(), ((x[..., 128:].amax(-1) - x[..., 128:].amin(-1)) / 7).half().float())
    xh = dequantize_groups(q, scale, mn, pad, "token")
    assert xh.shape == x.shape
    step = scale.float().repeat_interleave(128, -1)[..., :200]
    assert ((xh - x).abs() <= step / 2 + 1e-3).all()                      # within half a step (fp16 min rounding)


def test_channel_groups_run_along_tokens():
    x = torch.randn(1, 300, 8)                            # 300 tokens, G 128: 128, 128 and a partial 44
    x[0, 5, 3] = 100.0                                    # an outlier token on channel 3 spoils only its own group
    q, scale, mn, pad = quantize_groups(x, 2, 128, "channel")
    assert q.shape == (1, 3, 8, 128) and scale.shape == (1, 3, 8) and pad == 84
    assert scale[0, 0, 3] > 30 and scale[0, 1, 3] < 5
    assert torch.equal(mn[0, 2], x[0, 256:].amin(0).half())
    xh = dequantize_groups(q, scale, mn, pad, "channel")
    assert xh.shape == x.shape and (xh[0, 128:] - x[0, 128:]).abs().max() < 2.0


def test_constant_group_and_bits_off():
    x = torch.full((1, 4, 128), 0.3)
    assert torch.allclose(fake_quantize(x, Stream("x", 128, 2, "token"), 128), x.half().float())
    y = torch.randn(1, 4, 64)
    assert fake_quantize(y, Stream("x", 64, 16, "token"), 128) is y


def test_channel0_kept_in_fp16():
    x = torch.randn(1, 256, 16)
    x[..., 0] *= 1000
    keep = fake_quantize(x, Stream("xu_k", 16, 2, "channel", keep_ch0=True), 128)
    assert torch.equal(keep[..., 0], x[..., 0].half().float())
    assert torch.equal(keep[..., 1:], fake_quantize(x[..., 1:], Stream("r", 15, 2, "channel"), 128))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_pack_roundtrip_and_size(bits):
    q = torch.randint(0, 2 ** bits, (3, 5, 203), dtype=torch.uint8)
    p = pack_codes(q, bits)
    assert p.dtype == torch.uint8 and p.shape == (3, 5, 26 * bits)          # ceil(203/8)·bits bytes
    assert torch.equal(unpack_codes(p, bits, 203), q)


def test_gqa_latents_reconstruct_k_and_v_exactly():
    attn = _attns(kv_heads=2)[0]
    X = torch.randn(2, 10, 128)
    f = svd_factors(attn.k_proj.weight, attn.v_proj.weight, cross_layer=False)
    assert f["U_k"].shape == (128, 64) and f["F_k"].shape == (64, 64)
    assert torch.allclose((X @ f["U_k"]) @ f["F_k"], attn.k_proj(X), atol=1e-5)
    assert torch.allclose((X @ f["U_v"]) @ f["F_v"], attn.v_proj(X), atol=1e-5)
    U = svd_factors(attn.k_proj.weight, attn.v_proj.weight, cross_layer=True)["U_kv"]
    assert U.shape == (128, 128) and torch.allclose(U.T @ U, torch.eye(128), atol=1e-5)
    # XQuant-CL GQA: projecting X onto span(U_kv) changes nothing K and V see
    assert torch.allclose(attn.k_proj(X @ U @ U.T), attn.k_proj(X), atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cl_quantizes_against_the_reconstruction(kv_heads):
    attns = _attns(kv_heads, layers=5)
    codecs = build_codecs(attns, KVCacheSpec("xquant-cl", 2, group_size=32, base_layers=2))
    assert [c.delta for c in codecs] == [False, False, True, True, True]
    torch.manual_seed(1)
    X = torch.randn(1, 40, 128)
    acc = None
    for c in codecs:
        X = X + 0.1 * torch.randn_like(X)                  # the residual stream drifts a little per layer
        vals = c.encode(X, acc)
        hats = [fake_quantize(v, s, 32) for v, s in zip(vals, c.streams, strict=True)]
        prev = acc
        _, _, acc = c.decode(hats, prev)
        if not c.delta:
            continue
        U = c.factors.get("U_kv")
        delta = X - prev
        assert torch.allclose(vals[0], delta if U is None else delta @ U, atol=1e-5)   # not X - X_previous_true
        err = acc - X if U is None else (acc - X) @ U
        assert torch.allclose(err, hats[0] - vals[0], atol=1e-4)                # only this layer's rounding


def test_size_formula_matches_the_papers_columns():
    # Llama-2-7B-like MHA (32 layers, d 4096): XQuant 2-bit = 0.07, CL 2-bit with 3 layers at 4 bits = 0.076
    mha = [Stream("x", 4096, 2, "token")] * 32
    assert sum(stream_bits_per_token(s, 128) for s in mha) / (32 * 2 * 16 * 4096) == pytest.approx(2.25 / 32)
    attns = _attns(kv_heads=4, layers=32)   # width 128 = G: the formula is exact
    cl = size_summary(build_codecs(attns, spec := KVCacheSpec("xquant-cl", 2)), attns, spec)
    assert cl["kv_cache_ratio"] == pytest.approx((3 * 4.25 + 29 * 2.25) / (32 * 32), abs=1e-9)
    assert round(cl["kv_cache_ratio"], 3) == 0.076
    kivi = size_summary(build_codecs(attns, spec := KVCacheSpec("kivi", 3, base_layers=0)), attns, spec)
    assert kivi["kv_cache_ratio"] == pytest.approx(3.25 / 16)
    gqa = _attns(kv_heads=2, layers=32)      # GQA latents: the same bytes as the KV cache at equal bits
    x = size_summary(build_codecs(gqa, spec := KVCacheSpec("xquant", 2, group_size=64, base_layers=3)), gqa, spec)
    assert x["kv_cache_ratio"] == pytest.approx((3 * 4.5 + 29 * 2.5) / (32 * 16))


def test_bad_specs_are_refused():
    with pytest.raises(CalqError, match="METHOD:BITS"):
        KVCacheSpec.parse("xquant")
    with pytest.raises(CalqError, match="unknown KV cache method"):
        KVCacheSpec.parse("kvquant:2")
    with pytest.raises(CalqError, match="bits 1"):
        KVCacheSpec.parse("kivi:1")
    with pytest.raises(CalqError, match="layer_bits lists 2 layers"):
        build_codecs(_attns(2), KVCacheSpec("xquant", 3, layer_bits=(4, 3)))
