import numpy as np
import pytest
import torch

from calq.methods.adadim import choose_layout
from calq.methods.quantizer import QuantArgs, check_divides, gguf_q4_1_scale, quantize_rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("g", [16, -1])
def test_per_ic_on_w_equals_per_oc_on_w_transposed(bits, symmetric, g):
    torch.manual_seed(bits)
    W = torch.randn(64, 48)
    ic = quantize_rtn(W, QuantArgs(bits=bits, group_size=g, symmetric=symmetric, layout="ic"))
    oc_t = quantize_rtn(W.t(), QuantArgs(bits=bits, group_size=g, symmetric=symmetric, layout="oc"))
    assert torch.equal(ic[0], oc_t[0].t()) and torch.equal(ic[1], oc_t[1].t()) and torch.equal(ic[3], oc_t[3].t())
    assert ic[1].shape == ((64 // g if g > 0 else 1), 48)      # scale [OC/g, IC]


def test_layouts_differ_where_an_input_channel_is_an_outlier():
    # One hot input column: per-OC groups share its range with 127 other columns, per-IC keep it apart.
    torch.manual_seed(0)
    W = torch.randn(128, 128)
    W[:, 5] *= 20
    err = {lay: (quantize_rtn(W, QuantArgs(bits=3, group_size=128, layout=lay))[3] - W).pow(2).sum()
           for lay in ("oc", "ic")}
    assert err["ic"] < 0.5 * err["oc"]


def test_check_divides_names_the_dimension():
    assert check_divides((96, 256), QuantArgs(group_size=128, layout="oc")) is None
    assert check_divides((96, 256), QuantArgs(group_size=128, layout="ic")) == "128 does not divide out_features 96"
    assert check_divides((96, 100), QuantArgs(group_size=-1, layout="oc")) is None


def test_adadim_picks_the_layout_with_the_lower_unit_error():
    torch.manual_seed(0)
    W = torch.randn(128, 128)
    W[:, 3] *= 25                                       # an outlier input channel favours ic
    X = torch.randn(256, 128)
    args = QuantArgs(bits=3, group_size=128)

    def unit_errors(cands):
        return [float(((X @ (W - c).t()) ** 2).mean()) for c in cands]

    choice, info = choose_layout(W, args, unit_errors)
    assert choice == "ic" and info["err_ic"] < info["err_oc"]
    choice, info = choose_layout(W.t().contiguous(), args, lambda c: [1.0, 1.0])   # a tie goes to oc
    assert choice == "oc"
    choice, info = choose_layout(torch.randn(96, 128), args, unit_errors)           # ic cannot divide 96 rows
    assert choice == "oc" and "does not divide out_features 96" in info["reason"]


def test_q4_1_scales_make_llama_cpps_arithmetic_exact():
    """Every scale scheme q4_1 can produce (all of them: each positive fp16 rounded), with every zero point z and
    code q of 4 bits: m = -z·d is an fp16, and q·d + m in fp32 (llama.cpp's dequantization, fused or not) is
    (q - z)·d exactly, as is the same product in fp16 (a checkpoint dequantized in the model's dtype)."""
    every = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    d = torch.unique(gguf_q4_1_scale(every))
    assert d.numel() == 1733 and (d.to(torch.float16).float() == d).all()
    normal = (every >= 2**-14) & (every <= 4352)
    assert ((gguf_q4_1_scale(every) - every).abs() <= every * 2**-7)[normal].all()
    assert gguf_q4_1_scale(torch.tensor([0.0, 1e-9])).tolist() == [0.0, 2**-20]
    d64 = d.double().numpy()[:, None, None]                             # [S, 1, 1]
    q = np.arange(16, dtype=np.float64)[None, :, None]                  # [1, 16 codes, 1]
    z = np.arange(16, dtype=np.float64)[None, None, :]                  # [1, 1, 16 zero points]
    m = (-z * d64).astype(np.float16)
    assert (m.astype(np.float64) == -z * d64).all()
    exact = (q - z) * d64
    fp32 = d64.astype(np.float32) * q.astype(np.float32) + m.astype(np.float32)    # gguf.quants' order
    assert (fp32.astype(np.float64) == exact).all()
    assert (exact.astype(np.float16).astype(np.float64) == exact).all()


def test_q4_1_grid_has_calqs_asymmetric_shape():
    torch.manual_seed(0)
    W = torch.randn(16, 64) * 0.02
    codes, scale, zero, W_hat = quantize_rtn(W, QuantArgs(bits=4, group_size=32, symmetric=False,
                                                          scale_rule="gguf"))
    plain = quantize_rtn(W, QuantArgs(bits=4, group_size=32, symmetric=False))
    bits = scale.to(torch.float16).view(torch.int16)
    assert (bits & 15 == 0).all() and not (plain[1].to(torch.float16).view(torch.int16) & 15 == 0).all()
    assert ((scale - plain[1]).abs() <= plain[1] * 2**-7).all()
    assert torch.equal(W_hat, (codes.float() - zero.repeat_interleave(32, -1)) * scale.repeat_interleave(32, -1))
