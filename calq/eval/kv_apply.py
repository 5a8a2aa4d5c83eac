"""A quantized KV cache around a model's scoring, and a cache stage's factors written next to its checkpoint."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from calq.methods.xquant import KVCacheSpec


def write_cache_stage(model, spec: KVCacheSpec, out_dir: Path) -> dict:
    """kv_cache.json (+ kv_cache.safetensors) for a cache stage; the report's record of it."""
    from calq.eval.kv_cache import KVRuntime
    from calq.export.kv_cache import KV_JSON, KV_TENSORS, write_kv_cache

    rt = KVRuntime(model, spec)
    summary = rt.summary()
    factor_bytes = write_kv_cache(out_dir, spec, rt.codecs, summary)
    files = sum((out_dir / f).stat().st_size for f in (KV_JSON, KV_TENSORS) if (out_dir / f).is_file())
    return {**summary, "factor_bytes": factor_bytes, "file_bytes": files}


@contextmanager
def kv_cache_applied(model, spec: KVCacheSpec | None, factors: dict | None = None):
    """Within the block, `model` reads K and V from `spec`'s quantized cache (nothing changes when spec is None).
    Yields the cache's size summary (or None)."""
    if spec is None:
        yield None
        return
    from calq.eval.kv_cache import KVRuntime
    from calq.export.kv_cache import check_factors

    rt = KVRuntime(model, spec, factors)
    if factors is not None:
        check_factors(rt.codecs)
    rt.install()
    try:
        yield rt.summary()
    finally:
        rt.remove()


def checkpoint_cache(model, path: Path):
    """kv_cache_applied with the cache a checkpoint folder stores (none: nothing changes)."""
    from calq.export.kv_cache import read_kv_cache

    stored = read_kv_cache(path)
    return kv_cache_applied(model, *(stored or (None, None)))
