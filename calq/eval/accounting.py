"""What a checkpoint costs per parameter, and which large weights no stage touched.

`bits_per_weight` counts only the modules a stage compressed; a mixture-of-experts model whose experts were left
in fp16 can show 4.26 there while the checkpoint is mostly fp16. Bits per parameter divide every stored byte by
every parameter (of the repeated blocks, and of the whole model), so that cannot hide.
"""

from __future__ import annotations

import re

UNTOUCHED_SHARE = 0.05      # a weight of at least this share of its block's parameters left as it was: a warning


def bits_per_parameter(sizes: dict[str, list], keys) -> float | None:
    keys = list(keys)
    n = sum(sizes[k][1] for k in keys)
    return 8 * sum(sizes[k][0] for k in keys) / n if n else None


def _pattern(key: str, prefix: str) -> tuple[str, int] | None:
    """(key with every index made `*`, its block index) for a key inside the blocks, else None."""
    m = re.match(rf"{re.escape(prefix)}\.(\d+)\.", key)
    return (re.sub(r"\.\d+\.", ".*.", key), int(m[1])) if m else None


def untouched(sizes: dict[str, list], prefix: str, touched: set[str] = frozenset(),
              share: float = UNTOUCHED_SHARE) -> list[dict]:
    """Weights of ≥ 2 dims inside the blocks that no stage replaced and that hold more than `share` of a block's
    parameters, grouped over blocks and experts (`model.layers.*.mlp.experts.*.w1.weight`)."""
    block_params: dict[int, int] = {}
    held: dict[str, dict[int, int]] = {}
    for k, (_, n, dims, done) in sizes.items():
        where = _pattern(k, prefix)
        if where is None:
            continue
        pattern, i = where
        block_params[i] = block_params.get(i, 0) + n
        if dims >= 2 and not done and k not in touched:
            held.setdefault(pattern, {})
            held[pattern][i] = held[pattern].get(i, 0) + n
    out = []
    for pattern, per_block in sorted(held.items()):
        worst = max(n / block_params[i] for i, n in per_block.items())
        if worst > share:
            out.append({"name": pattern, "blocks": len(per_block), "share": round(worst, 4),
                        "parameters": sum(per_block.values())})
    return out


def accounting(sizes: dict[str, list], prefix: str, touched: set[str] = frozenset()) -> dict:
    """The report's figures: bits per parameter (model, blocks), parameter counts and untouched weights."""
    blocks = [k for k in sizes if k.startswith(prefix + ".")]
    return {"bits_per_parameter": bits_per_parameter(sizes, sizes),
            "bits_per_parameter_blocks": bits_per_parameter(sizes, blocks),
            "parameters": sum(v[1] for v in sizes.values()),
            "block_parameters": sum(sizes[k][1] for k in blocks),
            "untouched_weights": untouched(sizes, prefix, touched)}
