"""Model code, one file per idea: rope, attention (MHA/GQA baselines), mla, moe,
grouped_matmul, mtp, transformer (the decoder that assembles them)."""
