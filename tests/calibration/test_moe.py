"""Mixture-of-experts models: every expert compressed, under the hub's names, and honest accounting."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from safetensors import safe_open

import calq
from calq.api import compress_model
from calq.calibration.experts import CheckpointNames
from calq.calibration.moe import MoESettings, unfused
from calq.export.inspect import checkpoint_summary
from calq.export.writer import write_checkpoint
from calq.recipe.schema import validate_recipe

NEVER = 3        # the expert DeepSeek-V3's routing bias keeps every token from

ARCHS = {        # (config, model, config kwargs, fused MoE blocks, experts, projections per expert)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {"intermediate_size": 128, "num_local_experts": 4, "num_experts_per_tok": 2,
                 "num_key_value_heads": 2}, 2, 4, ("w1", "w2", "w3")),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 4,
                   "num_experts_per_tok": 2, "num_key_value_heads": 2, "head_dim": 16}, 2, 4,
                  ("gate_proj", "up_proj", "down_proj")),
    # dense first block (first_k_dense_replace), shared experts, group-limited routing with a correction bias
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    {"num_hidden_layers": 3, "intermediate_size": 128, "moe_intermediate_size": 32,
                     "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
                     "first_k_dense_replace": 1, "n_shared_experts": 1, "q_lora_rank": 32, "kv_lora_rank": 32,
                     "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "num_key_value_heads": 4}, 2, 8,
                    ("gate_proj", "up_proj", "down_proj")),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              {"intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2, "num_key_value_heads": 4},
              2, 8, ("gate_proj", "up_proj", "down_proj")),
}
RECIPE = {"calibration": {"num_samples": 8, "seq_len": 64}, "evaluation": {"seq_len": 64, "max_windows": 2},
          "stages": [{"method": "gptq", "bits": 4, "group_size": 32}]}


def _model(arch, tokenizer):
    cfg_name, model_name, extra, *_ = ARCHS[arch]
    kw = {"vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "max_position_embeddings": 128, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0,
          "pad_token_id": 0, **extra}
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**kw))
    if arch == "deepseek_v3":
        with torch.no_grad():
            for layer in model.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias[NEVER] = -1e4
    return model.eval()


def _save(arch, tmp_path, tokenizer):
    path = tmp_path / arch
    _model(arch, tokenizer).half().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def compress(recipe: dict, out, **kw):
    return calq.api.compress(validate_recipe(recipe), out, **kw)


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_names_are_transformers_own_conversion(arch, tokenizer):
    from transformers.core_model_loading import revert_weight_conversion

    model = _model(arch, tokenizer)
    names = CheckpointNames(model)
    state = model.state_dict()
    hub = names.to_checkpoint(names.unfuse(state))
    ref = revert_weight_conversion(model, state)                 # what save_pretrained writes
    assert set(hub) == set(ref) and all(torch.equal(hub[k], ref[k]) for k in ref)
    back = names.from_checkpoint(hub)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    _, _, _, blocks, experts, projs = ARCHS[arch]
    assert len(names.expert_shapes()) == blocks * experts * len(projs)


def test_a_model_without_fused_experts_keeps_its_names(tiny_llama_dir):
    model = calq.load(tiny_llama_dir)
    names = CheckpointNames(model)
    assert not names.active and names.to_checkpoint(names.unfuse(model.state_dict())).keys() == \
        model.state_dict().keys()


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
@pytest.mark.parametrize("all_experts", [False, True])
def test_per_expert_linears_compute_the_model(arch, all_experts, tokenizer):
    model = _model(arch, tokenizer)
    ids = torch.randint(0, len(tokenizer), (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
        settings = MoESettings(CheckpointNames(model), calibrate_all_experts=all_experts)
        layers = model.model.layers
        ctxs = [unfused(b, f"model.layers.{i}", settings) for i, b in enumerate(layers)]
        states = [c.__enter__() for c in ctxs]
        try:
            out = model(ids).logits
            linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".experts." in n]
        finally:
            for c in ctxs:
                c.__exit__(None, None, None)
    assert (out - ref).abs().max().item() < 1e-5
    _, _, _, blocks, experts, projs = ARCHS[arch]
    assert len(linears) == blocks * experts * len(projs)
    counts = [s.take_counts() for s in states]
    assert sum(sum(c) for s in counts for c in s.values()) == blocks * 2 * 16 * 2       # tokens x top_k per block
    assert not any(isinstance(m, torch.nn.Linear) and ".experts." in n for n, m in model.named_modules())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_expert_is_quantized_and_reloads(arch, tmp_path, tokenizer):
    """Every expert projection is a GPTQ record, stored under the hub's name; calq.load and transformers
    reproduce the compressed model's logits; the blocks cost about a quarter of fp16."""
    path = _save(arch, tmp_path, tokenizer)
    model, tok, dtype = calq.api.load_model(str(path))
    recipe = validate_recipe({"model": str(path), **RECIPE})
    result = compress_model(model, tok, recipe, torch.device("cpu"), dtype)
    _, _, _, blocks, experts, projs = ARCHS[arch]
    names = CheckpointNames(model)
    expert_records = [m for m in result.modules if m.record.name in names.expert_shapes()]
    assert len(expert_records) == blocks * experts * len(projs)
    assert all(m.record.bits == 4 for m in expert_records)
    ids = torch.randint(0, len(tok), (2, 24))
    with torch.no_grad():
        mem = model(ids).logits
    out = tmp_path / "out"
    out.mkdir()
    stats = write_checkpoint(model.to(dtype), [m.record for m in result.modules], out, ["lm_head"])
    stored = _tensors(out)
    hub = {names.hub_name(m.record.name) for m in expert_records}
    assert all(f"{h}.weight_packed" in stored and f"{h}.weight_scale" in stored for h in hub)
    assert not any(t.dim() == 3 for t in stored.values())          # nothing fused left in the checkpoint
    rows = {r["name"] for r in calq.inspect(out)}
    assert hub <= rows
    block = [v for k, v in stats["sizes"].items() if k.startswith("model.layers.")]
    assert sum(v[0] for v in block) < 0.3 * 2 * sum(v[1] for v in block)      # W4 g32 ≈ 4.5 bits of 16
    scale = mem.abs().max().item()
    with torch.no_grad():
        back = calq.load(out)(ids).logits
        assert (back - mem).abs().max().item() < 1e-4 * scale
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            out, quantization_config=transformers.CompressedTensorsConfig(dequantize=True), dtype=torch.float32)
        # transformers multiplies the fp16 scales in fp16: a few ulp apart from calq's fp32 product
        assert (hf(ids).logits - mem).abs().max().item() < 2e-3 * scale


def test_config_groups_let_loaders_find_the_experts_scheme(tmp_path, tokenizer):
    """transformers picks the MoE scheme from a `re:` target naming experts; vLLM asks for
    `{experts}.0.gate_proj` even when the checkpoint calls it w1."""
    from transformers.integrations.compressed_tensors import get_experts_scheme

    path = _save("mixtral", tmp_path, tokenizer)
    model, tok, dtype = calq.api.load_model(str(path))
    recipe = validate_recipe({"model": str(path), **RECIPE, "stages": [
        {"method": "gptq", "bits": 4, "group_size": 32, "ignore": ["lm_head", "re:.*experts.*"]},
        {"method": "rtn", "bits": 8, "group_size": 64, "targets": ["re:.*experts.*"]}]})
    result = compress_model(model, tok, recipe, torch.device("cpu"), dtype)
    write_checkpoint(model.to(dtype), [m.record for m in result.modules], tmp_path, ["lm_head"])
    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    experts = [g for g in qcfg["config_groups"].values() if g["weights"]["num_bits"] == 8]
    assert len(experts) == 1 and experts[0]["targets"][0].startswith("re:")
    target = experts[0]["targets"][0][3:]
    assert re.match(target, "model.layers.1.block_sparse_moe.experts.0.gate_proj")
    assert re.match(target, "model.layers.0.block_sparse_moe.experts.3.w2")
    assert not re.match(target, "model.layers.0.self_attn.q_proj")
    chosen = get_experts_scheme(transformers.CompressedTensorsConfig.from_dict(qcfg).quantization_config)
    assert chosen.weights.num_bits == 8


def test_disk_offload_writes_the_same_tensors(tmp_path, tokenizer):
    path = _save("qwen3_moe", tmp_path, tokenizer)
    recipe = {"model": str(path), **RECIPE}
    ram = compress(recipe, tmp_path / "ram", evaluate=False, offload="cpu")
    disk = compress(recipe, tmp_path / "disk", evaluate=False, offload="disk")
    a, b = _tensors(tmp_path / "ram"), _tensors(tmp_path / "disk")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert disk.bits_per_parameter_blocks == ram.bits_per_parameter_blocks
    assert any(".experts.3.down_proj.weight_packed" in k for k in a)


def test_an_expert_no_token_reaches_is_rounded_and_recorded(tmp_path, tokenizer):
    path = _save("deepseek_v3", tmp_path, tokenizer)
    report = compress({"model": str(path), **RECIPE, "moe": {"min_tokens": 10_000}}, tmp_path / "out")
    assert all(t[NEVER] == 0 and sum(t) == 8 * 64 * 2 for t in report.expert_tokens.values())
    never = [m for m in report.modules if f".experts.{NEVER}." in m.name]
    assert len(never) == 2 * 3 and all(m.method == "rtn" and m.tokens == 0 and m.info["fallback_from"] == "gptq"
                                       for m in never)
    # every routed expert saw fewer than min_tokens: GPTQ on a damped Hessian, recorded
    routed = [m for m in report.modules if ".experts." in m.name and m not in never and "shared" not in m.name]
    assert routed and all(m.method == "gptq" and m.info["few_tokens"]["tokens"] == m.tokens > 0 for m in routed)
    assert not report.untouched_weights
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Experts" in md and "6 expert projections no calibration token reached" in md
    assert report.evaluation[0].ppl < 1.05 * report.evaluation[0].baseline_ppl


def test_calibrate_all_experts_gives_every_expert_every_token(tmp_path, tokenizer):
    path = _save("deepseek_v3", tmp_path, tokenizer)
    model, tok, dtype = calq.api.load_model(str(path))
    recipe = validate_recipe({"model": str(path), **RECIPE, "moe": {"calibrate_all_experts": True}})
    ids = torch.randint(0, len(tok), (2, 24))
    result = compress_model(model, tok, recipe, torch.device("cpu"), dtype)
    experts = [m for m in result.modules if ".mlp.experts." in m.record.name]
    assert len(experts) == 2 * 8 * 3 and all(m.tokens == 8 * 64 and m.record.method == "gptq" for m in experts)
    assert all(t[NEVER] == 0 for t in result.expert_tokens.values())   # the router still never sends it any
    with torch.no_grad():              # the block output followed the router: the model is still well-formed
        assert torch.isfinite(model(ids).logits).all()


def test_methods_on_experts(tmp_path, tokenizer):
    """AdaDim picks a layout per expert; pruning prunes them; EoRA, whose adapters PEFT cannot put on fused
    experts, leaves them to the earlier stage and says so."""
    path = _save("qwen3_moe", tmp_path, tokenizer)
    for stages, check in [
        ([{"method": "gptq", "bits": 4, "group_size": 16, "layout": "adadim"}],
         lambda r, ex: all(m.info["adadim"]["choice"] in ("oc", "ic") for m in ex)),
        ([{"method": "prune", "sparsity": "2:4", "criterion": "wanda"}],
         lambda r, ex: all(m.method == "prune" for m in ex)),
        ([{"method": "gptq", "bits": 4, "group_size": 32}, {"method": "eora", "rank": 4}],
         lambda r, ex: all(m.method == "gptq" for m in ex) and {a.name for a in r.adapters}.isdisjoint(
             m.name for m in ex) and any("PEFT" in s["reason"] for s in r.skipped_modules))]:
        report = compress({"model": str(path), **RECIPE, "stages": stages}, tmp_path / "out", overwrite=True,
                          evaluate=False)
        ex = [m for m in report.modules if ".experts." in m.name]
        assert len(ex) == 2 * 4 * 3 and check(report, ex), stages


def test_bits_per_parameter_over_the_blocks(tmp_path, tokenizer):
    """The issue's run: a 2-layer random Mixtral (4 experts, hidden 128), GPTQ W4 g128."""
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     num_local_experts=4, max_position_embeddings=256, tie_word_embeddings=False)
    path = tmp_path / "mixtral"
    transformers.MixtralForCausalLM(cfg).half().save_pretrained(path)
    tokenizer.save_pretrained(path)
    recipe = {"model": str(path), "calibration": {"num_samples": 8, "seq_len": 64},
              "stages": [{"method": "gptq", "bits": 4, "group_size": 128}]}
    report = compress(recipe, tmp_path / "all", evaluate=False)
    assert 4.1 < report.bits_per_parameter_blocks < 4.25 and not report.untouched_weights
    summary = checkpoint_summary(tmp_path / "all")
    assert summary["bits_per_parameter_blocks"] == pytest.approx(report.bits_per_parameter_blocks, rel=1e-3)
    assert summary["parameters"] == report.parameters
    recipe["stages"][0]["ignore"] = ["lm_head", "re:.*experts.*"]
    left = compress(recipe, tmp_path / "left", evaluate=False)
    assert left.bits_per_weight < 4.3                    # what the issue saw: honest about the Linears it counts
    assert left.bits_per_parameter_blocks > 12           # and now about the blocks
    assert sorted(u["name"] for u in left.untouched_weights) == [
        f"model.layers.*.mlp.experts.*.{p}.weight" for p in ("w1", "w2", "w3")]
    assert "holds 29.6 % of a block's parameters" in (tmp_path / "left" / "report.md").read_text()


def test_inspect_keeps_the_distinguishing_tail():
    from calq.export.inspect import short_names

    names = [f"model.layers.{i}.block_sparse_moe.experts.{e}.w{p}" for i in (0, 31) for e in (0, 7) for p in (1, 2)]
    short = short_names(names + ["model.layers.31.self_attn.q_proj"], 24)
    assert all(len(s) <= 24 for s in short) and len(set(short)) == len(short)
    assert short[-2] == "…31.….experts.7.w2" and short[-1] == "…31.self_attn.q_proj"


def test_gptq_export_of_an_moe_checkpoint(tmp_path, tokenizer):
    from calq.export.gptq import export_gptq

    path = _save("mixtral", tmp_path, tokenizer)
    compress({"model": str(path), **RECIPE}, tmp_path / "ct", evaluate=False)
    export_gptq(tmp_path / "ct", tmp_path / "gptq")
    assert any(k.endswith("block_sparse_moe.experts.3.w2.qweight") for k in _tensors(tmp_path / "gptq"))
    ids = torch.randint(0, len(tokenizer), (2, 16))
    with torch.no_grad():
        assert torch.equal(calq.load(tmp_path / "ct")(ids).logits, calq.load(tmp_path / "gptq")(ids).logits)


def _upcycled_zoo_mixtral(path):
    """zoo:llama as a 4-expert top-2 Mixtral: every expert a copy of its trained MLP, a random router. It
    computes zoo:llama exactly (the routing weights sum to 1), so its perplexity is a trained model's, and
    quantization damage shows in it; random models' perplexity is the vocabulary size whatever is done."""
    from calq.zoo import zoo_path

    src = transformers.AutoModelForCausalLM.from_pretrained(zoo_path("llama"), dtype=torch.float32)
    c = src.config
    cfg = transformers.MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, max_position_embeddings=512,
        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    state, new = src.state_dict(), model.state_dict()
    for k in new:
        if ".mlp." not in k:
            new[k] = state[k]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        up = torch.cat([state[p + "gate_proj.weight"], state[p + "up_proj.weight"]])
        new[p + "experts.gate_up_proj"] = up[None].repeat(4, 1, 1)
        new[p + "experts.down_proj"] = state[p + "down_proj.weight"][None].repeat(4, 1, 1)
        new[p + "gate.weight"] = 0.02 * torch.randn(4, c.hidden_size)
    model.load_state_dict(new)
    model.half().save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(zoo_path("llama")).save_pretrained(path)


def test_gptq_beats_rtn_on_an_upcycled_trained_moe(tmp_path):
    from calq.calibration.data import calibration_windows, evaluation_windows, load_text
    from calq.eval.perplexity import perplexity

    path = tmp_path / "upmix"
    _upcycled_zoo_mixtral(path)
    cal = {"num_samples": 16, "seq_len": 256}
    dense, tok, dtype = calq.api.load_model(str(path))
    cal_ids = calibration_windows(load_text("stdlib:train", "calibration"), tok, 16, 256, 0)
    test_ids = evaluation_windows(load_text("stdlib:test", "evaluation"), tok, 256, 16)
    with torch.no_grad():
        ref = dense(cal_ids).logits
    err, ppl = {}, {}
    for method in ("rtn", "gptq"):
        model = calq.api.load_model(str(path))[0]
        recipe = validate_recipe({"model": str(path), "calibration": cal,
                                  "stages": [{"method": method, "bits": 2, "group_size": 128}]})
        result = compress_model(model, tok, recipe, torch.device("cpu"), dtype)
        assert len([m for m in result.modules if ".experts." in m.record.name]) == 4 * 4 * 3
        with torch.no_grad():       # calibration error: of the whole model's logits on the calibration windows
            err[method] = ((model(cal_ids).logits - ref).pow(2).sum() / ref.pow(2).sum()).sqrt().item()
        ppl[method] = perplexity(model, test_ids, batch_size=8)
    base = perplexity(dense, test_ids, batch_size=8)
    # W2 g128, 16 x 256 calibration tokens: error 0.031 vs 0.117, perplexity 80.0 vs 85.4 (dense 78.95)
    assert err["gptq"] < 0.5 * err["rtn"]
    assert base < ppl["gptq"] and ppl["gptq"] - base < 0.5 * (ppl["rtn"] - base)


class _ListMoE(torch.nn.Module):
    """Custom-code MoE: an nn.Linear router and an nn.ModuleList of expert MLPs, top-1; the last expert is
    masked out of the routing, so no token ever reaches it."""

    def __init__(self, mlps):
        super().__init__()
        self.gate = torch.nn.Linear(mlps[0].hidden_size, len(mlps), bias=False)
        self.experts = torch.nn.ModuleList(mlps)

    def forward(self, x):
        logits = self.gate(x)
        logits[..., -1] = float("-inf")
        top = logits.argmax(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            hit = top == e
            if hit.any():
                out[hit] = expert(x[hit])
        return out


def test_experts_in_a_module_list(tiny_llama_dir):
    from transformers.models.llama.modeling_llama import LlamaMLP

    model, tok, dtype = calq.api.load_model(str(tiny_llama_dir))
    torch.manual_seed(0)
    for layer in model.model.layers:
        layer.mlp = _ListMoE([LlamaMLP(model.config) for _ in range(3)])
    recipe = validate_recipe({**RECIPE, "moe": {"min_tokens": 1000}})
    result = compress_model(model, tok, recipe, torch.device("cpu"), torch.float32)
    by = {m.record.name: m for m in result.modules}
    assert not any(n.endswith("mlp.gate") for n in by)                 # the router stays full precision
    for i in range(2):
        p = f"model.layers.{i}.mlp.experts"
        assert all(by[f"{p}.{e}.{n}"].record.method == "gptq" and 0 < by[f"{p}.{e}.{n}"].tokens < 1000 and
                   "few_tokens" in by[f"{p}.{e}.{n}"].record.info for e in (0, 1) for n in ("gate_proj", "up_proj"))
        never = [by[f"{p}.2.{n}"] for n in ("gate_proj", "up_proj", "down_proj")]
        assert all(m.record.method == "rtn" and m.tokens == 0 and m.record.info["fallback_from"] == "gptq"
                   for m in never)
    named = validate_recipe({**RECIPE, "stages": [{"method": "rtn", "bits": 8, "group_size": 32,
                                                   "targets": ["re:.*mlp.gate$"]}]})
    assert len(compress_model(model, tok, named, torch.device("cpu"), torch.float32).modules) == 2


def test_experts_per_pass_holds_a_few_hessians_at_a_time(tmp_path, tokenizer):
    from calq.calibration.moe import expert_passes

    names = {f"b.mlp.experts.{e}.{p}": "b.mlp.experts" for e in range(8) for p in ("gate_proj", "down_proj")}
    targets = {"b.self_attn.q_proj": None, **dict.fromkeys(names)}
    passes = expert_passes(targets, names, 3)
    assert [len(p) for p in passes] == [1, 6, 6, 4] and list(passes[0]) == ["b.self_attn.q_proj"]
    assert expert_passes(targets, names, None) == [targets]
    path = _save("olmoe", tmp_path, tokenizer)
    model, tok, dtype = calq.api.load_model(str(path))
    seen = []
    real = calq.calibration.statistics.Statistics.__init__

    def spy(self, targets, *a, **kw):
        seen.append(sum(".experts." in n for n in targets))
        real(self, targets, *a, **kw)

    calq.calibration.statistics.Statistics.__init__ = spy
    try:
        recipe = validate_recipe({"model": str(path), **RECIPE, "moe": {"experts_per_pass": 3}})
        result = compress_model(model, tok, recipe, torch.device("cpu"), dtype)
    finally:
        calq.calibration.statistics.Statistics.__init__ = real
    assert seen == [0, 9, 9, 6] * 2                     # per block: attention, then 3 + 3 + 2 experts
    assert len([m for m in result.modules if ".experts." in m.record.name]) == 2 * 8 * 3
