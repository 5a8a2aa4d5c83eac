"""Describe a calq checkpoint module by module, from its files alone (config + safetensors headers)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors import safe_open

from calq.errors import CalqError

VLLM_NOTE = {"block": "no vLLM kernel for block (per-input-channel) INT weights; loads in transformers"}


def _group_of(name: str, groups: dict) -> tuple[str, dict]:
    for gname, g in groups.items():
        for t in g.get("targets", []):
            if t == name or (t.startswith("re:") and re.match(t[3:], name)) or t == "Linear":
                return gname, g
    raise CalqError(f"{name} is packed but no config group targets it", "the checkpoint's config.json is damaged")


def inspect_checkpoint(path: str | Path) -> list[dict]:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CalqError(f"{path} is not a model directory (no config.json)", "give a calq output directory")
    qcfg = json.loads(cfg_file.read_text()).get("quantization_config")
    kv = _kv_row(path)
    if not qcfg:
        if kv:
            return [kv]
        raise CalqError(f"{path} holds a dense model (no quantization_config)", "give a calq output directory")
    rows = _weight_rows(path, qcfg)
    return rows + ([kv] if kv else [])


def _kv_row(path: Path) -> dict | None:
    """The checkpoint's KV-cache method (kv_cache.json) as one row: bits per cached element, size vs fp16 KV."""
    from calq.export.kv_cache import read_kv_json

    data = read_kv_json(path)
    if data is None:
        return None
    sm = data["summary"]
    return {"name": "kv_cache", "method": sm["method"], "bits": sm["label"].split(":", 1)[1],
            "layout": ", ".join(sm["streams"]), "strategy": "kv_cache", "group_size": sm["group_size"],
            "symmetric": False, "shape": None, "bytes": data["factor_bytes"],
            "bits_per_weight": sm["bits_per_element"], "kv_cache_ratio": sm["kv_cache_ratio"],
            "note": f"KV cache {sm['kv_cache_ratio']:.3f}× fp16 KV; bits/weight = bits per cached element; "
                    "bytes = stored factors"}


def _weight_rows(path: Path, qcfg: dict) -> list[dict]:
    files = sorted(path.glob("*.safetensors"))
    sizes: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    for f in files:
        with safe_open(f, "pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                sizes[k] = n * _itemsize(sl.get_dtype())
                if k.endswith(".weight_shape"):
                    shapes[k[: -len(".weight_shape")]] = st.get_tensor(k).tolist()
                elif k.endswith(".qweight"):                     # GPTQ layout: [IC·bits/32, OC]
                    rows_, oc = sl.get_shape()
                    shapes[k[: -len(".qweight")]] = [oc, rows_ * 32 // qcfg.get("bits", 4)]
    report = path / "report.json"
    methods = {m["name"]: m["method"] for m in json.loads(report.read_text())["modules"]} if report.is_file() else {}
    rows = []
    for name, meta in sorted((qcfg.get("calq_modules") or {}).items()):
        nbytes = sum(sizes[f"{name}.{k}"] for k in meta["tensors"])
        rows.append({"name": name, "method": meta["method"], "bits": meta.get("bits", "-"),
                     "layout": meta.get("layout", meta["method"]), "strategy": "calq", "group_size": None,
                     "symmetric": None, "shape": meta.get("shape"), "bytes": nbytes,
                     "bits_per_weight": 8 * nbytes / meta["n_weights"], "note": "calq format (calq.load)"})
    if qcfg.get("quant_method") == "gptq":
        fmt = qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq"
        for name in sorted(shapes):
            oc, ic = shapes[name]
            nbytes = sum(sizes.get(f"{name}.{k}", 0) for k in ("qweight", "qzeros", "scales", "g_idx"))
            rows.append({"name": name, "method": methods.get(name, "?"), "bits": qcfg["bits"], "layout": "oc",
                         "strategy": "gptq", "group_size": qcfg.get("group_size", -1), "symmetric": qcfg.get("sym"),
                         "shape": [oc, ic], "bytes": nbytes, "bits_per_weight": 8 * nbytes / (oc * ic),
                         "note": f"GPTQ layout ({fmt})"})
        return rows
    for name in sorted(shapes):
        _, g = _group_of(name, qcfg["config_groups"])
        w = g["weights"]
        nbytes = sum(v for k, v in sizes.items() if k.startswith(name + ".weight_"))
        oc, ic = shapes[name]
        strategy = w["strategy"]
        group = (w.get("block_structure") or [None])[0] if strategy == "block" else \
            (w.get("group_size") if strategy == "group" else -1)
        rows.append({"name": name, "method": methods.get(name, "?"), "bits": w["num_bits"],
                     "layout": "ic" if strategy == "block" else "oc", "strategy": strategy, "group_size": group,
                     "symmetric": w["symmetric"], "shape": [oc, ic], "bytes": nbytes,
                     "bits_per_weight": 8 * nbytes / (oc * ic), "note": VLLM_NOTE.get(strategy, "")})
    return rows


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1}.get(dtype, 4)
