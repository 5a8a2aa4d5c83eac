"""XQuant / XQuant-CL (arXiv 2508.10395) and the KV baselines: what is cached per layer, and its quantizer.

Every method here caches per layer one or two *streams* derived linearly from the attention block's post-norm
input X [B, T, d], and rematerializes the pre-RoPE K and V [B, T, d_kv] from the cached values
(spec: shared/methods/xquant.md):

  kivi       K (per-channel groups along tokens) and V (per-token)        K = K̂, V = V̂
  token      K and V, both per-token                                     K = K̂, V = V̂
  xquant     MHA: X per-token;  K = k_proj(X̂), V = v_proj(X̂)
             GQA (gqa: svd): XU_k per-channel, XU_v per-token;  K = X̂U_k·F_k + b_k, V likewise
  xquant-cl  MHA: layers up to the accumulator layer as xquant (acc := X̂ there), then Δ_i = X_i − acc per-token,
             acc ← acc + Δ̂_i, K/V = k_proj/v_proj(acc).  GQA: the same with the latent (X−acc)U_kv, acc ← acc + Δ̂U_kvᵀ.

The quantizer is asymmetric uniform, min and scale kept in fp16 per group of G values: along the channels of one
token ("token") or along G consecutive tokens of one channel ("channel"); a trailing partial group is its own group.
Bits 16 switches it off (the stream is kept as computed). The first `base_layers` layers use max(bits, base_bits)
(the paper's Table 4: three layers at 4 bits, for every method).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from calq.errors import CalqError
from calq.methods.registry import Method, StageConfig, register

KV_METHODS = ("xquant", "xquant-cl", "kivi", "token")
OFF = 16                                    # bits meaning "not quantized"
SVD_KEYS = ("U_k", "F_k", "U_v", "F_v", "U_kv")


# ---------------------------------------------------------------- what to cache

@dataclass(frozen=True)
class KVCacheSpec:
    """A cache method and its settings, from a recipe stage or `--kv-cache METHOD:BITS`."""

    method: str = "xquant"
    bits: int = 4
    group_size: int = 128
    base_layers: int = 3
    base_bits: int = 4
    layer_bits: tuple[int, ...] | None = None   # explicit bits per layer (overrides bits/base_*)
    gqa: str = "svd"                            # svd: latents XU_k, XU_v; x: cache X itself (g/2 × the KV bytes)
    keep_channel0_fp16: bool = False            # SVD latents: channel 0 (top singular direction) unquantized

    def __post_init__(self):
        if self.method not in KV_METHODS:
            raise CalqError(f"unknown KV cache method {self.method!r}", f"use one of {', '.join(KV_METHODS)}")
        for b in (self.bits, self.base_bits, *(self.layer_bits or ())):
            if not (2 <= b <= 8 or b == OFF):
                raise CalqError(f"KV cache bits {b} not supported", "use 2..8, or 16 for no quantization")
        if self.group_size < 2:
            raise CalqError(f"KV cache group size {self.group_size} too small", "use 128 (the paper's) or 32, 64")
        if self.base_layers < 0:
            raise CalqError(f"base layers {self.base_layers} < 0", "use 0 (none) or the paper's 3")
        if self.gqa not in ("svd", "x"):
            raise CalqError(f"gqa: {self.gqa!r} unknown", "use svd (latents) or x (cache X itself)")

    @classmethod
    def parse(cls, text: str, **kw) -> KVCacheSpec:
        """`METHOD:BITS`, e.g. `xquant-cl:3`."""
        method, _, bits = text.partition(":")
        if not bits.isdigit():
            raise CalqError(f"--kv-cache {text!r} is not METHOD:BITS",
                            f"e.g. xquant-cl:3 (methods: {', '.join(KV_METHODS)}; bits 2..8 or 16)")
        return cls(method=method, bits=int(bits), **kw)

    def bits_of(self, layer: int) -> int:
        if self.layer_bits is not None:
            return self.layer_bits[layer]
        return max(self.bits, self.base_bits) if layer < self.base_layers else self.bits

    @property
    def cross_layer(self) -> bool:
        return self.method == "xquant-cl"

    def acc_layer(self) -> int:
        """XQuant-CL: the layer whose reconstruction starts the accumulator (the last base layer, else 0)."""
        return max(self.base_layers, 1) - 1

    def label(self) -> str:
        return f"{self.method}:{self.bits}" + (f" (first {self.base_layers} layers at "
                                              f"{max(self.bits, self.base_bits)})" if self.base_layers and
                                              self.layer_bits is None and self.base_bits > self.bits else "")

    def to_json(self) -> dict:
        return {"method": self.method, "bits": self.bits, "group_size": self.group_size,
                "base_layers": self.base_layers, "base_bits": self.base_bits,
                "layer_bits": None if self.layer_bits is None else list(self.layer_bits), "gqa": self.gqa,
                "keep_channel0_fp16": self.keep_channel0_fp16}

    @classmethod
    def from_json(cls, d: dict) -> KVCacheSpec:
        lb = d.get("layer_bits")
        return cls(**{**d, "layer_bits": None if lb is None else tuple(lb)})


@dataclass(frozen=True)
class Stream:
    """One cached tensor of a layer: `width` values per token, grouped along `axis`."""

    name: str
    width: int
    bits: int
    axis: Literal["token", "channel"]
    keep_ch0: bool = False       # channel 0 stored fp16 apart, the quantizer sees channels 1..width-1


@dataclass
class LayerCodec:
    """What layer `index` caches (`streams`) and how K and V come back from it.

    kind: "kv" (K, V themselves), "x" (X), "svd" (XU_k, XU_v), "cl-x"/"cl-svd" (X or its latent at base layers,
    the delta to the accumulator after `acc_layer`). Tensors are fp32 and live on the module's device."""

    index: int
    kind: str
    streams: list[Stream]
    k_proj: torch.nn.Module
    v_proj: torch.nn.Module
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    acc_layer: int = -1          # CL: layers <= acc_layer cache X (or XU); acc_layer sets the accumulator

    @property
    def delta(self) -> bool:
        return self.kind.startswith("cl") and self.index > self.acc_layer

    def encode(self, X: torch.Tensor, acc: torch.Tensor | None) -> list[torch.Tensor]:
        """The streams' values of new tokens, fp32. X [B, L, d]; acc [B, L, d]: the accumulator of these tokens
        after the previous layer (CL delta layers only)."""
        X = X.float()
        f = self.factors
        if self.kind == "kv":
            return [self.k_proj(X.to(self.k_proj.weight.dtype)).float(),
                    self.v_proj(X.to(self.v_proj.weight.dtype)).float()]
        if self.kind == "x":
            return [X]
        if self.kind == "svd":
            return [X @ f["U_k"], X @ f["U_v"]]
        src = X - acc if self.delta else X
        return [src @ f["U_kv"]] if self.kind == "cl-svd" else [src]

    def decode(self, hats: list[torch.Tensor], acc: torch.Tensor | None):
        """(K, V, accumulator after this layer or None) from every cached token's dequantized streams [B, T, w]."""
        f = self.factors
        if self.kind == "kv":
            return hats[0], hats[1], None
        if self.kind == "svd":
            return hats[0] @ f["F_k"] + _bias(self.k_proj), hats[1] @ f["F_v"] + _bias(self.v_proj), None
        rec = hats[0] @ f["U_kv"].T if self.kind == "cl-svd" else hats[0]    # back in X's space [B, T, d]
        if self.delta:
            if acc is None:
                raise RuntimeError(f"layer {self.index}: XQuant-CL needs layer {self.index - 1}'s accumulator; "
                                   "the layers must run in order")
            rec = acc + rec
        K = self.k_proj(rec.to(self.k_proj.weight.dtype)).float()
        V = self.v_proj(rec.to(self.v_proj.weight.dtype)).float()
        keep = self.kind.startswith("cl") and self.index >= self.acc_layer
        return K, V, rec if keep else None


def _bias(linear) -> torch.Tensor | float:
    return 0.0 if linear.bias is None else linear.bias.float()


def svd_factors(Wk: torch.Tensor, Wv: torch.Tensor, cross_layer: bool) -> dict[str, torch.Tensor]:
    """Offline factors of one layer from HF weights [d_kv, d] (the paper's W = weightᵀ), computed in fp64.

    xquant: Wᵀ = U·S·Vh, cache XU, F = diag(S)·Vh [d_kv, d_kv] so that X·Wᵀ = (XU)·F exactly (rank ≤ d_kv).
    xquant-cl: U_kv = left singular vectors of [Wkᵀ | Wvᵀ] [d, 2·d_kv]; U_kvᵀU_kv = I, U_kvU_kvᵀ[Wkᵀ|Wvᵀ] = [Wkᵀ|Wvᵀ].
    """
    if cross_layer:
        U, _, _ = torch.linalg.svd(torch.cat([Wk, Wv]).double().T, full_matrices=False)
        return {"U_kv": U.float()}
    out = {}
    for name, W in (("k", Wk), ("v", Wv)):
        U, S, Vh = torch.linalg.svd(W.double().T, full_matrices=False)
        out[f"U_{name}"], out[f"F_{name}"] = U.float(), (S[:, None] * Vh).float()
    return out


def attention_dims(attn) -> tuple[int, int, int]:
    """(d, d_kv, head_dim) of a Llama-family attention module."""
    return attn.k_proj.in_features, attn.k_proj.out_features, attn.head_dim


def build_codecs(attns: list, spec: KVCacheSpec, factors: dict[int, dict] | None = None) -> list[LayerCodec]:
    """One codec per attention module (in layer order). factors: stored SVD factors per layer, else computed."""
    if spec.layer_bits is not None and len(spec.layer_bits) != len(attns):
        raise CalqError(f"layer_bits lists {len(spec.layer_bits)} layers, the model has {len(attns)}",
                        "give one bit width per layer, or use bits and base_layers")
    out = []
    for i, attn in enumerate(attns):
        d, d_kv, _ = attention_dims(attn)
        b = spec.bits_of(i)
        mha = d_kv == d
        use_x = mha or spec.gqa == "x"
        f = {}
        if not use_x and spec.method in ("xquant", "xquant-cl"):
            f = factors[i] if factors is not None else svd_factors(attn.k_proj.weight.detach(),
                                                                   attn.v_proj.weight.detach(), spec.cross_layer)
            dev = attn.k_proj.weight.device
            f = {k: v.to(dev, torch.float32) for k, v in f.items()}
        ch0 = spec.keep_channel0_fp16 and not use_x
        if spec.method in ("kivi", "token"):
            kind, streams = "kv", [Stream("k", d_kv, b, "channel" if spec.method == "kivi" else "token"),
                                   Stream("v", d_kv, b, "token")]
        elif spec.method == "xquant":
            kind = "x" if use_x else "svd"
            streams = [Stream("x", d, b, "token")] if use_x else \
                [Stream("xu_k", d_kv, b, "channel", ch0), Stream("xu_v", d_kv, b, "token", ch0)]
        else:
            kind = "cl-x" if use_x else "cl-svd"
            streams = [Stream("dx" if i > spec.acc_layer() else "x", d if use_x else 2 * d_kv, b, "token", ch0)]
        out.append(LayerCodec(i, kind, streams, attn.k_proj, attn.v_proj, f, spec.acc_layer()))
    return out


# ---------------------------------------------------------------- the quantizer

def _groups(x: torch.Tensor, G: int, axis: str) -> tuple[torch.Tensor, int]:
    """x [B, T, w] -> [B, n, ·, G] groups (token axis: [B, T, ceil(w/G), G]; channel: [B, ceil(T/G), w, G])
    padded by repeating the last element (min and max unchanged); returns it and the padding."""
    if axis == "channel":
        x = x.transpose(1, 2)                          # [B, w, T]
    n = x.shape[-1]
    pad = (-n) % G
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], -1)
    x = x.reshape(*x.shape[:-1], -1, G)                 # [B, ·, ngroups, G]
    if axis == "channel":
        x = x.transpose(1, 2)                          # [B, ngroups, w, G]
    return x, pad


def _ungroup(g: torch.Tensor, pad: int, axis: str) -> torch.Tensor:
    if axis == "channel":
        g = g.transpose(1, 2)
    x = g.reshape(*g.shape[:-2], -1)
    if pad:
        x = x[..., :-pad]
    return x.transpose(1, 2) if axis == "channel" else x


def quantize_groups(x: torch.Tensor, bits: int, G: int, axis: str):
    """Asymmetric uniform quantization of x [B, T, w] in groups of G along `axis` (spec: "Quantizer").

    Returns (codes uint8 in group layout [B, n, ·, G], scale and min fp16 [B, n, ·], padding). Scale and min are
    rounded to fp16 before the codes are computed, so dequantizing what is stored gives exactly the fake-quant."""
    g, pad = _groups(x.float(), G, axis)
    mn, mx = g.amin(-1), g.amax(-1)
    levels = 2 ** bits - 1
    scale = ((mx - mn) / levels).half()
    mn16 = mn.half()
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))                     # a constant group codes as 0
    q = torch.round((g - mn16.float()[..., None]) / s[..., None]).clamp_(0, levels).to(torch.uint8)
    return q, scale, mn16, pad


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, pad: int, axis: str) -> torch.Tensor:
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    return _ungroup(q.float() * s[..., None] + mn.float()[..., None], pad, axis)


def fake_quantize(x: torch.Tensor, stream: Stream, G: int) -> torch.Tensor:
    """What the cache gives back for x [B, T, w] fp32: quantized, then dequantized (bits 16: x itself)."""
    if stream.bits == OFF:
        return x
    if stream.keep_ch0:
        return torch.cat([x[..., :1].half().float(), fake_quantize(x[..., 1:], _no_ch0(stream), G)], -1)
    q, scale, mn, pad = quantize_groups(x, stream.bits, G, stream.axis)
    return dequantize_groups(q, scale, mn, pad, stream.axis)


def _no_ch0(stream: Stream) -> Stream:
    return Stream(stream.name, stream.width - 1, stream.bits, stream.axis)


# ---------------------------------------------------------------- bit packing

def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [..., n] (uint8 < 2**bits) -> bytes [..., ceil(n/8)·bits]: every 8 codes fill `bits` bytes."""
    n = q.shape[-1]
    pad = (-n) % 8
    if pad:
        q = torch.cat([q, q.new_zeros(*q.shape[:-1], pad)], -1)
    q = q.reshape(*q.shape[:-1], -1, 8).long()
    word = (q << (torch.arange(8, device=q.device) * bits)).sum(-1)             # [..., n/8] ≤ 64 bits
    out = (word[..., None] >> (torch.arange(bits, device=q.device) * 8)) & 0xFF   # [..., n/8, bits]
    return out.to(torch.uint8).reshape(*q.shape[:-2], -1)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    p = packed.reshape(*packed.shape[:-1], -1, bits).long()
    word = (p << (torch.arange(bits, device=p.device) * 8)).sum(-1)
    q = (word[..., None] >> (torch.arange(8, device=p.device) * bits)) & (2 ** bits - 1)
    return q.to(torch.uint8).reshape(*p.shape[:-2], -1)[..., :n]


# ---------------------------------------------------------------- sizes

def stream_bits_per_token(stream: Stream, G: int) -> float:
    """Stored bits per token of a fully grouped stream: codes, fp16 scale+min per group, fp16 channel 0.
    Per-token: ceil(w/G) groups per token; per-channel: w groups per G tokens. Codes are packed 8 to `bits` bytes
    per token row (per-token) or per block of G tokens (per-channel): b·w bits when 8 divides w (or w·G)."""
    w = stream.width - stream.keep_ch0
    extra = 16 * stream.keep_ch0
    if stream.bits == OFF:
        return 16 * stream.width
    if stream.axis == "token":
        return 8 * stream.bits * math.ceil(w / 8) + 32 * math.ceil(w / G) + extra
    return (8 * stream.bits * math.ceil(w * G / 8) + 32 * w) / G + extra


def cache_bits_per_token(codecs: list[LayerCodec], G: int) -> float:
    return sum(stream_bits_per_token(s, G) for c in codecs for s in c.streams)


def fp16_kv_bits_per_token(attns: list) -> int:
    return sum(2 * 16 * attention_dims(a)[1] for a in attns)


def size_summary(codecs: list[LayerCodec], attns: list, spec: KVCacheSpec) -> dict:
    """What the report, inspect and `evaluate --json` say about a cache: bits per cached element, ratio to fp16."""
    G = spec.group_size
    bits = cache_bits_per_token(codecs, G)
    elements = sum(s.width for c in codecs for s in c.streams)
    return {"method": spec.method, "label": spec.label(), "bits": spec.bits, "group_size": G,
            "layer_bits": [spec.bits_of(c.index) for c in codecs],
            "streams": sorted({f"{s.name} per-{s.axis}" for c in codecs for s in c.streams}),
            "bits_per_element": bits / elements,
            "kv_cache_ratio": bits / fp16_kv_bits_per_token(attns),
            "kv_cache_ratio_nominal": (sum((16 if s.bits == OFF else s.bits + 32 / G) * s.width
                                           for c in codecs for s in c.streams) / fp16_kv_bits_per_token(attns))}


# ---------------------------------------------------------------- the recipe stage

class XQuantConfig(StageConfig):
    """`method: xquant`: a KV-cache stage. It changes no weight; the checkpoint gets kv_cache.json (+ factors)."""

    targets: list[str] = Field(default_factory=lambda: ["self_attn"])
    bits: int = 3
    group_size: int = Field(128, ge=2)
    cross_layer: bool = False
    base_layers: int = Field(3, ge=0)
    base_bits: int = 4
    layer_bits: list[int] | None = None
    gqa: Literal["svd", "x"] = "svd"
    keep_channel0_fp16: bool = False

    @field_validator("bits", "base_bits")
    @classmethod
    def _bits(cls, v):
        if not (2 <= v <= 8 or v == OFF):
            raise ValueError("must be 2..8, or 16 for no quantization")
        return v

    @model_validator(mode="after")
    def _layer_bits(self):
        for b in self.layer_bits or []:
            self._bits(b)
        return self

    def spec(self) -> KVCacheSpec:
        return KVCacheSpec("xquant-cl" if self.cross_layer else "xquant", self.bits, self.group_size,
                           self.base_layers, self.base_bits,
                           None if self.layer_bits is None else tuple(self.layer_bits), self.gqa,
                           self.keep_channel0_fp16)


@register("xquant")
class XQuant(Method):
    """A cache stage (scope "cache"): the engine's block loop skips it; `compress` computes its factors from the
    final weights after every weight stage and writes them with the cache configuration (kv_cache.json)."""

    Config = XQuantConfig
    scope = "cache"

    @property
    def data_free(self) -> bool:
        return True
