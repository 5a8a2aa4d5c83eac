"""Fused experts as per-expert Linears while the engine works on a block.

For as long as a block is calibrated and compressed, each fused experts module (transformers 5's experts
contract: `gate_up_proj` or `up_proj`, and `down_proj`, each [E, ·, ·], with `_apply_gate`/`act_fn`) gets one
child per expert whose Linears are views of the fused parameters' rows, so what a method installs lands in the
fused parameter without a copy, and a forward that sends each expert the tokens the router gave it. Every expert
projection is then an ordinary target with its own statistics hook on its own tokens. Names and row ranges come
from `experts.CheckpointNames`. With `calibrate_all_experts` every token goes through every expert for the
statistics while the block's output still follows the router (llm-compressor's behaviour).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from calq.calibration.experts import CheckpointNames, FusedParam


@dataclass
class MoESettings:
    names: CheckpointNames
    calibrate_all_experts: bool = False
    min_tokens: int = 128           # fewer routed tokens: the expert's Hessian gets `dampening_frac` more damping
    dampening_frac: float = 0.1     # of mean diag(H), added to H; no token at all: the method's data-free fallback
    experts_per_pass: int | None = None     # experts whose Hessians one calibration forward gathers (None: all)


def _view(P: torch.Tensor, e: int, start: int, stop: int) -> nn.Linear:
    lin = nn.Linear(P.shape[2], stop - start, bias=False, device="meta")
    lin.weight = nn.Parameter(P.data[e, start:stop], requires_grad=False)    # shares P's storage
    return lin


class _Expert(nn.Module):
    """Expert e of a fused experts module: x -> down(gate(up(x))), each projection a Linear view."""

    def __init__(self, experts: nn.Module, e: int, up: FusedParam, down: FusedParam):
        super().__init__()
        self.up_parts = [p.proj for p in up.parts]
        self.down_parts = [p.proj for p in down.parts]
        for fp, parts in ((up, up.parts), (down, down.parts)):
            for p in parts:
                self.add_module(p.proj, _view(getattr(experts, fp.param), e, p.start, p.stop))
        # the experts module's own gating (bound methods are not submodules, so no cycle in the tree)
        self._gate = experts._apply_gate if experts.has_gate else experts.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._gate(torch.cat([self._modules[p](x) for p in self.up_parts], -1))
        return torch.cat([self._modules[p](h) for p in self.down_parts], -1)


def _routed_forward(experts, units, all_experts: bool, counts: torch.Tensor, hidden_states, top_k_index,
                    top_k_weights):
    """The experts contract's forward, through the per-expert units."""
    out = torch.zeros_like(hidden_states)
    for e, unit in enumerate(units):
        tok, pos = torch.where(top_k_index == e)
        counts[e] += tok.numel()
        if all_experts:
            y = unit(hidden_states)[tok]        # every token feeds the statistics; only routed ones the output
        elif tok.numel():
            y = unit(hidden_states[tok])
        else:
            continue
        if getattr(experts, "has_post_expert_norm", False):
            y = experts.post_expert_norm(y)
        out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
    return out


def _contract(mod: nn.Module, path: str, names: CheckpointNames) -> tuple[FusedParam, FusedParam] | str:
    """The (up, down) fused parameters of an experts module calq can route, or why it cannot."""
    if getattr(mod, "has_gate", None) is None or not hasattr(mod, "act_fn"):
        return "its forward does not follow transformers' experts contract (has_gate, act_fn, _apply_gate)"
    if getattr(mod, "has_bias", False) or getattr(mod, "is_transposed", False):
        return "experts with biases or transposed weights are not supported yet"
    up, down = names.fused.get(f"{path}.{'gate_up_proj' if mod.has_gate else 'up_proj'}"), \
        names.fused.get(f"{path}.down_proj")
    if up is None or down is None:
        return "its checkpoint form is not one tensor per expert and projection"
    return up, down


def fused_modules(block: nn.Module, prefix: str, names: CheckpointNames):
    """([(path, module, up, down)] calq routes, {path: reason} of fused experts it leaves as they are)."""
    ok, left = [], {}
    for name, mod in block.named_modules():
        path = f"{prefix}.{name}" if name else prefix
        own = [f"{path}.{n}" for n, p in mod.named_parameters(recurse=False) if p.dim() == 3]
        if not any(k in names.fused or k in names.unsupported for k in own):
            continue
        reason = next((names.unsupported[k] for k in own if k in names.unsupported), None) or \
            _contract(mod, path, names)
        if isinstance(reason, str):
            left[path] = reason
        else:
            ok.append((path, mod, *reason))
    return ok, left


def expert_shapes(block: nn.Module, prefix: str, names: CheckpointNames | None) -> dict[str, nn.Linear]:
    """Meta-device Linears standing for the expert projections calq routes in this block (recipe checks)."""
    if names is None:
        return {}
    out = {}
    for _, _, up, down in fused_modules(block, prefix, names)[0]:
        for fp in (up, down):
            for name, _, p in fp.names():
                out[name] = nn.Linear(fp.shape[2], p.stop - p.start, bias=False, device="meta")
    return out


@dataclass
class Unfused:
    """What `unfused` did to a block: the routed modules, their expert Linears, and tokens routed per expert."""

    experts: dict[str, str] = field(default_factory=dict)        # expert Linear name -> its experts module
    left: dict[str, str] = field(default_factory=dict)           # fused experts left as they are -> why
    counts: dict[str, torch.Tensor] = field(default_factory=dict)

    def take_counts(self) -> dict[str, list[int]]:
        out = {k: v.tolist() for k, v in self.counts.items()}
        for v in self.counts.values():
            v.zero_()
        return out


@contextmanager
def unfused(block: nn.Module, prefix: str, settings: MoESettings | None):
    """Per-expert Linears in the fused experts modules of `block` (on its device), removed on exit."""
    state = Unfused()
    routed = []
    if settings is not None:
        found, state.left = fused_modules(block, prefix, settings.names)
        for path, mod, up, down in found:
            units = [_Expert(mod, e, up, down) for e in range(up.shape[0])]
            for e, unit in enumerate(units):
                mod._modules[str(e)] = unit
                for p in unit.up_parts + unit.down_parts:
                    state.experts[f"{path}.{e}.{p}"] = path
            state.counts[path] = torch.zeros(len(units), dtype=torch.long)
            mod.forward = partial(_routed_forward, mod, units, settings.calibrate_all_experts, state.counts[path])
            routed.append((mod, len(units)))
    try:
        yield state
    finally:
        for mod, n in routed:
            del mod.forward
            for e in range(n):
                del mod._modules[str(e)]


def _expert_list(mod: nn.Module) -> bool:
    return isinstance(mod, nn.ModuleList) and len(mod) > 1 and len({type(m) for m in mod}) == 1


def list_experts(block: nn.Module, prefix: str) -> tuple[set[str], set[str]]:
    """(expert Linears, router Linears) of per-expert modules held in an nn.ModuleList (custom code, older
    transformers): each expert sees only the tokens routed to it; a router is a Linear next to such a list with
    one output per expert, which stays in full precision unless a stage names it."""
    experts, routers = set(), set()
    for name, mod in block.named_modules():
        lists = [m for m in mod.children() if _expert_list(m)]
        if not _expert_list(mod) or not name:
            routers |= {f"{prefix}.{name}.{n}" for n, c in mod.named_children()
                        if isinstance(c, nn.Linear) and any(c.out_features == len(lst) for lst in lists)}
            continue
        experts |= {f"{prefix}.{name}.{n}" for n, m in mod.named_modules() if isinstance(m, nn.Linear)}
    return experts, routers


def few_token_hessians(stats: dict[str, dict], experts: set[str], settings: MoESettings) -> dict[str, dict]:
    """Experts routed fewer than min_tokens tokens solve on H + d·mean(diag H)·I (one per shared input, so siblings
    still share it): a Hessian from a handful of tokens is nearly singular and GPTQ would fit those tokens alone.
    Changes `stats` in place; returns what to record per expert."""
    damped, out = {}, {}
    for name, st in stats.items():
        n = st["tokens"]
        if name not in experts or n >= settings.min_tokens:
            continue
        H = st["hessian"]
        if st["input_owner"] not in damped:
            eye = torch.eye(H.shape[0], device=H.device)
            damped[st["input_owner"]] = H + settings.dampening_frac * torch.diagonal(H).mean() * eye
        st["hessian"] = damped[st["input_owner"]]
        out[name] = {"few_tokens": {"tokens": n, "min_tokens": settings.min_tokens,
                                    "extra_dampening": settings.dampening_frac}}
    return out


def expert_passes(targets: dict, fused: dict[str, str], per_pass: int | None) -> list[dict]:
    """The stage's targets split into calibration passes: everything but the fused experts first, then
    `per_pass` experts at a time (of every experts module in the block), so only their Hessians are held at
    once: Mixtral-8x7B's eight down_proj Hessians alone are 8 × 14336² fp32 = 6.6 GB. None: one pass."""
    experts = {n: m for n, m in targets.items() if n in fused}
    if not per_pass or not experts:
        return [targets]
    groups: dict[int, dict] = {}
    for n, m in experts.items():
        groups.setdefault(int(n[len(fused[n]) + 1:].split(".")[0]), {})[n] = m
    rest = {n: m for n, m in targets.items() if n not in fused}
    order = sorted(groups)
    chunks = [{n: m for e in order[j:j + per_pass] for n, m in groups[e].items()}
              for j in range(0, len(order), per_pass)]
    return ([rest] if rest else []) + chunks
