"""Model code, one file per idea: rope, attention (MHA/GQA baselines), mla, moe,
mtp, transformer (the decoder that assembles them), execution (kernel and dispatch choices)."""
