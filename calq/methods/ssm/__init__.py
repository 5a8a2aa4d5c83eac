"""Building blocks for quantizing state-space models (Quamba, Quamba2): Hadamard transforms, observers,
simulated Mamba1/Mamba2 mixers with explicit quantization points, SSD scan, sort-and-cluster, storage."""
