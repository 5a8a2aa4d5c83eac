"""Quantized KV caches at run time: the patched attention (perplexity protocol), the packed `XCache` with
`model.generate`, and the CLI/API around them."""

import json

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from calq.cli.main import app
from calq.errors import CalqError, ModelError
from calq.eval.kv_cache import formula_bytes, quantized_kv_cache
from calq.methods.xquant import KV_METHODS, KVCacheSpec

METHODS = list(KV_METHODS)


def _model(kv_heads: int, layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=32, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def model(request):
    return _model(request.param)


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
def test_bits16_reproduces_the_logits(model, method):
    ids = torch.randint(0, 97, (2, 150))
    ref = model(ids, use_cache=False).logits
    with quantized_kv_cache(model, KVCacheSpec(method, 16, group_size=64)):
        sim = model(ids, use_cache=False).logits
    assert torch.allclose(sim, ref, atol=2e-5), (sim - ref).abs().max()
    after = model(ids, use_cache=False).logits                  # the patch is gone on exit
    assert torch.equal(after, ref)


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
def test_every_token_reads_the_quantized_cache(model, method):
    ids = torch.randint(0, 97, (1, 64))
    ref = model(ids, use_cache=False).logits
    with quantized_kv_cache(model, KVCacheSpec(method, 2, group_size=32, base_layers=0)):
        q2 = model(ids, use_cache=False).logits
    assert (q2[0, 0] - ref[0, 0]).abs().max() > 1e-4      # even the first token attends to its quantized K/V


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
def test_packed_cache_equals_the_simulation_and_the_size_formula(model, method):
    ids = torch.randint(0, 97, (2, 128))                  # a multiple of G: no fp16 window after the prefill
    spec = KVCacheSpec(method, 3, group_size=64, base_layers=1, keep_channel0_fp16=True)
    with quantized_kv_cache(model, spec) as rt:
        sim = model(ids, use_cache=False).logits
        cache = rt.new_cache()
        packed = model(ids, cache=cache, use_cache=True).logits
        assert torch.allclose(packed, sim, atol=1e-5)
        assert cache.nbytes()["streams"] == formula_bytes(rt, 128, batch=2)
        for t in range(3):                                 # decoding: per-channel streams open an fp16 window
            model(ids[:, t:t + 1], cache=cache, use_cache=True)
            assert cache.nbytes()["streams"] == formula_bytes(rt, 129 + t, batch=2)
        assert cache.nbytes()["positions"] == 2 * 131 * 8
        assert cache.get_seq_length() == 131


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
def test_greedy_generation_with_a_16bit_cache_equals_the_dynamic_cache(model, method):
    ids = torch.randint(0, 97, (1, 70))
    ref = model.generate(ids, max_new_tokens=12, do_sample=False, cache=DynamicCache(config=model.config))
    with quantized_kv_cache(model, KVCacheSpec(method, 16)) as rt:
        out = model.generate(ids, max_new_tokens=12, do_sample=False, cache=rt.new_cache())
        low = model.generate(ids, max_new_tokens=12, do_sample=False, cache=(c := rt.new_cache()))
    assert torch.equal(out, ref)
    assert low.shape == ref.shape and c.get_seq_length() == 81


@torch.no_grad()
def test_quantized_generation_holds_fewer_bytes_than_the_kv_cache():
    model = _model(2)
    ids = torch.randint(0, 97, (1, 256))
    dyn = DynamicCache(config=model.config)
    model.generate(ids, max_new_tokens=4, do_sample=False, cache=dyn)
    dyn_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dyn.layers)
    with quantized_kv_cache(model, KVCacheSpec("xquant-cl", 2, group_size=64, base_layers=0)) as rt:
        model.generate(ids, max_new_tokens=4, do_sample=False, cache=(c := rt.new_cache()))
    # fp32 K/V (model dtype) against 2-bit codes + fp16 (scale, min) per 64 values
    assert c.nbytes()["streams"] == formula_bytes(rt, 259) < dyn_bytes / 10


def test_refusals():
    model = _model(2)
    ids = torch.randint(0, 97, (1, 8))
    with quantized_kv_cache(model, KVCacheSpec("xquant-cl", 3)):
        with pytest.raises(CalqError, match="not DynamicCache"):
            model(ids, cache=DynamicCache(config=model.config), use_cache=True)
        layers = model.model.layers
        model.model.layers = torch.nn.ModuleList([layers[0], layers[2], layers[1], layers[3]])
        with pytest.raises(RuntimeError, match="must run in order"):
            model(ids, use_cache=False)
        model.model.layers = layers
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ModelError, match="patches Llama-family attention"):
        with quantized_kv_cache(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2)), KVCacheSpec()):
            pass


def _cli(*args):
    return CliRunner().invoke(app, list(args))


def test_evaluate_kv_cache_cli(zoo_llama_path):
    common = ["evaluate", "zoo:llama", "--seq-len", "256", "--max-windows", "2", "--device", "cpu", "--json"]
    plain = json.loads(_cli(*common).stdout.splitlines()[0])
    off = json.loads(_cli(*common, "--kv-cache", "xquant-cl:16").stdout.splitlines()[0])
    assert off["ppl"] == pytest.approx(plain["ppl"], rel=1e-5) and off["kv_cache_ratio"] == 1.0
    r = _cli(*common, "--kv-cache", "kivi:2", "--kv-base-layers", "0")
    row = json.loads(r.stdout.splitlines()[0])
    assert row["kv_cache"] == "kivi:2" and row["kv_cache_ratio"] == pytest.approx(2.25 / 16)
    assert row["ppl"] > plain["ppl"]
    bad = _cli(*common, "--kv-cache", "xquant")
    assert bad.exit_code == 2 and "METHOD:BITS" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_compress_with_a_cache_stage(tmp_path, tiny_llama_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""model: {tiny_llama_dir}
stages:
  - method: rtn
    bits: 4
    group_size: 64
  - method: xquant
    bits: 2
    cross_layer: true
    base_layers: 1
    group_size: 32
evaluation:
  seq_len: 64
  max_windows: 2
""")
    out = tmp_path / "out"
    r = _cli("compress", str(recipe), "-o", str(out), "--device", "cpu")
    assert r.exit_code == 0, r.output
    kv = json.loads((out / "kv_cache.json").read_text())
    assert kv["spec"]["method"] == "xquant-cl" and kv["tensors"] == ["layers.0.U_kv", "layers.1.U_kv"]
    report = json.loads((out / "report.json").read_text())
    # width 2·d_kv = 128, G 32: layer 0 at (4 + 1) bits, layer 1 at (2 + 1), over fp16 K and V (2·2·64·16 bits)
    assert report["kv_cache"]["kv_cache_ratio"] == pytest.approx((5 + 3) * 128 / (2 * 2 * 64 * 16))
    assert "KV cache: **xquant-cl:2" in (out / "report.md").read_text()
    rows = json.loads(_cli("inspect", str(out), "--json").stdout)["modules"]
    assert rows[-1]["name"] == "kv_cache" and rows[-1]["kv_cache_ratio"] == report["kv_cache"]["kv_cache_ratio"]
    # evaluate applies the checkpoint's own cache: the same number as the report's
    row = json.loads(_cli("evaluate", str(out), "--seq-len", "64", "--max-windows", "2", "--device", "cpu",
                          "--json").stdout.splitlines()[0])
    assert row["kv_cache"].startswith("xquant-cl:2") and row["ppl"] == pytest.approx(report["evaluation"][0]["ppl"])
    # factors that no longer match the weights are refused
    from safetensors.torch import load_file, save_file

    t = load_file(out / "kv_cache.safetensors")
    t["layers.1.U_kv"] *= 0.5
    save_file(t, out / "kv_cache.safetensors")
    r = _cli("evaluate", str(out), "--seq-len", "64", "--max-windows", "1", "--device", "cpu")
    assert r.exit_code == 2 and "do not reproduce" in r.stderr
    two = recipe.read_text().replace("evaluation:", "  - method: xquant\nevaluation:")
    recipe.write_text(two)
    r = _cli("compress", str(recipe), "-o", str(tmp_path / "o2"), "--device", "cpu")
    assert r.exit_code == 2 and "stages[2].method: one KV-cache stage" in r.stderr
    assert not (tmp_path / "o2").exists()
