import torch

from calq.zoo.scan import chunked_selective_scan, use_chunked_scan

# fp32 closed-form chunks vs a step-by-step recurrence: rounding differs, nothing else.
SCAN_RTOL = 1e-4


def _reference_scan(u, dt, A, B, C, D, z, delta_bias):
    dt = torch.nn.functional.softplus(dt + delta_bias[..., None])
    b, d, T = u.shape
    h = torch.zeros(b, d, A.shape[1])
    ys = []
    for t in range(T):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1) + u * D[None, :, None]
    return y * torch.nn.functional.silu(z)


def test_chunked_scan_matches_recurrence():
    torch.manual_seed(0)
    b, d, n, T = 2, 16, 8, 37                       # T not a multiple of the chunk
    u, dt, z = torch.randn(b, d, T), torch.randn(b, d, T), torch.randn(b, d, T)
    A = -torch.exp(torch.randn(d, n))
    B, C = torch.randn(b, n, T), torch.randn(b, n, T)
    D, bias = torch.randn(d), torch.randn(d)
    ref = _reference_scan(u, dt, A, B, C, D, z, bias)
    got = chunked_selective_scan(u, dt, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
    assert torch.allclose(got, ref, rtol=SCAN_RTOL, atol=SCAN_RTOL * ref.abs().max().item())


def test_chunked_scan_inside_transformers_mamba():
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=2,
                                         expand=2)).eval()
    ids = torch.randint(0, 64, (2, 50))
    with torch.no_grad():
        ref = model(ids).logits
        with use_chunked_scan():
            got = model(ids).logits
        again = model(ids).logits                    # the patch is undone on exit
    assert torch.allclose(got, ref, atol=SCAN_RTOL * ref.abs().max().item())
    assert torch.equal(again, ref)
