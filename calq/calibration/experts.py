"""Fused mixture-of-experts weights, and the names the model's own hub checkpoints give them.

transformers 5 holds a MoE block's experts as 3-D parameters (Mixtral's `mlp.experts.gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]) and converts the checkpoint's per-expert tensors (`block_sparse_moe.experts.3.w1.weight`,
`mlp.experts.3.gate_proj.weight`) into them on load, and back on save. calq asks transformers' own reverse
conversion (`revert_weight_conversion`) where each row of a fused parameter goes, by converting index tensors
[E, R, 1] instead of weights: no table of model names here. Each expert's projection then has two names: its
module path `{experts}.{e}.{proj}` (what the engine, targets/ignore and the report use) and its hub name (what
the checkpoint stores). A model without fused experts keeps every name as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Part:
    """One expert's projection: rows [start, stop) of P[e] of a fused parameter P [E, R, C]."""

    proj: str           # its name in the checkpoint: "w1", "gate_proj", ...
    start: int
    stop: int


@dataclass
class FusedParam:
    key: str                                   # model state-dict key, "model.layers.0.mlp.experts.gate_up_proj"
    shape: tuple[int, int, int]                # [E, R, C]
    parts: list[Part]                          # in row order, covering 0..R
    hub: dict[tuple[int, str], str] = field(default_factory=dict)   # (e, proj) -> hub module name

    @property
    def module(self) -> str:
        return self.key.rsplit(".", 1)[0]

    @property
    def param(self) -> str:
        return self.key.rsplit(".", 1)[1]

    def name(self, e: int, proj: str) -> str:
        """Module path of expert e's projection, as the engine presents it."""
        return f"{self.module}.{e}.{proj}"

    def names(self):
        """(module path, e, part) of every expert projection."""
        for e in range(self.shape[0]):
            for p in self.parts:
                yield self.name(e, p.proj), e, p


def _revert(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from transformers.core_model_loading import revert_weight_conversion

    saved = model.__dict__.pop("_weight_conversions", None)   # the canonical mapping, without load-time extras
    try:
        return revert_weight_conversion(model, state)
    finally:
        if saved is not None:
            model._weight_conversions = saved


def _parts_of(key: str, out: dict[str, torch.Tensor], shape) -> tuple[list[Part], dict] | str:
    """The row parts of a fused key from its probe's reverse conversion, or why they cannot be read."""
    E, R, _ = shape
    hub, parts = {}, {}
    for h, t in out.items():
        m = re.fullmatch(r"(.+)\.(\d+)\.([^.]+)\.weight", h)
        if m is None or t.dim() != 2 or t.shape[1] != 1:
            return f"its checkpoint form {h} {tuple(t.shape)} is not one row range of one expert"
        ids = t[:, 0].round().long()
        e, rows = int(ids[0]) // R, ids % R
        if int(m[2]) != e or bool((ids // R != e).any()) or \
                not torch.equal(rows, torch.arange(int(rows[0]), int(rows[0]) + len(rows))):
            return f"{h} is not a contiguous row range of expert {m[2]}"
        part = Part(m[3], int(rows[0]), int(rows[0]) + len(rows))
        if parts.setdefault(m[3], part) != part:
            return f"{m[3]} covers different rows in different experts"
        hub[(e, m[3])] = f"{m[1]}.{m[2]}.{m[3]}"
    ordered = sorted(parts.values(), key=lambda p: p.start)
    if len(hub) != E * len(ordered) or ordered[0].start != 0 or ordered[-1].stop != R or \
            any(a.stop != b.start for a, b in zip(ordered, ordered[1:], strict=False)):
        return "its experts' projections do not tile its rows"
    return ordered, hub


class CheckpointNames:
    """Model state-dict keys <-> hub checkpoint keys, for a model whose blocks hold fused experts.

    `active` is False for every other model (and for fused experts whose conversion calq cannot read, listed in
    `unsupported`): then names map to themselves and fused parameters are written as they are.
    """

    def __init__(self, model: nn.Module):
        self.fused: dict[str, FusedParam] = {}
        self.unsupported: dict[str, str] = {}          # fused key -> why it stays as it is
        self.to_hub: dict[str, str] = {}               # model key -> hub key (per-expert keys included)
        self.from_hub: dict[str, str] = {}
        if not hasattr(model, "config") or not any(p.dim() == 3 for p in model.parameters()):
            return
        state = model.state_dict()
        hub_of: dict[str, str] = {}
        for key, t in state.items():
            if t.dim() == 3 and t.is_floating_point():
                E, R, C = t.shape
                probe = torch.arange(E * R, dtype=torch.float64).reshape(E, R, 1)
                try:
                    out = _revert(model, {key: probe})
                except Exception as e:     # noqa: BLE001 — a conversion calq cannot follow: keep it fused
                    self.unsupported[key] = f"transformers' reverse conversion failed on an index probe: {e}"
                    continue
                if list(out) == [key]:
                    continue                            # a 3-D parameter the checkpoint stores as it is
                parts = _parts_of(key, out, (E, R, C))
                if isinstance(parts, str):
                    self.unsupported[key] = parts
                    continue
                fp = FusedParam(key, (E, R, C), *parts)
                self.fused[key] = fp
                for name, e, p in fp.names():
                    hub_of[f"{name}.weight"] = f"{fp.hub[(e, p.proj)]}.weight"
                continue
            out = _revert(model, {key: torch.empty(t.shape, device="meta", dtype=t.dtype)})
            if len(out) == 1:
                hub_of[key] = next(iter(out))
        if not self.fused:
            return
        if len(set(hub_of.values())) != len(hub_of):
            self.unsupported.update({k: "two model tensors share one checkpoint name" for k in self.fused})
            self.fused = {}
            return
        self.to_hub = hub_of
        self.from_hub = {h: k for k, h in hub_of.items()}

    @property
    def active(self) -> bool:
        return bool(self.fused)

    def hub_name(self, name: str) -> str:
        """Checkpoint name of a module path (an expert projection, a renamed router)."""
        w = self.to_hub.get(f"{name}.weight")
        return w[: -len(".weight")] if w else name

    def expert_shapes(self) -> dict[str, tuple[int, int]]:
        """Module path -> [OC, IC] of every fused expert projection."""
        return {name: (p.stop - p.start, fp.shape[2]) for fp in self.fused.values() for name, _, p in fp.names()}

    def unfuse(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fused parameters in `state` as per-expert `{module path}.weight` views; other keys as they are."""
        out = {}
        for k, v in state.items():
            fp = self.fused.get(k)
            if fp is None:
                out[k] = v
                continue
            for name, e, p in fp.names():
                out[f"{name}.weight"] = v[e, p.start:p.stop]
        return out

    def fuse(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of `unfuse` for the fused parameters all of whose expert projections are in `state`."""
        out = dict(state)
        for key, fp in self.fused.items():
            names = [f"{name}.weight" for name, _, _ in fp.names()]
            if not any(n in out for n in names):
                continue
            missing = [n for n in names if n not in out]
            if missing:
                raise ValueError(f"{key}: the checkpoint lacks {len(missing)} expert tensors, e.g. {missing[0]}")
            first = out[names[0]]
            P = torch.empty(fp.shape, dtype=first.dtype)
            for (_, e, p), n in zip(fp.names(), names, strict=True):
                P[e, p.start:p.stop] = out.pop(n)
            out[key] = P
        return out

    def to_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keys in model space (fused parameters already unfused) renamed to the hub's."""
        return {self._hub_key(k): v for k, v in state.items()}

    def from_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hub keys back to model keys, per-expert tensors fused."""
        if not self.active:
            return state
        return self.fuse({self._model_key(k): v for k, v in state.items()})

    def _hub_key(self, key: str) -> str:
        if key in self.to_hub:
            return self.to_hub[key]
        # a record's tensor (`{module}.weight_packed`): the module's weight decides its checkpoint name
        mod, _, suffix = key.rpartition(".")
        return f"{self.hub_name(mod)}.{suffix}"

    def _model_key(self, key: str) -> str:
        if key in self.from_hub:
            return self.from_hub[key]
        mod, _, suffix = key.rpartition(".")
        weight = self.from_hub.get(f"{mod}.weight")
        return f"{weight[: -len('.weight')]}.{suffix}" if weight else key
