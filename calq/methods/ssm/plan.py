"""What to quantize where: one small settings object shared by the Mamba1 and Mamba2 simulated mixers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantPlan:
    w_bits: int = 8                 # 8: int8 per-tensor everywhere; 4: in/out_proj (and x_proj) in 128-groups
    a_bits: int = 8                 # 8: static int8 activations at every site; 16: none quantized (W4A16)
    percentile: float | None = 0.99999   # Mamba1 scan input u: percentile α of the EMA observer; None = min-max
    hadamard_y: bool = True         # rotate y (out_proj input) online, inverse fused into out_proj
    group_size: int = 128           # 4-bit weight groups along the input dim
    gptq: bool = True               # 4-bit in/out_proj with GPTQ (else RTN)
    dampening_frac: float = 0.01
    clusters: int = 4               # Mamba2 sort-and-cluster: head clusters and dim clusters per SSD group

    @property
    def quant_acts(self) -> bool:
        return self.a_bits < 16

    @property
    def ssm_bits(self) -> int | None:
        """int8 for conv, A_log, D, dt_bias (Mamba1) and dt_proj when activations are int8; None keeps fp16."""
        return 8 if self.a_bits == 8 else None
