import pytest
import torch

from calq.methods.corda import INV_TOL, corda_decompose, damped_inverse


def _setup(OC=40, IC=48, N=1024):
    torch.manual_seed(0)
    X = torch.randn(N, IC) @ torch.randn(IC, IC)
    return torch.randn(OC, IC), X.t() @ X / N


def test_residual_plus_adapter_is_the_weight():
    W, C = _setup()
    for mode in ("ipa", "kpa"):
        B, A, W_res, _, _ = corda_decompose(W, C, 8, mode)
        assert torch.allclose(W_res + B @ A, W, atol=1e-4 * W.abs().max().item())


def test_ipa_takes_the_largest_and_kpa_the_smallest_components():
    W, C = _setup()
    C_f, _, _ = damped_inverse(C)
    U, S, Vh = torch.linalg.svd(W @ C_f, full_matrices=False)
    r = 6
    top = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    bottom = U[:, -r:] @ torch.diag(S[-r:]) @ Vh[-r:]
    B, A, _, S_ipa, _ = corda_decompose(W, C, r, "ipa")
    assert torch.allclose(B @ A @ C_f, top, atol=1e-3 * top.abs().max().item())
    B, A, _, S_kpa, _ = corda_decompose(W, C, r, "kpa")
    assert torch.allclose(B @ A @ C_f, bottom, atol=1e-3 * top.abs().max().item())
    assert S_ipa.min() > S_kpa.max()


def test_singular_covariance_is_damped_until_invertible():
    torch.manual_seed(0)
    X = torch.randn(4, 32)                                   # rank 4 of 32
    C_f, C_inv, damp = damped_inverse(X.t() @ X)
    assert torch.dist(C_f @ C_inv, torch.eye(32)).item() < INV_TOL
    assert damp >= 0.01


@pytest.mark.slow
def test_matches_peft_corda_preprocessing_on_zoo_llama(tokenizer):
    """Our IPA adapter against PEFT's preprocess_corda on the same samples: B·A agree (sign-free)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    from calq.api import compress_model, load_model
    from calq.calibration.data import calibration_windows, load_text
    from calq.recipe.schema import validate_recipe

    cal = {"dataset": "stdlib:train", "num_samples": 16, "seq_len": 256, "seed": 3, "batch_size": 4}
    ids = calibration_windows(load_text("stdlib:train"), tokenizer, 16, 256, 3)
    ours_model, tok, dtype = load_model("zoo:llama")
    res = compress_model(ours_model, tok, validate_recipe(
        {"calibration": cal, "stages": [{"method": "corda", "rank": 8, "mode": "ipa"}]}), torch.device("cpu"), dtype)
    ours = {a.adapter.name: a.adapter.B @ a.adapter.A for a in res.adapters}

    model, _, _ = load_model("zoo:llama")
    cfg = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"],
                     init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm"))

    @torch.no_grad()
    def run_model():
        for row in ids:
            model(row[None])

    preprocess_corda(model, cfg, run_model=run_model)
    peft_model = get_peft_model(model, cfg)
    worst = 0.0
    for name, BA in ours.items():
        mod = peft_model.base_model.model.get_submodule(name)
        theirs = mod.lora_B["default"].weight @ mod.lora_A["default"].weight
        worst = max(worst, ((theirs - BA).norm() / BA.norm()).item())
    # Later blocks see our residual + adapter (= W up to fp32 rounding) rather than W itself.
    assert worst < 1e-2, worst
