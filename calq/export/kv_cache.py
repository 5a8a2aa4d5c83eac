"""A checkpoint's KV-cache method: `kv_cache.json` (the configuration and its sizes) and, where the method has
offline factors (XQuant's SVD latents for GQA models), `kv_cache.safetensors` (fp32, `layers.{i}.{U_k|F_k|...}`).

Separate files, not config.json: the weights stay loadable by transformers and vLLM as they are, and
compressed-tensors' own `kv_cache_scheme` (vLLM's fp8 cache) keeps its meaning. The factors were computed from the
checkpoint's own weights (after every weight stage); `read_kv_cache` returns them and `check_factors`
refuses factors that no longer reproduce the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from calq.errors import CalqError
from calq.methods.xquant import KVCacheSpec, LayerCodec

KV_JSON = "kv_cache.json"
KV_TENSORS = "kv_cache.safetensors"


def write_kv_cache(out_dir: Path, spec: KVCacheSpec, codecs: list[LayerCodec], summary: dict) -> int:
    """Write the files; returns the bytes of the stored factors."""
    tensors = {f"layers.{c.index}.{k}": v.detach().float().cpu().contiguous()
               for c in codecs for k, v in c.factors.items()}
    if tensors:
        save_file(tensors, str(out_dir / KV_TENSORS), metadata={"format": "pt"})
    nbytes = sum(t.nbytes for t in tensors.values())
    (out_dir / KV_JSON).write_text(json.dumps({"spec": spec.to_json(), "summary": summary,
                                               "factor_bytes": nbytes, "tensors": sorted(tensors)}, indent=2) + "\n")
    return nbytes


def read_kv_json(path: Path) -> dict | None:
    f = Path(path) / KV_JSON
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CalqError(f"{f} is not valid JSON ({e.msg})", "rewrite the checkpoint with calq compress") from None


def read_kv_cache(path: Path) -> tuple[KVCacheSpec, dict[int, dict] | None] | None:
    """(spec, factors per layer or None) of a checkpoint, or None if it has no cache method."""
    data = read_kv_json(path)
    if data is None:
        return None
    spec = KVCacheSpec.from_json(data["spec"])
    if not data.get("tensors"):
        return spec, None
    factors: dict[int, dict] = {}
    with safe_open(Path(path) / KV_TENSORS, "pt") as st:
        for key in data["tensors"]:
            _, i, name = key.split(".")
            factors.setdefault(int(i), {})[name] = st.get_tensor(key)
    return spec, factors


def check_factors(codecs: list[LayerCodec], tol: float = 1e-3) -> None:
    """Stored factors must give back the layer's k/v weights (they are derived from them)."""
    for c in codecs:
        f = c.factors
        Wk, Wv = c.k_proj.weight.detach().float().T, c.v_proj.weight.detach().float().T    # [d, d_kv]
        if "U_kv" in f:
            W = torch.cat([Wk, Wv], 1)
            err = (f["U_kv"] @ (f["U_kv"].T @ W) - W).norm() / W.norm()
        elif "U_k" in f:
            err = max((f["U_k"] @ f["F_k"] - Wk).norm() / Wk.norm(), (f["U_v"] @ f["F_v"] - Wv).norm() / Wv.norm())
        else:
            continue
        if err > tol:
            raise CalqError(f"{KV_TENSORS}: layer {c.index}'s factors do not reproduce its k/v weights "
                            f"(relative error {float(err):.2e})", f"delete {KV_JSON} and {KV_TENSORS}, or recompress")
