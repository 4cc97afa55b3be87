"""Low-level compute shared by the model and the parallel code (imports only ``quant``, the
number formats, from the rest of deepseek_jax). ``matmul`` is the one chokepoint every weight
matmul goes through; ``grouped_matmul`` multiplies rows sorted by expert by their expert's weight; ``rows`` holds
the row gathers whose transpose is again a gather."""
