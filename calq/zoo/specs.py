"""The three demo models: architecture and training settings (one place, read by train and list)."""

from __future__ import annotations

from dataclasses import dataclass, field

VOCAB_SIZE = 4096
SEQ_LEN = 512  # training and reported evaluation length


@dataclass(frozen=True)
class ZooSpec:
    name: str
    arch: str                 # transformers class name
    config: dict              # kwargs of the transformers config class
    steps: int                # optimizer steps (fixed, so a rerun is the same run)
    batch_size: int           # windows of SEQ_LEN tokens per step
    lr: float
    seed: int = 0
    warmup: int = 50
    notes: list[str] = field(default_factory=list)


ZOO = {
    "llama": ZooSpec(
        name="llama", arch="LlamaForCausalLM",
        config=dict(vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=SEQ_LEN,
                    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
        steps=1000, batch_size=8, lr=2e-3,
        notes=["GQA 4 heads / 2 KV heads; hidden 256 and intermediate 768 are multiples of 128"]),
    "mamba": ZooSpec(
        name="mamba", arch="MambaForCausalLM",
        config=dict(vocab_size=VOCAB_SIZE, hidden_size=256, state_size=16, num_hidden_layers=4, expand=2,
                    conv_kernel=4, tie_word_embeddings=True),
        steps=250, batch_size=8, lr=3e-3,
        notes=["trained with calq.zoo.scan.chunked_selective_scan; evaluated with transformers' scan"]),
    "mamba2": ZooSpec(
        name="mamba2", arch="Mamba2ForCausalLM",
        config=dict(vocab_size=VOCAB_SIZE, hidden_size=256, state_size=32, num_hidden_layers=4, expand=2,
                    head_dim=64, num_heads=8, n_groups=2, chunk_size=64, tie_word_embeddings=True),
        steps=800, batch_size=8, lr=2e-3,
        notes=["n_groups=2 so the grouped gated RMSNorm is exercised"]),
}
