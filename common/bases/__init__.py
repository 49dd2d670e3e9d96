"""Frozen bases the adapters train on (issue 5): quantized (QLoRA NF4, LQ-LoRA) and pruned (LoRAM).

One idea per file:
- `codebooks`: NormalFloat-k and the 8-bit dynamic code (value tables in [-1, 1]).
- `blockwise`: blockwise absmax quantization, double-quantized scales, packed storage, bits/param.
- `quantized_linear`: `QuantizedLinear`, a buffer-only frozen linear that dequantizes on the fly.
- `lq_lora`: W ≈ Q + L1 L2 by alternating SVD and quantization (optionally Fisher-weighted).
- `mixed_precision`: one quantization config per matrix under a bits/param budget, by an ILP.
- `pruning`: LoRAM structured pruning of BERT layers and recovery of pruned-space adapters.
- `eora`: activation-weighted low-rank compensation of a compression error.
- `fedsvd_form`: re-factor B A so A has orthonormal rows (the FedSVD start state).
- `replace`: swap a loaded model's frozen base linears for `QuantizedLinear`.
"""
