"""Device memory of one RL update, from XLA's memory analysis of the compiled train steps.

GRPO's update holds the policy with its Adam moments and the frozen reference and runs the
policy step; PPO adds the value model, its Adam moments and the value step (review arXiv
2503.11486, experiment 2: GRPO drops the critic to save memory). Used by
``experiments/bench_rl.py`` and, with ``config.rl.record_memory``, by the RL loop, which writes
the figures into metrics.jsonl at the first step of a run.
"""

from __future__ import annotations

import jax


def tree_bytes(tree) -> int:
  """Bytes of every array in ``tree``."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def program_bytes(fn, *args) -> dict[str, int]:
  """{"argument", "output", "temp"}: bytes of the compiled ``fn(*args)`` (a jitted function;
  XLA's ``memory_analysis``). Compiles ``fn`` for these arguments if it was not yet."""
  mem = fn.lower(*args).compile().memory_analysis()
  return {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp")}


def update_memory(learner, state, batch) -> dict[str, int]:
  """Bytes of one update of ``learner`` (``grpo.Learner`` or ``ppo.Learner``) on ``batch``:
  ``policy_state`` (parameters + optimizer moments), ``reference``, ``policy_step_temp`` and,
  for PPO, ``value_state`` and ``value_step_temp``; ``update_peak`` is the largest of the
  update's phases: the reference and the policy step's arguments and temporaries (and, for
  PPO, the value state held meanwhile), or the value step with the policy and reference held.
  Device-agnostic figures: on CPU they are what the step would need on an accelerator."""
  policy_step = program_bytes(learner.step, state.policy, batch)
  reference = tree_bytes(state.ref) if state.ref is not None else 0
  out = {"policy_state": tree_bytes(state.policy), "reference": reference,
         "policy_step_temp": policy_step["temp"]}
  peak = reference + policy_step["argument"] + policy_step["temp"]
  if getattr(state, "value", None) is not None:
    value_step = program_bytes(learner.value_step, state.value, batch)
    out["value_state"] = tree_bytes(state.value)
    out["value_step_temp"] = value_step["temp"]
    peak = max(out["value_state"] + peak,
               reference + out["policy_state"] + value_step["argument"] + value_step["temp"])
  out["update_peak"] = peak
  return out
