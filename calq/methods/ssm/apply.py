"""The block step shared by the quamba and quamba2 stages: swap the mixer for its simulated quantized twin,
calibrate it on the block's inputs, quantize, and describe it as a `Packed` record; and the inverse on load."""

from __future__ import annotations

from calq.errors import ModelError
from calq.methods.base import Packed
from calq.methods.ssm.hadamard import hadamard
from calq.methods.ssm.mamba1 import QMamba1Mixer
from calq.methods.ssm.mamba2 import QMamba2Mixer
from calq.methods.ssm.plan import QuantPlan
from calq.methods.ssm.storage import export_mixer, load_mixer

MIXERS = {"MambaMixer": ("mamba1", QMamba1Mixer), "Mamba2Mixer": ("mamba2", QMamba2Mixer)}


def mixer_kind(mixer, method: str, allowed: tuple[str, ...]) -> tuple[str, type]:
    kind = MIXERS.get(type(mixer).__name__)
    if kind is None or kind[0] not in allowed:
        names = {"mamba1": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}
        raise ModelError(f"{method} cannot quantize a {type(mixer).__name__}",
                         f"{method} runs on {', '.join(names[a] for a in allowed)}")
    return kind


def quantize_mixer(ctx, plan: QuantPlan, method: str, allowed: tuple[str, ...]) -> Packed:
    block = ctx.block
    arch, cls = mixer_kind(block.mixer, method, allowed)
    had = hadamard(block.mixer.out_proj.weight.shape[1]) if plan.hadamard_y else None
    q = cls(block.mixer, plan, had, mode="calibrate").to(ctx.device)
    block.mixer = q
    ctx.forward()                                   # calibrate: fp mixer, observers on every site
    if arch == "mamba2" and plan.clusters > 0 and plan.quant_acts:
        q.reorder()                                 # sort-and-cluster, then the scales again on the new order
        ctx.forward()
    q.finalize()
    tensors, meta, n_weights = export_mixer(q, arch)
    bits = 4 if plan.w_bits == 4 else 8
    info = {"plan": meta["plan"], "scales": {k[2:]: round(float(v.float().amax()), 6)
                                             for k, v in tensors.items() if k.startswith("s_")}}
    return Packed(name=f"{ctx.prefix}.mixer", method=method, tensors={k: v.cpu() for k, v in tensors.items()},
                  meta=meta, n_weights=n_weights, bits=bits, layout=f"w{plan.w_bits}a{plan.a_bits}",
                  module=q, replaces=None, info=info)


def rebuild_mixer(model, name: str, tensors: dict, meta: dict) -> dict:
    hf_mixer = model.get_submodule(name)
    _, cls = mixer_kind(hf_mixer, meta.get("method", "quamba"), ("mamba1", "mamba2"))
    q = load_mixer(cls, hf_mixer, tensors, meta)
    model.set_submodule(name, q)
    return dict(q.state_dict())
