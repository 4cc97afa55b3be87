"""The XLA attention core: its custom backward (probabilities recomputed from the saved
log-sum-exp) equals autodiff of the plain softmax(q k^T * scale) v, masks included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.model.attention import attend, attention_mask, masked_softmax


def _reference(q, k, v, mask, scale):
  scores = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32) * scale
  return jnp.einsum("BNTS,BSNV->BTNV", masked_softmax(scores, mask).astype(v.dtype), v)


@pytest.mark.parametrize("packed", [False, True])
def test_attention_output_and_gradients_equal_autodiff_of_the_plain_softmax(packed):
  b, t, n, h, dv = 2, 12, 3, 8, 5
  kq, kk, kv, kc = jax.random.split(jax.random.key(0), 4)
  q, k = (jax.random.normal(key, (b, t, n, h)) for key in (kq, kk))
  v = jax.random.normal(kv, (b, t, n, dv))
  index = jnp.broadcast_to(jnp.arange(t), (b, t))
  segments = jnp.array([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3]) if packed else None
  mask = attention_mask(index, index, segments, segments)
  if packed:  # a padding token (segment 0) in row 1 sees only other padding; one row sees none
    mask = mask.at[1, 0, 10].set(False)
  cotangent = jax.random.normal(kc, (b, t, n, dv))
  scale = 0.3

  def grads(fn):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask, scale), q, k, v)
    return (out, *vjp(cotangent))

  got, want = jax.jit(lambda: grads(attend))(), jax.jit(lambda: grads(_reference))()
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(g, w, atol=2e-6, rtol=2e-5, err_msg=name)
  # Changing a masked key changes nothing; an unmasked one changes the output.
  bumped = v.at[0, t - 1].add(1.0)
  out = attend(q, k, bumped, mask, scale)
  np.testing.assert_array_equal(out[0, :t - 1], attend(q, k, v, mask, scale)[0, :t - 1])
  assert not np.allclose(out[0, t - 1], got[0][0, t - 1])
