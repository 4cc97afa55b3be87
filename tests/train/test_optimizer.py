"""AdamW setup: weight-decay mask, schedules, bf16 moments, piecewise schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.train.config import default_config
from deepseek_jax.train.optimizer import (decay_mask, lr_schedule, make_optimizer,
                                          piecewise_constant)


def _opt(**kw):
  c = default_config().optimizer
  c.total_steps = 100
  c.update(kw)
  return c


def test_weight_decay_skips_norm_scales_only(make_model):
  params = nnx.state(make_model(), nnx.Param)
  mask = decay_mask(params)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  scales = [k for k in flat if "'scale'" in k]
  assert scales and not any(flat[k] for k in scales)
  assert all(v for k, v in flat.items() if "'scale'" not in k)


def test_cosine_and_wsd_schedules():
  cos = lr_schedule(_opt(schedule="cosine", learning_rate=1.0, warmup_steps=10, final_lr_fraction=0.1))
  assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1.0)
  assert float(cos(100)) == pytest.approx(0.1)
  wsd = lr_schedule(_opt(schedule="wsd", learning_rate=1.0, warmup_steps=10, decay_fraction=0.2,
                         final_lr_fraction=0.0))
  assert float(wsd(50)) == pytest.approx(1.0) and float(wsd(79)) == pytest.approx(1.0)
  assert float(wsd(90)) == pytest.approx(0.5) and float(wsd(100)) == pytest.approx(0.0)
  with pytest.raises(ValueError, match="schedule"):
    lr_schedule(_opt(schedule="linear"))


def test_bf16_moments_store_bfloat16_and_match_float32_closely(make_model):
  params = nnx.state(make_model(), nnx.Param)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
  updates = {}
  for dtype in ("float32", "bfloat16"):
    tx = make_optimizer(_opt(moment_dtype=dtype))
    state = jax.jit(tx.init)(params)
    moments = [leaf for leaf in jax.tree.leaves(state) if leaf.ndim > 0]
    assert {m.dtype for m in moments} == {jnp.dtype(dtype)}
    updates[dtype], _ = jax.jit(tx.update)(grads, state, params)
  for a, b in zip(jax.tree.leaves(updates["float32"]), jax.tree.leaves(updates["bfloat16"])):
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=1e-7)


def test_piecewise_constant_schedules_switch_at_their_steps():
  lam = piecewise_constant(((0, 0.3), (100, 0.1)))
  assert float(lam(0)) == pytest.approx(0.3) and float(lam(99)) == pytest.approx(0.3)
  assert float(lam(100)) == pytest.approx(0.1)
  with pytest.raises(ValueError, match="start at step 0"):
    piecewise_constant(((5, 0.1),))
