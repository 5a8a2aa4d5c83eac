"""Quantized KV caches at run time: the patched attention, the simulated cache, and a packed transformers `Cache`.

`quantized_kv_cache(model, spec)` replaces the `forward` of every attention module (instance attribute, restored
on exit) with one that takes K and V from the layer's cache codec (methods/xquant.py) instead of k_proj/v_proj:

    q = q_proj(X)                      (X = the post-norm input the decoder layer hands to self_attn)
    streams of the new tokens = codec.encode(X, accumulator)   -> stored (quantized)
    K, V = codec.decode(every cached token's dequantized streams)   (pre-RoPE, k/v bias included)
    RoPE on q (new positions) and K (every cached position); then the model's own attention function.

Without a cache (perplexity: `use_cache=False`) each forward quantizes its streams over the whole window, then
dequantizes them: every token's K and V come from the quantized cache, teacher-forced (the paper's protocol).
A trailing partial group along tokens (per-channel streams) is quantized as its own group. With an `XCache`
(generation) the codes are stored packed, per-channel streams keep the newest tokens of an unfilled group in fp16
(the KIVI residual), and K and V are rematerialized per layer at every step.

Supported: decoder layers whose attention has q_proj/k_proj/v_proj/o_proj Linears, a `head_dim`, the
`apply_rotary_pos_emb` of its modeling module and no q/k norms (Llama, Mistral, Qwen2 in transformers 5.x).
XQuant-CL carries its accumulator from layer to layer, so layers must run in order, all of them.
"""

from __future__ import annotations

import math
import sys
import types
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from calq.calibration.blocks import find_blocks
from calq.errors import CalqError, ModelError
from calq.methods.xquant import (
    OFF,
    KVCacheSpec,
    LayerCodec,
    Stream,
    build_codecs,
    fake_quantize,
    pack_codes,
    quantize_groups,
    size_summary,
    stream_bits_per_token,
    unpack_codes,
)


def attention_modules(model) -> list:
    """The self-attention module of every decoder layer, in order; ModelError if one is not supported."""
    _, blocks = find_blocks(model)
    attns = []
    for i, block in enumerate(blocks):
        attn = getattr(block, "self_attn", None)
        missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim") if not hasattr(attn, n)]
        why = f"has no {', '.join(missing)}" if missing else None
        if not why and (getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None):
            why = "normalizes q/k per head (Qwen3-style)"
        if not why and not hasattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb"):
            why = "does not use the Llama-style apply_rotary_pos_emb"
        if why:
            raise ModelError(f"layer {i}'s attention ({type(attn).__name__}) {why}; the quantized KV cache patches "
                             "Llama-family attention", "use a Llama, Mistral or Qwen2 model")
        attns.append(attn)
    if any(t != "full_attention" for t in getattr(model.config, "layer_types", None) or []):
        raise ModelError("the model mixes sliding-window layers", "use a model with full attention in every layer")
    return attns


def _rotary(model):
    found = [m for n, m in model.named_modules() if n.endswith("rotary_emb")]
    if not found:
        raise ModelError(f"{type(model).__name__} has no rotary_emb module", "use a Llama-family model")
    return found[0]


class KVRuntime:
    """The codecs of a model under one cache spec, and the patch that routes its attention through them."""

    def __init__(self, model, spec: KVCacheSpec, factors: dict[int, dict] | None = None):
        self.model, self.spec = model, spec
        self.attns = attention_modules(model)
        self.codecs = build_codecs(self.attns, spec, factors)
        self.rotary = _rotary(model)
        self._sim: _SimulatedStore | None = None

    def summary(self) -> dict:
        return size_summary(self.codecs, self.attns, self.spec)

    def new_cache(self) -> XCache:
        """An empty packed cache for `model.generate(ids, cache=...)` or a manual forward loop."""
        return XCache(self)

    def install(self) -> None:
        for attn, codec in zip(self.attns, self.codecs, strict=True):
            attn._calq_kv = (self, codec)
            attn.forward = types.MethodType(_forward, attn)

    def remove(self) -> None:
        for attn in self.attns:
            attn.__dict__.pop("forward", None)
            attn.__dict__.pop("_calq_kv", None)

    def store(self, cache, index: int):
        if isinstance(cache, XCache):
            if cache.runtime is not self:
                raise CalqError("this XCache belongs to another quantized-cache setup", "make it with new_cache()")
            return cache
        if cache is not None:
            raise CalqError(f"the attention is patched for a calq KV cache, not {type(cache).__name__}",
                            "pass cache=runtime.new_cache() (or use_cache=False)")
        if index == 0:
            self._sim = _SimulatedStore(self.spec.group_size)
        if self._sim is None:
            raise RuntimeError("a forward started past layer 0")
        return self._sim


@contextmanager
def quantized_kv_cache(model, spec: KVCacheSpec, factors: dict[int, dict] | None = None):
    """Within the block, `model`'s attention reads K and V from `spec`'s cache (see the module docstring)."""
    rt = KVRuntime(model, spec, factors)
    rt.install()
    try:
        yield rt
    finally:
        rt.remove()


def _forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
             past_key_values=None, **kwargs):
    rt, codec = self._calq_kv
    cache = cache if cache is not None else past_key_values
    B, L, _ = hidden_states.shape
    hd = self.head_dim
    q = self.q_proj(hidden_states).view(B, L, -1, hd).transpose(1, 2)
    store = rt.store(cache, codec.index)
    K, V, (cos_k, sin_k) = store.kv(codec, hidden_states, position_embeddings, kwargs.get("position_ids"), rt)
    T = K.shape[1]
    K = K.to(q.dtype).view(B, T, -1, hd).transpose(1, 2)
    V = V.to(q.dtype).view(B, T, -1, hd).transpose(1, 2)
    rope = sys.modules[type(self).__module__].apply_rotary_pos_emb
    cos, sin = position_embeddings
    q = rope(q, q, cos, sin)[0]
    K = rope(K, K, cos_k, sin_k)[0]
    eager = getattr(sys.modules[type(self).__module__], "eager_attention_forward", None)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
    out, weights = attend(self, q, K, V, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
    return self.o_proj(out.reshape(B, L, -1).contiguous()), weights


class _LayerOrder:
    """XQuant-CL's accumulator passes from layer to layer: check that one forward visits them in order."""

    def __init__(self):
        self.next = 0
        self.acc: torch.Tensor | None = None

    def visit(self, index: int) -> None:
        if index != self.next:
            raise RuntimeError(f"quantized KV cache: layer {index} ran after layer {self.next - 1}; layers must run "
                               "in order (XQuant-CL carries an accumulator across them)")
        self.next = index + 1


class _SimulatedStore(_LayerOrder):
    """One forward without a cache: quantize-dequantize each stream over the whole window."""

    def __init__(self, group_size: int):
        super().__init__()
        self.G = group_size

    def kv(self, codec: LayerCodec, X, position_embeddings, position_ids, rt):
        self.visit(codec.index)
        values = codec.encode(X, self.acc if codec.delta else None)
        hats = [fake_quantize(v, s, self.G) for v, s in zip(values, codec.streams, strict=True)]
        K, V, self.acc = codec.decode(hats, self.acc)
        return K, V, position_embeddings


# ---------------------------------------------------------------- packed storage

class _RawStream:
    """bits 16: the values as computed, in the model's dtype."""

    def __init__(self, stream: Stream, G: int):
        self.data: torch.Tensor | None = None

    def append(self, x: torch.Tensor, dtype: torch.dtype) -> None:
        x = x.to(dtype)
        self.data = x if self.data is None else torch.cat([self.data, x], 1)

    def read(self) -> torch.Tensor:
        return self.data.float()

    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.nbytes


class _TokenStream:
    """Per-token groups: a token's codes are final when it arrives (no window). Codes packed per token row."""

    def __init__(self, stream: Stream, G: int):
        self.s, self.G = stream, G
        self.codes = self.scale = self.mn = None

    def append(self, x: torch.Tensor, dtype) -> None:
        q, scale, mn, _ = quantize_groups(x, self.s.bits, self.G, "token")        # q [B, L, ng, G]
        packed = pack_codes(q.flatten(-2)[..., :self.s.width], self.s.bits)      # [B, L, ceil(w/8)·bits]
        self.codes, self.scale, self.mn = (t if old is None else torch.cat([old, t], 1) for old, t in
                                           ((self.codes, packed), (self.scale, scale), (self.mn, mn)))

    def read(self) -> torch.Tensor:
        w = self.s.width
        q = unpack_codes(self.codes, self.s.bits, w).float()
        return q * _per_channel(self.scale, self.G, w) + _per_channel(self.mn, self.G, w, scale=False)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.codes, self.scale, self.mn) if t is not None)


def _per_channel(t: torch.Tensor, G: int, w: int, scale: bool = True) -> torch.Tensor:
    """Per-group fp16 values [B, T, ng] spread over the w channels they cover, fp32."""
    t = t.float()
    if scale:
        t = torch.where(t > 0, t, torch.ones_like(t))
    return t.repeat_interleave(G, -1)[..., :w]


class _ChannelStream:
    """Per-channel groups of G tokens: full groups packed, the newest tokens of an unfilled group kept fp16."""

    def __init__(self, stream: Stream, G: int):
        self.s, self.G = stream, G
        self.codes = self.scale = self.mn = None          # [B, nblocks, ·]
        self.window: torch.Tensor | None = None          # fp16 [B, t < G, w]

    def append(self, x: torch.Tensor, dtype) -> None:
        x = x if self.window is None else torch.cat([self.window.float(), x], 1)
        full = x.shape[1] // self.G * self.G
        if full:
            blocks = x[:, :full].unflatten(1, (-1, self.G))                       # [B, nb, G, w]
            B, nb = blocks.shape[:2]
            q, scale, mn, _ = quantize_groups(blocks.flatten(0, 1), self.s.bits, self.G, "channel")
            packed = pack_codes(q.reshape(B, nb, -1), self.s.bits)                # [B, nb, w·G·bits/8]
            scale, mn = scale.reshape(B, nb, -1), mn.reshape(B, nb, -1)           # [B, nb, w]
            self.codes, self.scale, self.mn = (t if old is None else torch.cat([old, t], 1) for old, t in
                                               ((self.codes, packed), (self.scale, scale), (self.mn, mn)))
        self.window = x[:, full:].half()

    def read(self) -> torch.Tensor:
        parts = []
        if self.codes is not None:
            B, nb = self.codes.shape[:2]
            w = self.s.width
            q = unpack_codes(self.codes, self.s.bits, w * self.G).float().reshape(B, nb, w, self.G)
            s = self.scale.float()
            s = torch.where(s > 0, s, torch.ones_like(s))
            parts.append((q * s[..., None] + self.mn.float()[..., None]).transpose(2, 3).flatten(1, 2))
        parts.append(self.window.float())
        return torch.cat(parts, 1)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.codes, self.scale, self.mn, self.window) if t is not None)


class _Ch0Stream:
    """Channel 0 kept in fp16 beside the quantized channels 1..w-1 (XU_k's outlier channel, App. B)."""

    def __init__(self, stream: Stream, G: int):
        self.ch0: torch.Tensor | None = None
        self.rest = _stream_store(Stream(stream.name, stream.width - 1, stream.bits, stream.axis), G)

    def append(self, x: torch.Tensor, dtype) -> None:
        c = x[..., :1].half()
        self.ch0 = c if self.ch0 is None else torch.cat([self.ch0, c], 1)
        self.rest.append(x[..., 1:], dtype)

    def read(self) -> torch.Tensor:
        return torch.cat([self.ch0.float(), self.rest.read()], -1)

    def nbytes(self) -> int:
        return (0 if self.ch0 is None else self.ch0.nbytes) + self.rest.nbytes()


def _stream_store(stream: Stream, G: int):
    if stream.bits == OFF:
        return _RawStream(stream, G)
    if stream.keep_ch0:
        return _Ch0Stream(stream, G)
    return (_TokenStream if stream.axis == "token" else _ChannelStream)(stream, G)


class XCacheLayer(CacheLayerMixin):
    """One layer's streams, stored packed. Filled by the patched attention, never through `update`."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, codec: LayerCodec, G: int):
        super().__init__()
        self.codec, self.G = codec, G
        self.reset()

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("an XCache is filled by calq's patched attention (quantized_kv_cache), not by update()")

    def append(self, values: list[torch.Tensor], dtype) -> list[torch.Tensor]:
        for st, v in zip(self.stores, values, strict=True):
            st.append(v, dtype)
        self.length += values[0].shape[1]
        self.is_initialized = True
        return [st.read() for st in self.stores]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.stores = [_stream_store(s, self.G) for s in self.codec.streams]
        self.length = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("XCache does not support beam search")

    def nbytes(self) -> int:
        return sum(st.nbytes() for st in self.stores)


class XCache(Cache, _LayerOrder):
    """A transformers `Cache` holding each layer's streams as packed integer codes + fp16 scale/min per group
    (+ the fp16 window of per-channel streams, + the tokens' position ids, int64). At every step each layer
    rematerializes its K and V from all of them; XQuant-CL's accumulator is rebuilt along the layers of a step
    (a transient [B, T, d] buffer, not kept between steps)."""

    def __init__(self, runtime: KVRuntime):
        Cache.__init__(self, layers=[XCacheLayer(c, runtime.spec.group_size) for c in runtime.codecs])
        _LayerOrder.__init__(self)
        self.runtime = runtime
        self.positions: torch.Tensor | None = None
        self._rope = None

    def kv(self, codec: LayerCodec, X, position_embeddings, position_ids, rt):
        if codec.index == 0:
            self.next, self.acc = 0, None
            B, L = X.shape[:2]
            past = self.get_seq_length()
            pos = position_ids if position_ids is not None else torch.arange(past, past + L, device=X.device)[None]
            pos = pos.expand(B, L)
            self.positions = pos if self.positions is None else torch.cat([self.positions, pos], 1)
            self._rope = rt.rotary(X, self.positions)
        self.visit(codec.index)
        L = X.shape[1]
        values = codec.encode(X, self.acc[:, -L:] if codec.delta else None)
        hats = self.layers[codec.index].append(values, X.dtype)
        K, V, self.acc = codec.decode(hats, self.acc)
        return K, V, self._rope

    def nbytes(self) -> dict:
        """Bytes held: the streams (codes, scales/mins, fp16 windows) and the position ids."""
        streams = sum(layer.nbytes() for layer in self.layers)
        pos = 0 if self.positions is None else self.positions.nbytes
        return {"streams": streams, "positions": pos, "total": streams + pos}


def formula_bytes(runtime: KVRuntime, tokens: int, batch: int = 1) -> int:
    """Bytes the packed streams should hold after `tokens` tokens, by the size formula (`stream_bits_per_token`):
    per-channel streams count their unfilled group's tokens at 16 bits (the fp16 window); bits 16 streams are
    kept in the model's dtype."""
    G = runtime.spec.group_size
    item = runtime.attns[0].k_proj.weight.element_size()
    total = 0.0
    for c in runtime.codecs:
        for s in c.streams:
            if s.bits == OFF:
                total += 8 * item * s.width * tokens
            elif s.axis == "token":
                total += stream_bits_per_token(s, G) * tokens
            else:
                full = tokens // G * G
                total += stream_bits_per_token(s, G) * full + 16 * s.width * (tokens - full)
    return math.ceil(total / 8) * batch
