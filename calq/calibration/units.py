"""Evaluation units: re-run the part of a block a Linear feeds, to score candidate weights (AdaDim §2b).

A Linear whose input is shared with siblings (q/k/v, gate/up) is scored on its parent module's output
(attention, MLP), fed the parent's own captured calibration inputs; any other Linear (o_proj, down_proj)
on its own output, which needs no forward at all: mean((X ΔWᵀ)²) = tr(ΔW H ΔWᵀ) / (2·OC) with H = 2/N XᵀX.
Found from the module tree and the shared inputs seen during calibration, not from module names.
In a distributed run each rank holds a share of the batches: the squared errors are summed over the ranks (fp64),
so every rank scores a candidate on the whole calibration set.
"""

from __future__ import annotations

import torch
from torch import nn

from calq.calibration.blocks import block_output, to_device
from calq.calibration.distributed import SOLO, Solo


class UnitInputs:
    """Captures (args, kwargs) of every parent of the target Linears during one calibration forward."""

    def __init__(self, block: nn.Module, block_prefix: str, targets: dict[str, nn.Linear], group: Solo = SOLO):
        self.prefix = block_prefix
        self.group = group
        self.parents: dict[str, nn.Module] = {}
        for name in targets:
            parent = name.rsplit(".", 1)[0]
            if parent != block_prefix:
                self.parents[parent] = block.get_submodule(parent[len(block_prefix) + 1:])
        self.inputs: dict[str, list] = {p: [] for p in self.parents}
        self._handles = []

    def __enter__(self):
        for pname, mod in self.parents.items():
            def hook(_m, args, kwargs, pname=pname):
                self.inputs[pname].append((to_device(args, "cpu"), to_device(kwargs, "cpu")))
            self._handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    @torch.no_grad()
    def errors_fn(self, name: str, mod: nn.Linear, shares_input: bool, H: torch.Tensor, device):
        """A function scoring candidate weights [OC, IC] by the mean squared error of this Linear's unit."""
        parent = name.rsplit(".", 1)[0]
        if not shares_input or parent not in self.parents:
            def linear_errors(candidates):
                W = mod.weight.data.float()
                errs = []
                for W_c in candidates:
                    dW = W - W_c.to(W.device)
                    errs.append(float(((dW @ H.to(W.device)) * dW).sum() / (2 * W.shape[0])))
                return errs
            return linear_errors

        unit, batches = self.parents[parent], self.inputs[parent]

        def run():
            return [block_output(unit(*to_device(a, device), **to_device(k, device))).float() for a, k in batches]

        def unit_errors(candidates):
            y_ref = run()                                      # with the current weights (earlier siblings done)
            original = mod.weight.data.clone()
            sums = []
            try:
                for W_c in candidates:
                    mod.weight.data.copy_(W_c.to(original.dtype))
                    y = run()
                    sums.append(sum(float(((a - b) ** 2).sum()) for a, b in zip(y, y_ref, strict=True)))
            finally:
                mod.weight.data.copy_(original)
            total = torch.tensor([*sums, sum(t.numel() for t in y_ref)], dtype=torch.float64)
            self.group.sum_([total])
            return [float(e) / float(total[-1]) for e in total[:-1]]
        return unit_errors
