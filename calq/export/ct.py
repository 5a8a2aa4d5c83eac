"""Compressed records <-> compressed-tensors `pack-quantized` tensors and config (formats.md §1).

Layout mapping (formats.md §1.5): "oc" with g > 0 -> strategy `group` (scale [OC, G]); g = -1 -> `channel`
(scale [OC, 1]); "ic" -> `block` with block_structure [g, 1] (scale [OC/g, IC]). Codes are packed along the
input dim by compressed-tensors' own `pack_to_int32`, so 3/5/6/7-bit use its dense layout (§1.3).
"""

from __future__ import annotations

import json
import re

import compressed_tensors
import torch
from compressed_tensors.compressors.pack_quantized import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import dequantize

from calq.methods.base import Compressed

FORMAT = "pack-quantized"
# compressed-tensors packs zero points only for these strategies; `block` keeps them unpacked int8.
_PACKED_ZP = ("group", "channel")
# Keys llm-compressor writes for every weight scheme (formats.md §1.1); CT 0.20 drops the null ones on dump.
_WEIGHT_DEFAULTS = {"block_structure": None, "actorder": None, "observer": "memoryless_minmax",
                    "observer_kwargs": {}, "scale_dtype": None, "zp_dtype": None}


def weight_scheme(rec: Compressed) -> dict:
    """The config group `weights` dict describing how rec is stored."""
    OC = rec.codes.shape[0]
    if not 2 <= rec.bits <= 8:
        raise ValueError(f"{rec.name}: {rec.bits}-bit weights have no pack-quantized encoding (2..8 bits)")
    w = {"num_bits": rec.bits, "type": "int", "symmetric": rec.symmetric, "dynamic": False}
    if rec.layout == "ic":
        g = OC if rec.group_size == -1 else rec.group_size
        w |= {"strategy": "block", "group_size": None, "block_structure": [g, 1]}
    elif rec.layout == "oc" and rec.group_size == -1:
        w |= {"strategy": "channel", "group_size": -1}
    elif rec.layout == "oc":
        w |= {"strategy": "group", "group_size": rec.group_size}
    else:
        raise ValueError(f"{rec.name}: unknown layout {rec.layout!r}")
    return {**_WEIGHT_DEFAULTS, **w}


def _args(scheme: dict) -> QuantizationArgs:
    # Nulls left out: an explicit zp_dtype=None would be dumped as the inferred "torch.int8".
    return QuantizationArgs.model_validate({k: v for k, v in scheme.items() if v is not None})


def ct_tensors(rec: Compressed, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors stored for one module, keyed relative to it (`weight_packed`, `weight_scale`, ...)."""
    scheme = weight_scheme(rec)
    OC, IC = rec.codes.shape
    out = {
        "weight_packed": pack_to_int32(rec.codes.to(torch.int8), rec.bits),  # [OC, ceil(IC*b/32)]
        "weight_scale": rec.scale.to(dtype).contiguous(),   # group [OC, G]; channel [OC, 1]; block [OC/g, IC]
        "weight_shape": torch.tensor([OC, IC], dtype=torch.int64),
    }
    if not rec.symmetric:
        zero = rec.zero.to(torch.int8)
        if scheme["strategy"] in _PACKED_ZP:
            zero = pack_to_int32(zero, rec.bits, packed_dim=0)  # [ceil(OC*b/32), G]
        out["weight_zero_point"] = zero.contiguous()
    return out


def ct_dequantize(tensors: dict[str, torch.Tensor], scheme: dict) -> torch.Tensor:
    """fp32 [OC, IC] weight of one module from its CT tensors and its config group's `weights` dict."""
    args = _args(scheme)
    shape = torch.Size(tensors["weight_shape"].tolist())
    q = unpack_from_int32(tensors["weight_packed"], args.num_bits, shape)
    # fp32 scale: the product (q - zero) * scale is then exactly what the quantizer computed.
    scale = tensors["weight_scale"].float()
    zero = tensors.get("weight_zero_point")
    if not args.symmetric:
        if zero is None:
            raise ValueError("asymmetric scheme but no weight_zero_point tensor")
        if args.strategy in _PACKED_ZP:
            zero = _unpack_zero(zero, args.num_bits, torch.Size([shape[0], scale.shape[-1]]))
    return dequantize(q, scale, zero, args=args, dtype=torch.float32)


def _unpack_zero(packed: torch.Tensor, bits: int, shape: torch.Size) -> torch.Tensor:
    """Zero points [OC, G] from their along-OC packing [ceil(OC*b/32), G]."""
    # Unpacked as rows of the transpose: CT 0.20's packed_dim=0 path fails on a single packed row
    # (4-bit, OC <= 8) because its transposed view keeps a non-unit last stride.
    rows = torch.empty_like(packed.t(), memory_format=torch.contiguous_format).copy_(packed.t())  # [G, R]
    return unpack_from_int32(rows, bits, torch.Size([shape[1], shape[0]])).t()


def expert_targets(names: list[str], others: set[str]) -> list[str]:
    """`re:` targets matching the expert projections `names` (`{experts}.{e}.{proj}`) and none of `others`.

    Loaders find an MoE layer's scheme by a name they make up: transformers takes the group whose `re:` target
    mentions "experts", vLLM matches `{experts}.0.gate_proj` whatever the checkpoint calls the projection (w1).
    So the most general form that still excludes the other names: any block index, any expert and projection."""
    prefixes = sorted({n.rsplit(".", 2)[0] for n in names})
    forms = [sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(p)) for p in prefixes}),
             [re.escape(p) for p in prefixes]]
    for alts in forms:
        target = rf"^(?:{'|'.join(alts)})\.\d+\.[^.]+$"
        if all(re.match(target, n) for n in names) and not any(re.match(target, n) for n in others):
            return [f"re:{target}"]
    return [f"re:^{re.escape(n)}$" for n in names]


def ct_quantization_config(records: list[Compressed], ignore: list[str], experts: set[str] = frozenset()) -> dict:
    """`quantization_config` for config.json: one config group per distinct weight scheme (formats.md §1.1), the
    expert projections among the records (`experts`, checkpoint names) in groups of their own."""
    groups: dict[str, tuple[dict, list[str]]] = {}
    for rec in records:
        w = weight_scheme(rec)
        key = json.dumps(w, sort_keys=True) + (" experts" if rec.name in experts else "")
        groups.setdefault(key, (w, []))[1].append(rec.name)
    everyone = {r.name for r in records} | set(experts)
    targets = [expert_targets(names, everyone - set(names)) if key.endswith(" experts") else names
               for key, (_, names) in groups.items()]
    config = QuantizationConfig(
        config_groups={
            f"group_{i}": QuantizationScheme(targets=t, weights=_args(w), format=FORMAT)
            for i, ((w, _), t) in enumerate(zip(groups.values(), targets, strict=True))
        },
        format=FORMAT,
        quantization_status="compressed",
        ignore=list(ignore),
    ).model_dump(mode="json")
    for i, (w, _) in enumerate(groups.values()):
        dumped = config["config_groups"][f"group_{i}"]["weights"]
        config["config_groups"][f"group_{i}"]["weights"] = {**w, **dumped}
    return {**config, "version": compressed_tensors.__version__, "sparsity_config": {}, "transform_config": {}}
