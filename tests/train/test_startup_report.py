"""What a run says before compiling: the mesh, the execution choices (once), and the weights
the mesh cannot split, at default verbosity."""

from deepseek_jax.train import trainer
from deepseek_jax.train.config import default_config


def _config(**mesh):
  c = default_config()
  c.model.preset = "tiny"
  c.model.overrides.vocab_size = 320
  c.train.batch_size = 8
  c.mesh.update({**dict(data=1, fsdp=1, expert=1, tensor=1), **mesh})
  return c


def test_a_tensor_axis_that_does_not_divide_some_weights_is_reported_in_one_line():
  lines = trainer.startup_report(trainer.build_setup(_config(tensor=8)))
  sharding = [line for line in lines if line.startswith("sharding:")]
  assert len(sharding) == 1
  assert "weight(s) keep" in sharding[0] and "tensor=8" in sharding[0]
  assert any(line.startswith("execution cpu: attention xla") for line in lines)


def test_the_execution_line_names_expert_parallel_dispatch():
  lines = trainer.startup_report(trainer.build_setup(_config(fsdp=2, expert=4)))
  assert any("MoE expert_parallel (padded exchange)" in line for line in lines)
  assert not any(line.startswith("sharding:") for line in lines)
