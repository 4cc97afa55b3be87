"""Advantages for policy-gradient post-training: group-relative (GRPO and kin) and GAE (PPO).

Axis legend: B prompts (or sequences), G completions per prompt, T completion tokens.

GRPO needs no value model: each prompt's G completions form a group, and a completion's
advantage is its reward relative to its group (DeepSeekMath §4.1.2, outcome supervision), one
scalar per completion that the loss broadcasts over that completion's tokens. PPO (the
DeepSeekMath/InstructGPT baseline) instead turns the sequence reward into per-token rewards
(``token_rewards``) and credits them with a learned value via GAE (``gae``).

Conventions: a flat reward vector [B * G] is grouped as ``reshape(B, G)``, i.e. index b * G + g
is completion g of prompt b (the order ``rewards.WeightedReward`` scores when each record is
repeated G times). Masks are 1 on real completion tokens and 0 on padding. Everything is float32
and jit-friendly; ``group_size`` and ``estimator`` are static (Python values).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ESTIMATORS = ("grpo", "drgrpo", "rloo")


def group_advantages(rewards: jax.Array, group_size: int, *, estimator: str = "grpo",
                     eps: float = 1e-4, ddof: int = 0) -> jax.Array:
  """Group-relative advantages, float32 of the shape given ([B * G] or [B, G]).

  With mean_g and std_g the mean and standard deviation of the G rewards of r_i's group
  (``ddof=0``, the population std, as Tunix computes it; TRL and verl use torch's default,
  ``ddof=1``; DeepSeekMath writes std(r) without saying):

      "grpo"   A_i = (r_i - mean_g) / (std_g + eps)        DeepSeekMath §4.1.2, eq. in §4.1
      "drgrpo" A_i = r_i - mean_g                          Dr. GRPO (arXiv 2503.20783 §3.1)
      "rloo"   A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_g)
                                                           RLOO (Ahmadian et al. 2024, eq. 9)

  A group whose rewards are all equal gets exactly 0 (no NaN, whatever ``eps``). Raises
  ValueError for ``group_size`` < 2, a reward count not divisible by it ([B * G]) or a last
  axis not equal to it ([B, G]), another rank, or an unknown ``estimator``.
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f"group_advantages: unknown estimator {estimator!r}; choose one of "
                     f"{list(ESTIMATORS)}")
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
    raise ValueError(f"group_advantages: group_size must be an int >= 2 (a group needs a "
                     f"baseline from other completions), got {group_size!r}")
  rewards = jnp.asarray(rewards)
  if rewards.ndim == 1 and rewards.shape[0] % group_size:
    raise ValueError(f"group_advantages: {rewards.shape[0]} rewards are not a whole number of "
                     f"groups of {group_size}; pass G completions per prompt")
  if rewards.ndim == 2 and rewards.shape[1] != group_size:
    raise ValueError(f"group_advantages: rewards {rewards.shape} is [B, G] with G = "
                     f"{rewards.shape[1]}, but group_size = {group_size}")
  if rewards.ndim not in (1, 2):
    raise ValueError(f"group_advantages: rewards must be [B * G] or [B, G], got shape "
                     f"{rewards.shape}")
  r = rewards.astype(jnp.float32).reshape(-1, group_size)
  centered = r - r.mean(axis=1, keepdims=True)
  if estimator == "grpo":
    std = jnp.sqrt(jnp.sum(jnp.square(centered), axis=1, keepdims=True) / (group_size - ddof))
    adv = centered / (std + eps)
  elif estimator == "drgrpo":
    adv = centered
  else:
    adv = centered * (group_size / (group_size - 1))
  # The float mean of equal values need not equal them exactly; make such groups exactly 0.
  constant = r.max(axis=1, keepdims=True) == r.min(axis=1, keepdims=True)
  return jnp.where(constant, 0.0, adv).reshape(rewards.shape)


def _check_2d(name: str, x: jax.Array, shape) -> jax.Array:
  x = jnp.asarray(x)
  if x.shape != tuple(shape):
    raise ValueError(f"{name} has shape {x.shape}; expected {tuple(shape)} (rows x tokens)")
  return x


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float, lam: float):
  """Generalized advantage estimation (Schulman et al. 2016, eq. 11-16), masked.

  rewards [B, T], mask [B, T] (1 real token, 0 padding), values [B, T] or [B, T + 1] (V_t is the
  value at token t; a last column V_T bootstraps a row cut off by the window). With m_T = 1
  and V_T = 0 when values is [B, T]:

      delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
      A_t     = m_t * (delta_t + gamma * lam * A_{t+1}),        A_T = 0
      R_t     = m_t * (A_t + V_t)                               (the value-loss target)

  computed by a reverse ``jax.lax.scan`` over T. So the value after a row's last real token is
  0 (the episode ended there) unless that token is the window's last and a bootstrap column is
  given; a 0 inside a row is an episode boundary too. Padding gets A = R = 0, and padding's
  rewards and values (even NaN) never reach real tokens. Returns (advantages [B, T], returns
  [B, T]), float32. Raises ValueError for mismatched shapes.
  """
  rewards = jnp.asarray(rewards)
  if rewards.ndim != 2:
    raise ValueError(f"gae: rewards must be [B, T], got shape {rewards.shape}")
  b, t = rewards.shape
  mask = _check_2d("gae: mask", mask, (b, t)) > 0
  values = jnp.asarray(values).astype(jnp.float32)
  if values.shape == (b, t):
    values = jnp.concatenate([values, jnp.zeros((b, 1), jnp.float32)], axis=1)
  values = _check_2d("gae: values (or [B, T] without bootstrap)", values, (b, t + 1))
  mask_next = jnp.concatenate([mask[:, 1:], jnp.ones((b, 1), bool)], axis=1)
  v_now = jnp.where(mask, values[:, :-1], 0.0)
  v_next = jnp.where(mask_next, values[:, 1:], 0.0)
  r = jnp.where(mask, rewards.astype(jnp.float32), 0.0)
  delta = r + gamma * v_next - v_now

  def step(a_next, xs):
    delta_t, m_t = xs
    a_t = jnp.where(m_t, delta_t + gamma * lam * a_next, 0.0)
    return a_t, a_t

  _, adv = jax.lax.scan(step, jnp.zeros((b,), jnp.float32), (delta.T, mask.T), reverse=True)
  adv = adv.T.astype(jnp.float32)
  return adv, jnp.where(mask, adv + v_now, 0.0)


def whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8, shift_mean: bool = True):
  """Masked whitening as PPO implementations apply to advantages, float32 of x's shape.

      mu = sum(m x) / sum(m),   var = sum(m (x - mu)^2) / sum(m)   (population, ddof=0)
      y  = (x - mu) / sqrt(var + eps)   (+ mu again if not shift_mean)

  over the positions where mask == 1 only; masked positions come back as 0 (their x, even NaN,
  is ignored). An all-zero mask gives all zeros. Raises ValueError if the shapes differ.
  """
  x = jnp.asarray(x)
  mask = jnp.asarray(mask)
  if mask.shape != x.shape:
    raise ValueError(f"whiten: mask shape {mask.shape} differs from x shape {x.shape}")
  m = mask > 0
  x = jnp.where(m, x.astype(jnp.float32), 0.0)
  n = jnp.maximum(m.sum(), 1).astype(jnp.float32)
  mu = x.sum() / n
  var = jnp.where(m, jnp.square(x - mu), 0.0).sum() / n
  y = (x - mu) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    y = y + mu
  return jnp.where(m, y, 0.0)


def token_rewards(sequence_rewards: jax.Array, mask: jax.Array, kl=None, kl_coef: float = 0.0):
  """Per-token PPO rewards [B, T] float32 (InstructGPT eq. 2; DeepSeekMath §4.1.1):

      r_t = -kl_coef * kl_t * m_t  +  R * [t is the row's last real token]

  sequence_rewards R [B] (the rule reward), mask m [B, T], kl [B, T] a per-token KL estimate
  against the reference policy (e.g. log pi_theta - log pi_ref), or None for no penalty. A row
  with no real token gets no reward. Raises ValueError for mismatched shapes.
  """
  mask = jnp.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"token_rewards: mask must be [B, T], got shape {mask.shape}")
  b, t = mask.shape
  seq = jnp.asarray(sequence_rewards)
  if seq.shape != (b,):
    raise ValueError(f"token_rewards: sequence_rewards has shape {seq.shape}; expected ({b},), "
                     f"one per mask row")
  m = mask > 0
  last = t - 1 - jnp.argmax(m[:, ::-1], axis=1)
  place = jax.nn.one_hot(last, t, dtype=jnp.float32) * m.any(axis=1, keepdims=True)
  out = place * seq.astype(jnp.float32)[:, None]
  if kl is not None:
    kl = _check_2d("token_rewards: kl", kl, (b, t)).astype(jnp.float32)
    out = out - kl_coef * jnp.where(m, kl, 0.0)
  return out


def informative_groups(rewards, group_size: int) -> np.ndarray:
  """bool [B]: the groups whose G rewards are not all equal (DAPO's dynamic sampling,
  arXiv 2503.14476 §3.2, keeps only these: a group of equal rewards has zero advantage under
  every group estimator and so no policy gradient). ``rewards`` [B * G] in group order."""
  r = np.asarray(rewards, np.float64).reshape(-1, group_size)
  return r.max(axis=1) > r.min(axis=1)
