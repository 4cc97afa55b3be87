"""Low-level compute shared by the model and the parallel code (a leaf: imports no other part of
deepseek_jax). ``matmul`` is the one chokepoint every weight matmul goes through;
``grouped_matmul`` multiplies rows sorted by expert by their expert's weight; ``rows`` holds
the row gathers whose transpose is again a gather."""
