"""Describe a calq checkpoint module by module, from its files alone (config + safetensors headers)."""

from __future__ import annotations

import re
from pathlib import Path

from calq.errors import CalqError, ModelError
from calq.export.qconfig import DAMAGED, check_quantization_config
from calq.files import open_safetensors, read_json

VLLM_NOTE = {"block": "no vLLM kernel for block (per-input-channel) INT weights; loads in transformers"}
ASYM_EXPERTS = "transformers' MoE loader reads no expert zero points; calq.load and vLLM do"


def _fused(group: dict) -> bool:
    """A config group of MoE experts (writer: a `re:` target naming them)."""
    return any(t.startswith("re:") and "experts" in t for t in group.get("targets", []))


def _group_of(name: str, groups: dict) -> tuple[str, dict]:
    for gname, g in groups.items():
        for t in g.get("targets", []):
            if t == name or (t.startswith("re:") and re.match(t[3:], name)) or t == "Linear":
                return gname, g
    raise ModelError(f"{name} is packed but no config group targets it", DAMAGED)


def inspect_checkpoint(path: str | Path) -> list[dict]:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CalqError(f"{path} is not a model directory (no config.json)", "give a calq output directory")
    qcfg = read_json(cfg_file).get("quantization_config")
    kv = _kv_row(path)
    if not qcfg:
        if kv:
            return [kv]
        raise CalqError(f"{path} holds a dense model (no quantization_config)", "give a calq output directory")
    check_quantization_config(qcfg, cfg_file)
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


def _weight_files(path: Path) -> list[Path]:
    """The model's safetensors files (not the KV cache's factors)."""
    from calq.export.kv_cache import KV_TENSORS

    return sorted(f for f in path.glob("*.safetensors") if f.name != KV_TENSORS)


def _weight_rows(path: Path, qcfg: dict) -> list[dict]:
    files = _weight_files(path)
    sizes: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    for f in files:
        with open_safetensors(f) as st:
            for k in st.keys():
                sl = st.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                sizes[k] = n * _itemsize(sl.get_dtype())
                if k.endswith(".weight_shape"):
                    shapes[k[: -len(".weight_shape")]] = st.get_tensor(k).tolist()
                    if len(shapes[k[: -len(".weight_shape")]]) != 2:
                        raise ModelError(f"{f}: {k} is not an [OC, IC] shape", DAMAGED)
                elif k.endswith(".qweight"):                     # GPTQ layout: [IC·bits/32, OC]
                    rows_, oc = sl.get_shape()
                    shapes[k[: -len(".qweight")]] = [oc, rows_ * 32 // qcfg.get("bits", 4)]
    report = path / "report.json"
    modules = read_json(report).get("modules", []) if report.is_file() else []
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "name" in m for m in modules):
        raise ModelError(f"{report}: modules is not a list of module records", DAMAGED)
    methods = {(m.get("info") or {}).get("checkpoint_name", m["name"]): m.get("method", "?") for m in modules}
    rows = []
    for name, meta in sorted((qcfg.get("calq_modules") or {}).items()):
        lost = [k for k in meta["tensors"] if f"{name}.{k}" not in sizes]
        if lost:
            raise ModelError(f"{path}: {name}.{lost[0]} is missing from the weights", DAMAGED)
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
    packed = {k.removesuffix(".weight_packed") for k in sizes if k.endswith(".weight_packed")}
    lost = sorted(f"{n}.{t}" for n in packed for t in ("weight_scale", "weight_shape") if f"{n}.{t}" not in sizes)
    if lost:
        raise ModelError(f"{path}: {lost[0]} is missing from the weights", DAMAGED)
    for name in sorted(shapes):
        _, g = _group_of(name, qcfg["config_groups"])
        w = g["weights"]
        nbytes = sum(v for k, v in sizes.items() if k.startswith(name + ".weight_"))
        oc, ic = shapes[name]
        strategy = w.get("strategy")
        group = (w.get("block_structure") or [None])[0] if strategy == "block" else \
            (w.get("group_size") if strategy == "group" else -1)
        rows.append({"name": name, "method": methods.get(name, "?"), "bits": w.get("num_bits", 8),
                     "layout": "ic" if strategy == "block" else "oc", "strategy": strategy, "group_size": group,
                     "symmetric": w.get("symmetric", True), "shape": [oc, ic], "bytes": nbytes,
                     "bits_per_weight": 8 * nbytes / (oc * ic),
                     "note": VLLM_NOTE.get(strategy, "")
                     or (ASYM_EXPERTS if _fused(g) and not w.get("symmetric", True) else "")})
    return rows


def _blocks_prefix(keys) -> str | None:
    """The repeated-block prefix (`model.layers`): the `X.N.` whose index N takes the most values."""
    seen: dict[str, set] = {}
    for k in keys:
        m = re.match(r"(.+?)\.(\d+)\.", k)
        if m:
            seen.setdefault(m[1], set()).add(m[2])
    return max(seen, key=lambda p: len(seen[p])) if seen else None


def checkpoint_summary(path: str | Path) -> dict:
    """Bits per parameter over every stored tensor, of the whole checkpoint and of its repeated blocks, from the
    files alone: a packed module counts the parameters of its weight_shape (GPTQ: of its qweight), a calq-format
    one its n_weights."""
    path = Path(path)
    qcfg = read_json(path / "config.json").get("quantization_config") or {}
    calq_modules = qcfg.get("calq_modules") or {}
    sizes: dict[str, list[int]] = {}          # key -> [bytes, parameters]
    for f in _weight_files(path):
        with open_safetensors(f) as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                n = 1
                for d in shape:
                    n *= d
                nbytes = n * _itemsize(st.get_slice(k).get_dtype())
                mod, _, suffix = k.rpartition(".")
                owner = next((m for m in calq_modules if k.startswith(m + ".")), None)
                if owner is not None:               # its n_weights on its first tensor
                    n = calq_modules[owner]["n_weights"] if k == f"{owner}.{calq_modules[owner]['tensors'][0]}" else 0
                elif suffix == "weight_shape":
                    n = int(st.get_tensor(k).prod())
                elif suffix == "qweight":
                    n = shape[1] * shape[0] * 32 // qcfg.get("bits", 4)
                elif suffix.startswith("weight_") or suffix in ("qzeros", "scales", "g_idx"):
                    n = 0
                sizes[k] = [nbytes, n]
    prefix = _blocks_prefix(sizes)
    blocks = [v for k, v in sizes.items() if prefix and k.startswith(prefix + ".")]

    def bpp(vals):
        n = sum(v[1] for v in vals)
        return 8 * sum(v[0] for v in vals) / n if n else None
    return {"blocks": f"{prefix}.*" if prefix else None, "bits_per_parameter_blocks": bpp(blocks),
            "block_parameters": sum(v[1] for v in blocks), "bits_per_parameter": bpp(sizes.values()),
            "parameters": sum(v[1] for v in sizes.values()), "bytes": sum(v[0] for v in sizes.values())}


def short_names(names: list[str], width: int) -> list[str]:
    """Names that fit `width` and still tell rows apart: the prefix they all share (`model.layers.`) dropped, then
    the longest non-index parts left of the last (`block_sparse_moe`) replaced by `…`, so the block index, the expert
    index and the projection stay: `model.layers.0.block_sparse_moe.experts.3.w1` -> `…0.….experts.3.w1`."""
    if not names or max(map(len, names)) <= width:
        return names
    common = names[0]
    for n in names[1:]:
        while not n.startswith(common):
            common = common[:-1]
    cut = common.rfind(".") + 1
    out = []
    for n in names:
        parts = n[cut:].split(".")
        while len(".".join(parts)) + bool(cut) > width:
            long = [i for i, p in enumerate(parts[:-1]) if not p.isdigit() and p != "…"]
            if not long:
                break
            parts[max(long, key=lambda i: len(parts[i]))] = "…"
        tail = ".".join(parts)
        tail = ("…" + tail if cut else tail)
        out.append(tail if len(tail) <= width else "…" + tail[-(width - 1):])
    return out


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1}.get(dtype, 4)
