"""Number formats for the model's weight matmuls (a leaf: imports only jax). ``fp8`` holds
DeepSeek-V3's fine-grained FP8 recipe (1x128 activation tiles, 128x128 weight blocks, E4M3,
f32 promotion per 128-K slice) and the per-tensor baseline, with all three GEMMs of a linear
layer in FP8 through a custom VJP."""
