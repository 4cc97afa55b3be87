"""Checkpoint helpers: exact round trips, no overwriting, and refusing a different model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import ModelConfig
from deepseek_jax.train.checkpoint import Checkpointer, check_compatible, from_nested, to_nested
from deepseek_jax.train.config import default_config
from deepseek_jax.train import data as D
from deepseek_jax.train.checkpoint import config_record


def test_nested_round_trip_keeps_structure_and_values(make_model):
  from flax import nnx
  state = nnx.state(make_model())
  back = from_nested(to_nested(state), state)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    assert a is b


def test_save_restore_is_exact_and_existing_steps_are_never_overwritten(tmp_path):
  tree = {"w": jax.random.normal(jax.random.key(0), (4, 3)), "step": jnp.int32(5)}
  cfg = default_config()
  cfg.data.corpus_documents = 100
  it = iter(D.make_dataset(cfg.data, D.ByteTokenizer(), seq_len=32, batch_size=2))
  next(it)
  ckpt = Checkpointer(str(tmp_path), every=1, keep=2)
  assert ckpt.save(1, tree, it, {"model_config": {}})
  ckpt.wait()
  assert not ckpt.save(1, {"w": tree["w"] + 1, "step": tree["step"]}, it, {}, force=True)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  restored = ckpt.restore(1, abstract)
  np.testing.assert_array_equal(restored["w"], tree["w"])  # the first save survived
  ckpt.close()


def test_resuming_a_different_model_is_refused():
  cfg = default_config()
  saved = config_record(cfg, ModelConfig.preset("small"))
  same_but_remat = config_record(cfg, ModelConfig.preset("small", remat_policy="full"))
  check_compatible(saved, same_but_remat, "/w")  # execution-only change: allowed
  with pytest.raises(ValueError, match="d_model: saved 256 vs now 128.*new --workdir"):
    check_compatible(saved, config_record(cfg, ModelConfig.preset("small", d_model=128)), "/w")
