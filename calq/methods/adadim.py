"""AdaDim (Heo et al., ICLR 2024): per Linear, keep the group layout, per-OC or per-IC, with the lower error.

Spec: shared/methods/adadim.md. Both layouts are tried with RTN; the error is measured on the Linear's
evaluation unit (attention for q/k/v, MLP for gate/up, the Linear itself for o/down), with earlier siblings
already compressed. A tie goes to oc. GPTQ then runs once, in the chosen layout. Per-IC needs OC % g == 0;
where it does not divide, oc is kept without a try.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from calq.methods.quantizer import QuantArgs, check_divides, quantize_rtn


def choose_layout(W: torch.Tensor, args: QuantArgs, unit_errors) -> tuple[str, dict]:
    """("oc" | "ic", info with both errors) for W [OC, IC]; `args.layout` is ignored."""
    oc, ic = replace(args, layout="oc"), replace(args, layout="ic")
    if check_divides(tuple(W.shape), ic) is not None:
        return "oc", {"choice": "oc", "reason": check_divides(tuple(W.shape), ic)}
    err_oc, err_ic = unit_errors([quantize_rtn(W, oc)[3], quantize_rtn(W, ic)[3]])
    choice = "ic" if err_ic < err_oc else "oc"
    return choice, {"choice": choice, "err_oc": err_oc, "err_ic": err_ic}
