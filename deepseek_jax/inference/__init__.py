"""Inference: generate() with prefill + compiled decode over the latent cache."""
