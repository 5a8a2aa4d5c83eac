"""One engine for every decoder-only architecture: compress, write, reload, same logits."""

from __future__ import annotations

import pytest
import torch
import transformers

import calq
from calq.api import compress_model
from calq.errors import ModelError
from calq.export.writer import write_checkpoint
from calq.recipe.schema import validate_recipe

# calq's reader dequantizes in fp32 exactly as the in-memory model holds W_hat.
RELOAD_RTOL = 1e-4

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"num_attention_heads": 4, "num_key_value_heads": 4,
                                                "pad_token_id": 0}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"num_attention_heads": 4, "ffn_dim": 128, "word_embed_proj_dim": 64}),
    "mamba": ("MambaConfig", "MambaForCausalLM", {"state_size": 8, "expand": 2, "time_step_rank": 16}),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM", {"state_size": 16, "expand": 2, "head_dim": 16, "num_heads": 8,
                                                      "n_groups": 2, "chunk_size": 16}),
}


def _build(arch, tmp_path, tokenizer):
    cfg_name, model_name, extra = ARCHS[arch]
    cfg_cls = getattr(transformers, cfg_name)
    kw = {"vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2, **extra}
    if arch not in ("mamba", "mamba2", "opt"):
        kw["intermediate_size"] = 128
    if arch != "opt" and arch not in ("mamba", "mamba2"):
        kw["max_position_embeddings"] = 128
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(cfg_cls(**kw)).half()
    path = tmp_path / arch
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("arch", list(ARCHS))
def test_compress_write_reload(arch, tmp_path, tokenizer):
    path = _build(arch, tmp_path, tokenizer)
    model, tok, dtype = calq.api.load_model(str(path))
    ids = torch.randint(0, len(tok), (2, 32))
    with torch.no_grad():
        dense = model(ids).logits
    recipe = validate_recipe({"model": str(path), "calibration": {"num_samples": 4, "seq_len": 32},
                              "stages": [{"method": "gptq", "bits": 4, "group_size": 16}]})
    result = compress_model(model, tok, recipe, torch.device("cpu"), dtype)
    assert len(result.modules) >= 2 * 2                      # Linears of both blocks (Mamba2 has two per block)
    called = {m.record.name for m in result.modules} | {s["name"] for s in result.skipped}
    assert len(called) == sum(isinstance(m, torch.nn.Linear) for m in model.modules()) - 1  # all but lm_head
    with torch.no_grad():
        mem = model(ids).logits
    scale = mem.abs().max().item()
    assert (mem - dense).abs().max().item() > 1e-4 * scale   # compression changed the model
    (tmp_path / "out").mkdir()
    write_checkpoint(model.to(dtype), [m.record for m in result.modules], tmp_path / "out", ["lm_head"])
    with torch.no_grad():
        back = calq.load(tmp_path / "out")(ids).logits
    assert (back - mem).abs().max().item() < RELOAD_RTOL * scale


def test_gpt2_conv1d_is_a_clear_error(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2,
                                                                 n_head=4, n_positions=64))
    recipe = validate_recipe({"stages": [{"method": "rtn", "bits": 4, "group_size": 16}],
                              "calibration": {"num_samples": 2, "seq_len": 16}})
    with pytest.raises(ModelError, match="Conv1D"):
        compress_model(model, tokenizer, recipe, torch.device("cpu"))


def test_nan_in_calibration_activations_names_the_module(tmp_path, tokenizer):
    from calq.errors import CalqError

    path = _build("llama", tmp_path, tokenizer)
    model, tok, dtype = calq.api.load_model(str(path))
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[3] = float("nan")
    recipe = validate_recipe({"calibration": {"num_samples": 2, "seq_len": 16},
                              "stages": [{"method": "gptq", "bits": 4, "group_size": 16},
                                         {"method": "eora", "rank": 4}]})
    with pytest.raises(CalqError, match=r"non-finite calibration activations entering model\.layers\.1\.self_attn"):
        compress_model(model, tok, recipe, torch.device("cpu"), dtype)
