"""The partitioned train step: one ``jax.jit`` over the train state, with explicit shardings.

    state  = TrainState(step, params, model_state, opt_state)   (an nnx split of the model + optax)
    state' = train_step(state, batch, loss=PretrainLoss(...), ...)

The step takes its objective (``loss.Loss``): pretraining, SFT, GRPO and PPO reuse this one
step with their own loss. Inside: the loss's normalisers are computed on the whole batch, the
batch [B, T] is split into ``grad_accum`` micro-batches scanned in sequence, and their
(additive) losses, gradients and metrics are summed, so the accumulated gradient equals the
gradient of the full batch. Then clipping + AdamW, and the auxiliary-loss-free router-bias
update (``moe_step.router_bias_post_step``) from the expert load summed over the *global*
batch (the batch is one global array under jit, so the sum already spans every device and
process). The metric ``state_finite`` (1.0/0.0) says whether the updated state is all finite.

Shardings come from the logical-axis rules (``parallel.partitioning``): parameters and Adam
moments share them, the step counter and metrics are replicated, the batch is split over the
batch axes. The state is donated: parameters are updated in place.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.execution import Execution, resolve_execution
from deepseek_jax.model.transformer import abstract_model, create_model
from deepseek_jax.parallel.mesh import under_mesh
from deepseek_jax.parallel.partitioning import (Rules, batch_sharding, state_shardings,
                                                tree_shardings_like)
from deepseek_jax.train.loss import Loss, PretrainLoss
from deepseek_jax.train.moe_step import router_bias_post_step


class TrainState(NamedTuple):
  """Everything a step updates: the step counter, the model's parameters (``nnx.Param``) and
  other variables (router biases) as ``nnx.State``s of one ``nnx.split``, and the optimizer
  state. A pytree; checkpoints save it whole."""

  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any  # nnx.State of nnx.Param
  model_state: Any  # nnx.State of the other variables (router biases)
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """Static parts of the step (hashable: they select the compiled program)."""

  grad_accum: int = 1
  lr_schedule: Callable = None  # step -> learning rate (for logging)
  router_bias_rate: Callable = None  # step -> gamma; None: no bias update


def abstract_train_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                         rules: Rules, execution: Optional[Execution] = None):
  """(graphdef, shardings, abstract) from abstract shapes only: ``shardings`` is a TrainState of
  NamedSharding, ``abstract`` a TrainState of ShapeDtypeStructs carrying them (a restore target).
  The graphdef runs per ``execution`` (default ``resolve_execution(model_cfg, mesh)``)."""
  model = abstract_model(model_cfg, execution or resolve_execution(model_cfg, mesh))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = jax.eval_shape(tx.init, params)
  param_sh, rest_sh = state_shardings(params, mesh, rules), state_shardings(rest, mesh, rules)
  opt_sh = tree_shardings_like(opt_state, params, param_sh, mesh)
  shardings = TrainState(NamedSharding(mesh, PartitionSpec()), param_sh, rest_sh, opt_sh)
  abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, rest, opt_state)
  abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                          abstract, shardings)
  return graphdef, shardings, abstract


def init_train_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                     rules: Rules, seed: int, execution: Optional[Execution] = None):
  """Initialise parameters and optimizer state directly in their shards. Returns (graphdef,
  TrainState, shardings); the graphdef runs per ``execution`` (default: resolved for mesh)."""
  execution = execution or resolve_execution(model_cfg, mesh)
  graphdef, sh, _ = abstract_train_state(model_cfg, tx, mesh, rules, execution)
  full_sh = nnx.merge_state(sh.params, sh.model_state)
  model = create_model(model_cfg, seed, shardings=full_sh, execution=execution)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(params)
  step = jax.device_put(jnp.int32(0), sh.step)
  return graphdef, TrainState(step, params, rest, opt_state), sh


def split_micro(batch: dict, n: int, sharding=None) -> dict:
  """[B, ...] -> [n, B/n, ...] with micro-batch i = rows i, i+n, i+2n, ...: every device's
  contiguous block of rows splits evenly over the micro-batches, so each one stays sharded over
  the batch axes (a contiguous split would gather whole micro-batches onto every device)."""
  def split(x):
    x = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)
  return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict, *, graphdef, tx, loss: Loss,
               options: StepOptions, micro_sharding=None):
  """One optimizer step of ``loss`` on a global batch. Returns (new state, metrics).

  With ``grad_accum`` micro-batches the result equals the full-batch step for losses whose
  normalisers cover the whole batch (the pretraining loss with per-sequence balance terms).
  Batch-scope balance losses and V2 capacity dropping are computed per micro-batch (as
  Megatron and DeepSpeed do), so they differ from one large batch."""
  n_micro = options.grad_accum
  norms = loss.normalizers(batch, n_micro)

  def loss_of(params, micro):
    model = nnx.merge(graphdef, params, state.model_state)
    return loss(model, micro, normalizers=norms, step=state.step)

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)
  if n_micro == 1:
    (_, metrics), grads = grad_fn(state.params, batch)
  else:
    micro = split_micro(batch, n_micro, micro_sharding)
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(grad_fn, state.params, first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][1], shapes[1]))

    def accumulate(carry, mb):
      (_, m), g = grad_fn(state.params, mb)
      return jax.tree.map(jnp.add, carry, (m, g)), None

    (metrics, grads), _ = jax.lax.scan(accumulate, zeros, micro)
  metrics = loss.finish(metrics, step=state.step, n_micro=n_micro)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, grad_norm=optax.global_norm(grads))
  if options.lr_schedule is not None:
    metrics["learning_rate"] = options.lr_schedule(state.step)
  gamma = None if options.router_bias_rate is None else options.router_bias_rate(state.step)
  model_state, metrics = router_bias_post_step(graphdef, params, state.model_state, metrics, gamma)
  metrics["state_finite"] = all_finite((params, model_state, opt_state)).astype(jnp.float32)
  return TrainState(state.step + 1, params, model_state, opt_state), metrics


def all_finite(tree) -> jax.Array:
  """bool scalar: every floating-point entry of ``tree`` is finite (the updated parameters,
  router biases and optimizer moments: a checkpoint is only saved when this holds)."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def jit_train_step(model_cfg: ModelConfig, graphdef, tx, options: StepOptions,
                   shardings: TrainState, mesh: Mesh, rules: Rules, loss: Optional[Loss] = None):
  """The compiled step of ``loss`` (default: ``PretrainLoss`` of ``model_cfg``): explicit in/out
  shardings, the state donated, traced under the mesh (expert-parallel MoE layers and per-shard
  kernels run inside ``shard_map`` over it)."""
  loss = loss or PretrainLoss(model_cfg.n_mtp_modules)
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sh = batch_sharding(mesh, rules)
  micro_sh = NamedSharding(mesh, PartitionSpec(None, *batch_sh.spec))
  step = functools.partial(train_step, graphdef=graphdef, tx=tx, loss=loss, options=options,
                           micro_sharding=micro_sh)
  return under_mesh(jax.jit(step, in_shardings=(shardings, batch_sh),
                           out_shardings=(shardings, replicated), donate_argnums=(0,)), mesh)


def benchmark_train_step(model_cfg: ModelConfig, batch: int, seq_len: int, *,
                         options: Optional[StepOptions] = None, seed: int = 0):
  """The pretraining step as the benchmarks and profiles time it: AdamW from the default
  training config (1,000 total steps), an FSDP mesh over every local device, ``batch``
  sequences of ``seq_len`` random tokens in [3, vocab) (seed 0). Returns (step_fn, state,
  data): ``step_fn(state, data) -> (state, metrics)`` with ``state`` donated."""
  import numpy as np
  from deepseek_jax.parallel.mesh import make_mesh
  from deepseek_jax.parallel.partitioning import get_rules
  from deepseek_jax.train.config import default_config
  from deepseek_jax.train.optimizer import make_optimizer
  opt = default_config().optimizer
  opt.total_steps = 1000
  tx = make_optimizer(opt)
  mesh, rules = make_mesh(dict(fsdp=-1)), get_rules("fsdp")
  graphdef, state, sh = init_train_state(model_cfg, tx, mesh, rules, seed=seed)
  step_fn = jit_train_step(model_cfg, graphdef, tx, options or StepOptions(), sh, mesh, rules)
  tokens = np.random.default_rng(0).integers(3, model_cfg.vocab_size, (batch, seq_len + 1))
  tokens = jnp.asarray(tokens.astype(np.int32))
  data = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                         "mask": jnp.ones((batch, seq_len), jnp.float32)},
                        batch_sharding(mesh, rules))
  return step_fn, state, data
