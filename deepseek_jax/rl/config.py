"""The RL experiment config: the pretraining config (model, optimizer, mesh, checkpoint, ...)
plus ``init_from``, ``task`` (the prompt set) and ``rl`` (the algorithm), every field with its
default, and the checks that run before anything is compiled.

One RL step: ``rl.prompts_per_step`` prompts x ``rl.group_size`` sampled completions (the
rows), scored by the rule rewards, then ``rl.iterations`` (DeepSeekMath's mu) optimizer steps
on that batch with pi_old fixed. ``train.steps`` counts RL steps; ``train.seq_len`` is the row
length (prompt + completion); ``train.batch_size`` is not used (the rows are
prompts_per_step x group_size). Defaults follow DeepSeek-R1-Zero (REFERENCE.md §7) where a
toy CPU run allows.
"""

from __future__ import annotations

import math

import ml_collections

from deepseek_jax.rl.advantages import ESTIMATORS
from deepseek_jax.rl.losses import AGGREGATIONS, KL_ESTIMATORS
from deepseek_jax.rl.rewards import REWARDS
from deepseek_jax.train import config as train_config

ALGORITHMS = ("grpo", "ppo")


def default_config() -> ml_collections.ConfigDict:
  c = train_config.default_config()
  # Starting weights: a pretraining workdir (newest verified step), one step folder
  # .../checkpoints/N, a parameters checkpoint (convert --to_orbax), or a Hugging Face
  # DeepSeek directory (config.json + safetensors); the model settings must match it. Empty:
  # a random initialisation (only useful for tests).
  c.init_from = ""

  c.task = ml_collections.ConfigDict()
  c.task.source = "arithmetic"  # arithmetic | jsonl
  c.task.ops = "+-*"  # arithmetic: the operations
  c.task.max_operand = 9  # arithmetic: operands 0..max_operand
  c.task.eval_fraction = 0.2  # arithmetic: problems held out (never trained on)
  c.task.seed = 0  # arithmetic: the split
  c.task.train_path = ""  # jsonl: {"prompt": ..., "answer": ...} per line
  c.task.eval_path = ""
  # Prompts in the SFT chat template (<bos><|User|>prompt<|Assistant|>, train/sft.py): for a
  # policy fine-tuned on chat records. False: <bos>prompt, which a base model continues.
  c.task.chat_template = False

  r = c.rl = ml_collections.ConfigDict()
  r.algorithm = "grpo"  # grpo | ppo
  r.prompts_per_step = 32  # R1-Zero: 32 questions per step
  r.group_size = 16  # G; R1-Zero 16, DeepSeekMath 64
  r.max_new_tokens = 8  # completion budget L_max (tokens)
  r.temperature = 1.0
  r.top_k = 0
  r.top_p = 1.0
  # Completions stop at the tokenizer's eos and at each of these strings (one token each).
  r.stop = ("\n",)
  # mu: optimizer steps per rollout batch (pi_old fixed during them). The LR schedule, warmup
  # and optimizer.total_steps count optimizer steps: train.steps x mu.
  r.iterations = 1
  # pi_old from a forward pass of the rollout's parameters (True), or the log-probs generate
  # returned (False; exact only without top-k / top-p, equal to ~1e-5 in float32).
  r.recompute_old_log_probs = True
  # The loss (rl/losses.py): each an ablation switch.
  r.beta = 0.001  # KL weight; 0: no reference model is kept. R1-Zero 0.001, DeepSeekMath 0.04
  r.kl_estimator = "k3"  # k1 | k2 | k3
  r.epsilon_low = 0.2
  r.epsilon_high = 0.2  # DAPO clip-higher: 0.28
  r.loss_aggregation = "seq_mean_token_mean"  # | token_mean (DAPO) | constant_length (Dr. GRPO)
  r.advantage = "grpo"  # grpo (z-score) | drgrpo (mean only) | rloo (leave-one-out)
  r.advantage_eps = 1e-4
  r.ref_refresh_every = 0  # copy the policy into the reference every N steps (R1-Zero: 400)
  # DAPO dynamic sampling: drop groups whose accuracy rewards (else total rewards) are all
  # equal and sample more prompts to refill the batch, up to this many extra rollouts per step
  # (0: off).
  r.dynamic_sampling_rounds = 0
  # DAPO soft overlong punishment: the last `overlong_buffer` tokens of the budget cost up to
  # `overlong_penalty` reward (0: off).
  r.overlong_buffer = 0
  r.overlong_penalty = 1.0
  # Rule rewards: name -> weight, or name -> {weight, keyword arguments} (rl/rewards.py). All
  # three are computed and logged; weight 0 leaves one out of the total, so
  # --config.rl.rewards.format.weight=0.5 switches the format reward on. A whole new mapping:
  # "--config.rl.rewards={'accuracy': {'weight': 1.0, 'first_line': True}, 'format': 0.5}".
  r.rewards = ml_collections.ConfigDict({"accuracy": {"weight": 1.0, "first_line": True},
                                         "format": {"weight": 0.0},
                                         "language": {"weight": 0.0}})
  r.eval_every = 25  # held-out accuracy (greedy) every N steps; 0: at the end only
  r.eval_prompts = 0  # 0: the whole held-out split
  # Write the update's device memory (rl/memory.py: XLA memory analysis of the compiled policy
  # and value steps) into metrics.jsonl at the first step of a run; costs one extra compile.
  r.record_memory = False
  # PPO only (PPO uses the clip range and mu above, a token-mean loss with the KL in the
  # reward; advantage, loss_aggregation and beta are GRPO's). The value model trains with the
  # policy's optimizer settings.
  r.gamma = 1.0
  r.lam = 0.95
  r.kl_coef = 0.05  # per-token KL penalty in the reward (InstructGPT / DeepSeekMath PPO)
  r.clip_range_value = 0.2
  r.whiten_advantages = True
  r.value_learning_rate = 0.0  # 0: the policy's

  c.train.seq_len = 32
  c.train.steps = 200
  c.train.log_every = 1
  c.checkpoint.every = 50
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0
  c.optimizer.weight_decay = 0.0
  return c


# Fields that define what the saved prompt position points at.
DATA_POSITION_FIELDS = ("seed", "rl.prompts_per_step", "task.source", "task.ops",
                        "task.max_operand", "task.eval_fraction", "task.seed", "task.train_path")


def _fail(field: str, message: str):
  raise ValueError(f"config.{field}: {message}")


def validate_rl(config, batch_shards: int, n_processes: int) -> None:
  """The RL fields' checks (``train.config.validate`` checks the rest). Raises ValueError
  naming the field."""
  r = config.rl
  if r.algorithm not in ALGORITHMS:
    _fail("rl.algorithm", f"must be one of {ALGORITHMS}, got {r.algorithm!r}")
  if r.algorithm == "grpo" and r.group_size < 2:
    _fail("rl.group_size", f"GRPO needs G >= 2 completions per prompt (the group is the "
          f"baseline), got {r.group_size}")
  if r.group_size < 1 or r.prompts_per_step < 1:
    _fail("rl.prompts_per_step", "rl.prompts_per_step and rl.group_size must be >= 1")
  rows = r.prompts_per_step * r.group_size
  need = math.lcm(batch_shards, n_processes)
  if rows % need:
    _fail("rl.prompts_per_step", f"the {rows} rows (prompts_per_step x group_size) must be "
          f"divisible by the mesh's batch axes ({batch_shards}) and processes ({n_processes}); "
          f"use a multiple of {need}")
  for name in ("max_new_tokens", "iterations"):
    if r[name] < 1:
      _fail(f"rl.{name}", f"must be >= 1, got {r[name]}")
  if r.temperature <= 0:
    _fail("rl.temperature", f"must be > 0 (RL samples), got {r.temperature}")
  if not 0 < r.top_p <= 1 or r.top_k < 0:
    _fail("rl.top_p", f"top_p must be in (0, 1] and top_k >= 0, got {r.top_p}, {r.top_k}")
  if (r.top_k or r.top_p < 1) and not r.recompute_old_log_probs:
    _fail("rl.recompute_old_log_probs", "top-k / top-p sampling needs pi_old recomputed (the "
          "sampled distribution is truncated); set it to True")
  if r.beta < 0 or r.epsilon_low < 0 or r.epsilon_high < 0 or r.kl_coef < 0:
    _fail("rl.beta", "beta, epsilon_low, epsilon_high and kl_coef must be >= 0")
  if r.kl_estimator not in KL_ESTIMATORS:
    _fail("rl.kl_estimator", f"must be one of {KL_ESTIMATORS}, got {r.kl_estimator!r}")
  if r.loss_aggregation not in AGGREGATIONS:
    _fail("rl.loss_aggregation", f"must be one of {AGGREGATIONS}, got {r.loss_aggregation!r}")
  if r.advantage not in ESTIMATORS:
    _fail("rl.advantage", f"must be one of {ESTIMATORS}, got {r.advantage!r}")
  if not 0 <= r.overlong_buffer <= r.max_new_tokens:
    _fail("rl.overlong_buffer", f"must be in [0, rl.max_new_tokens={r.max_new_tokens}], got "
          f"{r.overlong_buffer}")
  if r.dynamic_sampling_rounds and r.algorithm != "grpo":
    _fail("rl.dynamic_sampling_rounds", "DAPO's dynamic sampling drops groups whose group "
          "advantages are all 0, which only the group estimators have; use 0 with PPO")
  if r.dynamic_sampling_rounds < 0 or r.ref_refresh_every < 0 or r.eval_every < 0:
    _fail("rl.dynamic_sampling_rounds", "dynamic_sampling_rounds, ref_refresh_every and "
          "eval_every must be >= 0")
  if not 0 <= r.lam <= 1 or not 0 <= r.gamma <= 1 or r.clip_range_value < 0:
    _fail("rl.lam", "gamma and lam must be in [0, 1] and clip_range_value >= 0")
  for name in r.rewards.keys():
    if name not in REWARDS:
      _fail(f"rl.rewards.{name}", f"unknown reward; choose from {sorted(REWARDS)}")
  if config.train.init_from:
    _fail("train.init_from", "RL starts from config.init_from; leave train.init_from empty")
  if config.train.grad_accum != 1 and rows % (config.train.grad_accum * need):
    _fail("train.grad_accum", f"must divide the {rows} rows into micro-batches divisible by "
          f"{need}")


def optimizer_config(config, learning_rate: float = 0.0):
  """config.optimizer for an RL run: ``total_steps`` -1 becomes train.steps x mu (the optimizer
  steps the run takes); ``learning_rate`` (if not 0) replaces the learning rate (PPO's value
  model)."""
  opt = config.optimizer.copy_and_resolve_references()
  with opt.unlocked():
    if opt.total_steps < 0:
      opt.total_steps = config.train.steps * config.rl.iterations
    if learning_rate:
      opt.learning_rate = learning_rate
  return opt
