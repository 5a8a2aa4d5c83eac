"""quamba / quamba2 stages through the engine on the zoo models: reloaded checkpoints reproduce the logits."""

import pytest
import torch

import calq
from calq.api import compress_model, load_model
from calq.export.writer import write_checkpoint
from calq.recipe.schema import validate_recipe

# calq.load rebuilds W_hat = codes·scale in fp32 and the same fp32 scales: only matmul order may differ
RELOAD_RTOL = 1e-4
CALIB = {"dataset": "stdlib:train", "num_samples": 8, "seq_len": 128, "seed": 0, "batch_size": 4}


@pytest.mark.parametrize("model_ref, stage", [
    ("zoo:mamba", {"method": "quamba"}),
    ("zoo:mamba", {"method": "quamba2", "precision": "w4a8"}),
    ("zoo:mamba2", {"method": "quamba2", "precision": "w8a8"}),
    ("zoo:mamba2", {"method": "quamba2", "precision": "w4a16"}),
])
def test_reload_reproduces_in_memory_logits(model_ref, stage, tmp_path):
    ids = torch.randint(0, 4096, (2, 96), generator=torch.Generator().manual_seed(1))
    model, tok, dtype = load_model(model_ref)
    with torch.no_grad():
        dense = model(ids, use_cache=False).logits
    recipe = validate_recipe({"model": model_ref, "calibration": CALIB, "stages": [stage]})
    result = compress_model(model, tok, recipe, torch.device("cpu"), dtype, rest_dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():            # what the checkpoint keeps of the non-mixer tensors: fp16
            p.copy_(p.half().float())
        mem = model(ids, use_cache=False).logits
    scale = mem.abs().max().item()
    assert (mem - dense).abs().max().item() > 1e-3 * scale          # quantization changed the model
    assert (mem - dense).norm() / dense.norm() < 0.2                # and not by much

    write_checkpoint(model.to(dtype), [m.record for m in result.modules], tmp_path, [])
    with torch.no_grad():
        got = calq.load(tmp_path)(ids, use_cache=False).logits
    assert (got - mem).abs().max().item() < RELOAD_RTOL * scale
    rows = calq.inspect(tmp_path)
    assert len([r for r in rows if r["method"] == stage["method"]]) == 4       # one per block's mixer
