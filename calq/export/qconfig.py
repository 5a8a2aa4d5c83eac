"""A checkpoint's `quantization_config`, checked before anything reads it.

calq reads three kinds (formats.md §1, §2): compressed-tensors (`config_groups` of weight schemes, validated by
compressed-tensors' own QuantizationArgs), calq's own (`calq_modules`, possibly beside CT groups) and GPTQ
(`bits`, `group_size`). Any other kind, or a damaged one, is a ModelError naming the key.
"""

from __future__ import annotations

import re

from calq.errors import ModelError

KINDS = ("compressed-tensors", "calq", "gptq")
DAMAGED = "the checkpoint's config.json is damaged; write it again (calq compress, calq export)"


def check_quantization_config(q, where) -> dict:
    if not isinstance(q, dict):
        raise ModelError(f"{where}: quantization_config is a {type(q).__name__}, not a mapping", DAMAGED)
    method = q.get("quant_method")
    if method not in KINDS:
        raise ModelError(f"{where}: quant_method {method!r} is not one calq reads ({', '.join(KINDS)})",
                         "give a calq checkpoint or a dense model")
    if method == "gptq":
        _check_gptq(q, where)
    if method == "compressed-tensors" or q.get("config_groups") is not None:
        _check_groups(q.get("config_groups"), where)
    if method == "calq":
        _check_calq_modules(q.get("calq_modules"), where)
    _check_patterns(q.get("ignore") or [], "ignore", where)
    return q


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_gptq(q: dict, where) -> None:
    if not _is_int(q.get("bits")) or q["bits"] not in (2, 3, 4, 8):
        raise ModelError(f"{where}: GPTQ bits {q.get('bits')!r} has no known packing (2, 3, 4 or 8)", DAMAGED)
    gs = q.get("group_size", -1)
    if not _is_int(gs) or (gs != -1 and gs < 1):
        raise ModelError(f"{where}: GPTQ group_size {gs!r} is neither -1 nor positive", DAMAGED)


def _check_groups(groups, where) -> None:
    from compressed_tensors.quantization import QuantizationArgs
    from pydantic import ValidationError

    if not isinstance(groups, dict) or not groups:
        raise ModelError(f"{where}: quantization_config has no config_groups", DAMAGED)
    for name, g in groups.items():
        if not isinstance(g, dict) or not isinstance(g.get("targets"), list) or not isinstance(g.get("weights"), dict):
            raise ModelError(f"{where}: config_groups.{name} needs targets (a list) and weights (a mapping)", DAMAGED)
        _check_patterns(g["targets"], f"config_groups.{name}.targets", where)
        try:
            args = QuantizationArgs.model_validate(g["weights"])
        except ValidationError as e:
            err = e.errors()[0]
            raise ModelError(f"{where}: config_groups.{name}.weights.{'.'.join(map(str, err['loc']))}: "
                             f"{err['msg']}", DAMAGED) from None
        if args.type == "int" and not 2 <= args.num_bits <= 8:
            raise ModelError(f"{where}: config_groups.{name} has {args.num_bits}-bit integer weights; "
                             "pack-quantized holds 2 to 8", DAMAGED)


def _check_patterns(items, key: str, where) -> None:
    """Module names, class names or `re:` regexes, as compressed-tensors matches them."""
    if not isinstance(items, list):
        raise ModelError(f"{where}: quantization_config {key} is not a list", DAMAGED)
    for t in items:
        try:
            if t.startswith("re:"):
                re.compile(t[3:])
        except (AttributeError, re.error):
            raise ModelError(f"{where}: quantization_config {key} has {t!r}, not a name or re:regex", DAMAGED) from None


def _check_calq_modules(modules, where) -> None:
    from calq.methods import METHODS

    if not isinstance(modules, dict):
        raise ModelError(f"{where}: quant_method calq without calq_modules", DAMAGED)
    for name, meta in modules.items():
        ok = isinstance(meta, dict) and isinstance(meta.get("method"), str) and meta["method"] in METHODS
        tensors = meta.get("tensors") if ok else None
        ok = ok and isinstance(tensors, list) and tensors and all(isinstance(t, str) for t in tensors) \
            and _is_int(meta.get("n_weights")) and meta["n_weights"] > 0
        if not ok:
            raise ModelError(f"{where}: calq_modules.{name} needs a known method, a list of tensors and n_weights",
                             DAMAGED)
