"""GGUF files for llama.cpp, written with the `gguf` package (llama.cpp's own Python library).

Follows llama.cpp's conversion conventions (convert_hf_to_gguf.py, read for facts): tensor names from
`gguf.get_tensor_name_map`; q/k rows of Llama-family models permuted from Hugging Face's rotate-half layout to
llama.cpp's interleaved rotary layout; 1-D tensors (norms) in F32; `{arch}.*` hyperparameters; the tokenizer as
llama.cpp tokenizes: byte-level BPE as `gpt2` with its merges and pre-tokenizer name, SentencePiece BPE as `llama`
with scores. Written to a temporary file and renamed, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from calq.errors import CalqError
from calq.export.writer import tied_output_key

# transformers class -> (GGUF architecture, q/k rows permuted): llama.cpp's `llama` rotates interleaved pairs, so
# HF's rotate-half rows are permuted for it; `qwen2`/`qwen3` use the NEOX (rotate-half) layout HF has.
ARCHS = {"LlamaForCausalLM": ("llama", True), "MistralForCausalLM": ("llama", True),
         "Qwen2ForCausalLM": ("qwen2", False), "Qwen3ForCausalLM": ("qwen3", False)}
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
    if getattr(config, "use_sliding_window", False):
        raise CalqError("the model uses sliding-window attention, which GGUF export does not write yet",
                        "export a model with full attention")
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


# llama.cpp's pre-tokenizers (`tokenizer.ggml.pre`), recognised by the split regex a tokenizer.json declares
# before its byte-level step; llama-vocab.cpp holds the same expressions under these names.
SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "qwen2",
}
TOKEN_UNKNOWN, TOKEN_BYTE = 2, 6


def _bpe_pre(pre: dict) -> str | None:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, or None when llama.cpp has none that splits alike."""
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"         # single digits, then GPT-2's expression (SmolLM's tokenizer.json)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) and \
            steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
        return SPLITS.get(steps[0].get("pattern", {}).get("Regex"))
    return None


def _sentencepiece(data: dict) -> bool | None:
    """add_space_prefix for a SentencePiece-converted BPE (byte fallback, ▁ for spaces), None if it is not one."""
    model, norm, pre = data["model"], data.get("normalizer") or {}, data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm] if norm else []
    if any(s.get("type") == "Replace" and s.get("content") == "\u2581" for s in steps) and not pre:
        return any(s.get("type") == "Prepend" and s.get("prepend") == "\u2581" for s in steps)
    if pre.get("type") == "Metaspace" and pre.get("replacement") == "\u2581" and not steps:
        return pre.get("prepend_scheme", "always") in ("always", "first")
    return None


def _merge_scores(model: dict) -> dict[str, float]:
    """SentencePiece scores from BPE merges: llama.cpp's SPM tokenizer merges the pair whose joined piece scores
    highest, a Hugging Face BPE the pair of lowest rank, so a piece scores minus the rank of its first merge."""
    scores: dict[str, float] = {}
    for rank, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        scores.setdefault(a + b, -float(rank))
    return scores


def _tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The tokenizer as llama.cpp reads it: a byte-level BPE as model `gpt2` with its merges and pre-tokenizer
    name, a SentencePiece-converted BPE as model `llama` with scores and byte tokens; specials and template."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data["model"]
    pre = _bpe_pre(data.get("pre_tokenizer") or {}) if model.get("type") == "BPE" else None
    space_prefix = _sentencepiece(data)
    if pre is None and space_prefix is None:
        p = data.get("pre_tokenizer") or {}
        kinds = [x.get("type") for x in p.get("pretokenizers", [p])]
        raise CalqError(f"llama.cpp has no tokenizer that splits text as this one does ({model.get('type')} with "
                        f"pre-tokenizer {'+'.join(map(str, kinds))}); GGUF export writes byte-level BPE (GPT-2, "
                        f"SmolLM, Llama 3, Qwen2 splitting) and SentencePiece BPE",
                        "export a model with one of those tokenizers")
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    by_id = {i: t for t, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    scores = _merge_scores(model) if pre is None else {}
    unk = model.get("unk_token")
    floor = -float(len(model.get("merges", [])) + 1)     # pieces no merge makes: after every merge
    tokens, types, values = [], [], []
    for i in range(vocab_size):
        if i not in by_id:          # padding rows of an embedding larger than the vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_USER_DEFINED)
            values.append(floor)
            continue
        t = by_id[i]
        tokens.append(t)
        if i in added:
            types.append(TOKEN_CONTROL if added[i]["special"] else TOKEN_USER_DEFINED)
        elif pre is None and t == unk:
            types.append(TOKEN_UNKNOWN)
        elif pre is None and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(TOKEN_BYTE)
        else:
            types.append(TOKEN_NORMAL)
        values.append(0.0 if len(t) == 1 or i in added else scores.get(t, floor))
    writer.add_tokenizer_model("gpt2" if pre else "llama")
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if pre:
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    else:
        writer.add_token_scores(values)
        writer.add_add_space_prefix(space_prefix)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        tid = getattr(tokenizer, key, None)
        if tid is not None:
            add(int(tid))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_add_eos_token(bool(getattr(tokenizer, "add_eos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def _file_type(blocks: dict, dtype: str):
    import gguf

    types = {q for _, q in blocks.values()}
    if gguf.GGMLQuantizationType.Q4_0 in types:
        return gguf.LlamaFileType.MOSTLY_Q4_0
    if gguf.GGMLQuantizationType.Q4_1 in types:
        return gguf.LlamaFileType.MOSTLY_Q4_1
    if gguf.GGMLQuantizationType.Q8_0 in types:
        return gguf.LlamaFileType.MOSTLY_Q8_0
    return gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32


def write_gguf(model, tokenizer, path: str | Path, dtype: str = "f16", name: str | None = None,
               blocks: dict | None = None, embeddings: str | None = None) -> dict:
    """Write a transformers model as GGUF. Returns a summary.

    dtype: f16 or f32 for 2-D tensors; blocks: {state-dict key: (uint8 [OC, bytes], GGML type)} written as they
    are instead of the model's tensor (a calq checkpoint's codes, export_gguf); embeddings: f16, f32 or q8_0 for
    token_embd and output (q8_0 rounded by the gguf package, as llama.cpp's quantize does); default dtype."""
    import gguf

    arch, permute = ARCHS.get(type(model).__name__, (None, False))
    if arch is None:
        raise CalqError(f"GGUF export supports {', '.join(ARCHS)}; this model is {type(model).__name__}",
                        "export one of those architectures")
    if dtype not in ("f16", "f32") or embeddings not in (None, "f16", "f32", "q8_0"):
        raise CalqError(f"unknown GGUF tensor type {dtype!r} / embeddings {embeddings!r}", "use f16, f32 or q8_0")
    config = model.config
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(name or getattr(config, "_name_or_path", "") or type(model).__name__)
        writer.add_file_type(_file_type(blocks or {}, dtype))
        _hparams(writer, config)
        _tokenizer(writer, tokenizer, config.vocab_size)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
        tied = tied_output_key(model)      # stored once, as token_embd; llama.cpp ties when output is absent
        n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or \
            config.num_attention_heads
        count = 0
        for key, t in model.state_dict().items():
            if key == tied:
                continue
            gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise CalqError(f"no GGUF name for tensor {key}", f"this model has tensors llama.cpp's {arch} "
                                "architecture does not know")
            heads = None if not permute else n_head if key.endswith("self_attn.q_proj.weight") else \
                n_kv if key.endswith("self_attn.k_proj.weight") else None
            if blocks and key in blocks:
                data, qtype = blocks[key]
                data = torch.from_numpy(data)
                writer.add_tensor(gname, (rotary_permute(data, heads) if heads else data).numpy(), raw_dtype=qtype)
            else:
                W = t.detach().float()
                W = rotary_permute(W, heads) if heads else W
                kind = embeddings if gname in ("token_embd.weight", "output.weight") and embeddings else dtype
                if W.dim() > 1 and kind == "q8_0":
                    q8 = gguf.GGMLQuantizationType.Q8_0
                    writer.add_tensor(gname, gguf.quants.quantize(W.numpy(), q8), raw_dtype=q8)
                else:
                    writer.add_tensor(gname, W.numpy().astype(np.float16 if kind == "f16" and W.dim() > 1
                                                              else np.float32))
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


# --- a calq checkpoint as GGUF -----------------------------------------------------------------------------

GGUF_BITS = {4: "Q4_0", 8: "Q8_0"}      # symmetric codes of these widths are llama.cpp block formats as they are
BLOCK = 32


def module_blocks(name: str, ct: dict[str, torch.Tensor], scheme: dict):
    """(uint8 blocks [OC, IC/32 · type size], GGML type) holding exactly the codes and scales of one CT module,
    or raise CalqError saying why GGUF cannot hold them. A group of g = k·32 columns becomes k blocks sharing
    its scale, so GPTQ W4 g128 and per-channel weights convert too. Asymmetric 4-bit codes become Q4_1 blocks:
    code q - qmin, d = scale, m = -(zero - qmin)·scale, exact when that m is an fp16 (scheme q4_1's scales)."""
    import gguf
    from compressed_tensors.compressors.pack_quantized import unpack_from_int32

    from calq.export.ct import _PACKED_ZP, _unpack_zero

    OC, IC = ct["weight_shape"].tolist()
    bits, g = scheme["num_bits"], scheme.get("group_size")
    g = IC if scheme["strategy"] == "channel" else g
    asym = not scheme["symmetric"]
    why = None
    if scheme["strategy"] not in ("group", "channel"):
        why = "per-input-channel groups (layout ic / adadim) have no GGUF block format"
    elif asym and bits != 4:
        why = f"asymmetric {bits}-bit zero points have no GGUF block format (Q4_1 is the asymmetric 4-bit one)"
    elif bits not in GGUF_BITS:
        why = f"{bits}-bit codes have no GGUF block format of their own (Q4_0, Q4_1 and Q8_0 are 4- and 8-bit)"
    elif g % BLOCK or IC % BLOCK:
        why = f"groups of {g} over {IC} inputs do not split into llama.cpp's blocks of {BLOCK}"
    d = None if why else ct["weight_scale"].float().repeat_interleave(g // BLOCK, dim=1)    # [OC, IC/32]
    if not why and asym:
        zero = ct["weight_zero_point"]
        zero = _unpack_zero(zero, bits, torch.Size([OC, IC // g])) if scheme["strategy"] in _PACKED_ZP else zero
        m = -(zero.float().repeat_interleave(g // BLOCK, dim=1) + 8) * d                    # [OC, IC/32]
        if not torch.equal(m.to(torch.float16).float(), m):
            why = ("asymmetric zero points are exact in Q4_1 only when -zero·scale is an fp16 (scheme q4_1 "
                   "rounds its scales so)")
    if not why and not torch.equal(d.to(torch.float16).float(), d):
        why = "its scales are not fp16 values (a bf16 or fp32 checkpoint's scales), which GGUF blocks store"
    if why:
        raise CalqError(f"{name}: {why}", "quantize with scheme: q4_0, q4_1 or q8_0 (or symmetric 4/8-bit groups "
                        "of a multiple of 32, layout oc), or keep the compressed-tensors checkpoint")
    qtype = getattr(gguf.GGMLQuantizationType, "Q4_1" if asym else GGUF_BITS[bits])
    codes = unpack_from_int32(ct["weight_packed"], bits, torch.Size([OC, IC])).to(torch.int16)

    def fp16_bytes(x):
        return x.to(torch.float16).contiguous().view(torch.uint8).reshape(OC, IC // BLOCK, 2)

    head = [fp16_bytes(d)] + ([fp16_bytes(m)] if asym else [])
    q = codes.reshape(OC, IC // BLOCK, BLOCK)
    if bits == 4:       # byte j of a block: element j in the low nibble, j + 16 in the high one
        u = (q + 8).to(torch.uint8)
        body = u[..., :16] | (u[..., 16:] << 4)
    else:
        body = q.to(torch.int8).view(torch.uint8)
    return torch.cat([*head, body], dim=-1).reshape(OC, -1).numpy(), qtype


def export_gguf(src: str | Path, dst: str | Path, overwrite: bool = False, embeddings: str = "q8_0") -> dict:
    """Write the calq checkpoint src as one llama.cpp GGUF file dst: its quantized Linears as Q4_0/Q4_1/Q8_0 blocks
    holding its own codes and scales (checked to dequantize to the very weights calq evaluated), the rest f16
    (norms f32), token embedding and output head as `embeddings`."""
    import gguf
    from transformers import AutoTokenizer

    from calq.calibration.loading import load_model
    from calq.export.ct import ct_dequantize
    from calq.export.peft import ADAPTER_DIR
    from calq.export.reader import CheckpointReader, _scheme_for

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise CalqError(f"{src} is not a checkpoint folder (no config.json)", "pass the output folder of compress")
    if dst.suffix.lower() != ".gguf":
        raise CalqError(f"the GGUF output {dst} should end in .gguf", "name the file, e.g. -o model-q4_0.gguf")
    if dst.exists() and not overwrite:
        raise CalqError(f"output {dst} exists", "pass --overwrite or choose another name")
    if (src / ADAPTER_DIR).is_dir():
        raise CalqError(f"{src} carries a low-rank adapter ({ADAPTER_DIR}/), which merging would push off the "
                        "quantization grid", "export the checkpoint of the quantization stage alone, or keep "
                        "compressed-tensors (PEFT loads the adapter on top)")
    reader = CheckpointReader(src)
    q = reader.qconfig or {}
    if q and q.get("quant_method") != "compressed-tensors":
        raise CalqError(f"{src} has quant_method {q.get('quant_method')}; GGUF export reads compressed-tensors "
                        "checkpoints", "GGUF cannot express calq's own formats (PTQ1.61, Quamba)")
    model, _, _ = load_model(str(src), torch.float32, with_tokenizer=False)
    modules = dict(model.named_modules())
    blocks = {}
    for key in [k for k in reader.files if k.endswith(".weight_packed")]:
        name = key.removesuffix(".weight_packed")
        ct = reader._get([f"{name}.{s}" for s in ("weight_packed", "weight_scale", "weight_shape",
                                                  "weight_zero_point") if f"{name}.{s}" in reader.files])
        ct = {k.removeprefix(name + "."): v for k, v in ct.items()}
        scheme = _scheme_for(name, modules[name], q)
        data, qtype = module_blocks(name, ct, scheme)
        OC, IC = ct["weight_shape"].tolist()
        back = torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(OC, IC)
        if not torch.equal(back, ct_dequantize(ct, scheme)):
            raise CalqError(f"{name}: its GGUF blocks do not dequantize to the checkpoint's weight",
                            "report this as a calq bug")
        blocks[f"{name}.weight"] = (data, qtype)
    tokenizer = AutoTokenizer.from_pretrained(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    summary = write_gguf(model, tokenizer, dst, "f16", blocks=blocks, embeddings=embeddings)
    return {**summary, "quantized_tensors": len(blocks),
            "types": sorted({gguf.GGMLQuantizationType(t).name for _, t in blocks.values()})}
