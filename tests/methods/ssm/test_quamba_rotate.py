"""Quamba2's exact fp transforms: norm folding and the residual Hadamard leave the logits unchanged."""

import pytest
import torch

from calq.methods.ssm.rotate import fold_norms, rotate_residual

# fp32 model, transforms computed in fp64 and cast back: only fp32 rounding of the weights differs
LOGITS_RTOL = 1e-4


def _model(kind):
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    if kind == "mamba":
        model = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=48, state_size=8, num_hidden_layers=2))
    else:
        model = Mamba2ForCausalLM(Mamba2Config(vocab_size=64, hidden_size=48, state_size=8, num_hidden_layers=2,
                                               head_dim=8, num_heads=12, n_groups=2, chunk_size=16))
    with torch.no_grad():                       # non-trivial norm weights, so the folding is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_fold_and_rotate_keep_logits(kind):
    model = _model(kind)                        # hidden 48 = 12·4: a Paley factor, not a power of 2
    ids = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        emb0 = model.get_input_embeddings().weight.clone()
        fold_norms(model)
        folded = model(ids, use_cache=False).logits
        meta = rotate_residual(model)
        rotated = model(ids, use_cache=False).logits
    tol = LOGITS_RTOL * ref.abs().max()
    assert meta["K"] == 12 and meta["source"] == "paley1:q=11"
    assert model.lm_head.weight is not model.get_input_embeddings().weight and not model.config.tie_word_embeddings
    assert not torch.allclose(model.get_input_embeddings().weight, emb0, atol=1e-3)   # the rotation did something
    assert torch.allclose(folded, ref, atol=tol)
    assert torch.allclose(rotated, ref, atol=tol)


def test_rotate_needs_folded_norms():
    with pytest.raises(ValueError, match="fold_norms"):
        rotate_residual(_model("mamba"))
