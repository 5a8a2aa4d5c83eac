"""GGUF files for llama.cpp, written with the `gguf` package (llama.cpp's own Python library).

Follows llama.cpp's conversion conventions (convert_hf_to_gguf.py, read for facts): tensor names from
`gguf.get_tensor_name_map`; q/k rows of Llama-family models permuted from Hugging Face's rotate-half layout to
llama.cpp's interleaved rotary layout; 1-D tensors (norms) in F32; `{arch}.*` hyperparameters; a byte-level BPE
tokenizer as `tokenizer.ggml.model = gpt2` with its tokens, token types and merges. Written to a temporary
file and renamed, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from calq.errors import CalqError
from calq.export.writer import tied_output_key

# transformers class -> GGUF architecture whose q/k llama.cpp expects in the interleaved rotary layout
ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4


def rotary_permute(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q or k projection [n_head·head_dim, IC] from HF's halves layout to llama.cpp's pairs."""
    return W.reshape(n_head, 2, W.shape[0] // n_head // 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise CalqError(f"rope scaling {params['rope_type']!r} is not written to GGUF yet",
                        "export a model with plain rotary embeddings")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _hparams(writer, config) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE tokenizer as llama.cpp's `gpt2` model: tokens by id, their types, merges, specials."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = data["model"], data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise CalqError(f"only byte-level BPE tokenizers with GPT-2 splitting are written to GGUF so far; this one "
                        f"is {model.get('type')} with pre-tokenizer {pre.get('type')}",
                        "export a model with a GPT-2 style tokenizer")
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    by_id = {i: t for t, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:          # padding rows of an embedding larger than the vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_USER_DEFINED)
            continue
        tokens.append(by_id[i])
        types.append(TOKEN_NORMAL if i not in added else TOKEN_CONTROL if added[i]["special"] else TOKEN_USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        tid = getattr(tokenizer, key, None)
        if tid is not None:
            add(int(tid))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def write_gguf(model, tokenizer, path: str | Path, dtype: str = "f16", name: str | None = None) -> dict:
    """Write a dense transformers model as GGUF (`dtype` f16 or f32 for 2-D tensors). Returns a summary."""
    import gguf

    arch = ARCHS.get(type(model).__name__)
    if arch is None:
        raise CalqError(f"GGUF export supports {', '.join(ARCHS)}; this model is {type(model).__name__}",
                        "export one of those architectures")
    if dtype not in ("f16", "f32"):
        raise CalqError(f"unknown GGUF dtype {dtype!r}", "use f16 or f32")
    config = model.config
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(name or getattr(config, "_name_or_path", "") or type(model).__name__)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        _hparams(writer, config)
        _tokenizer(writer, tokenizer, config.vocab_size)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
        tied = tied_output_key(model)      # stored once, as token_embd; llama.cpp ties when output is absent
        n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or \
            config.num_attention_heads
        count = 0
        for key, t in model.state_dict().items():
            if key == tied:
                continue
            gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise CalqError(f"no GGUF name for tensor {key}", "this model has tensors llama.cpp's llama "
                                "architecture does not know")
            W = t.detach().float()
            if key.endswith("self_attn.q_proj.weight"):
                W = rotary_permute(W, n_head)
            elif key.endswith("self_attn.k_proj.weight"):
                W = rotary_permute(W, n_kv)
            arr = W.numpy().astype(np.float16 if dtype == "f16" and W.dim() > 1 else np.float32)
            writer.add_tensor(gname, arr)
            count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"path": str(path), "architecture": arch, "tensors": count, "bytes": path.stat().st_size}
