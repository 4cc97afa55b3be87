"""The partitioned train step: one ``jax.jit`` over the train state, with explicit shardings.

    state  = TrainState(step, params, model_state, opt_state)   (an nnx split of the model + optax)
    state' = train_step(state, batch)

Inside: the batch [B, T] is split into ``grad_accum`` micro-batches scanned in sequence; every
loss term is normalised by counts over the whole batch, so the accumulated gradient equals the
gradient of the full batch. Then clipping + AdamW, and the auxiliary-loss-free router-bias
update from the expert load summed over the *global* batch (the batch is one global array
under jit, so the sum already spans every device and process).

Shardings come from the logical-axis rules (``parallel.partitioning``): parameters and Adam
moments share them, the step counter and metrics are replicated, the batch is split over the
batch axes. The state is donated: parameters are updated in place.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.transformer import abstract_model, create_model, router_bias_update
from deepseek_jax.parallel.mesh import under_mesh
from deepseek_jax.parallel.partitioning import (Rules, batch_sharding, state_shardings,
                                                tree_shardings_like)
from deepseek_jax.train.loss import batch_normalizers, loss_fn


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any  # nnx.State of nnx.Param
  model_state: Any  # nnx.State of the other variables (router biases)
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """Static parts of the step (hashable: they select the compiled program)."""

  grad_accum: int = 1
  lr_schedule: Callable = None  # step -> learning rate (for logging)
  mtp_weight: Callable = None  # step -> lambda, or None for the config's constant
  router_bias_rate: Callable = None  # step -> gamma


def abstract_train_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                         rules: Rules):
  """(graphdef, shardings, abstract) from abstract shapes only: ``shardings`` is a TrainState of
  NamedSharding, ``abstract`` a TrainState of ShapeDtypeStructs carrying them (a restore target)."""
  graphdef, params, rest = nnx.split(abstract_model(model_cfg), nnx.Param, ...)
  opt_state = jax.eval_shape(tx.init, params)
  param_sh, rest_sh = state_shardings(params, mesh, rules), state_shardings(rest, mesh, rules)
  opt_sh = tree_shardings_like(opt_state, params, param_sh, mesh)
  shardings = TrainState(NamedSharding(mesh, PartitionSpec()), param_sh, rest_sh, opt_sh)
  abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, rest, opt_state)
  abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                          abstract, shardings)
  return graphdef, shardings, abstract


def init_train_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                     rules: Rules, seed: int):
  """Initialise parameters and optimizer state directly in their shards."""
  graphdef, sh, _ = abstract_train_state(model_cfg, tx, mesh, rules)
  full_sh = nnx.merge_state(sh.params, sh.model_state)
  model = create_model(model_cfg, seed, shardings=full_sh)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(params)
  step = jax.device_put(jnp.int32(0), sh.step)
  return graphdef, TrainState(step, params, rest, opt_state), sh


def _split_micro(batch: dict, n: int, sharding=None) -> dict:
  """[B, ...] -> [n, B/n, ...] with micro-batch i = rows i, i+n, i+2n, ...: every device's
  contiguous block of rows splits evenly over the micro-batches, so each one stays sharded over
  the batch axes (a contiguous split would gather whole micro-batches onto every device)."""
  def split(x):
    x = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)
  return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict, *, graphdef, tx, options: StepOptions,
               model_cfg: ModelConfig, micro_sharding=None):
  """One optimizer step on a global batch. Returns (new state, metrics).

  With ``grad_accum`` micro-batches the result equals the full-batch step for the default
  per-sequence balance losses. Batch-scope balance losses and V2 capacity dropping are computed
  per micro-batch (as Megatron and DeepSpeed do), so they differ from one large batch."""
  n_micro = options.grad_accum
  norms = batch_normalizers(batch, model_cfg.n_mtp_modules, n_micro)
  lam = None if options.mtp_weight is None else options.mtp_weight(state.step)

  def loss_of(params, micro):
    model = nnx.merge(graphdef, params, state.model_state)
    return loss_fn(model, micro, mtp_weight=lam, normalizers=norms)

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)
  if n_micro == 1:
    (_, metrics), grads = grad_fn(state.params, batch)
  else:
    micro = _split_micro(batch, n_micro, micro_sharding)
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(grad_fn, state.params, first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][1], shapes[1]))

    def accumulate(carry, mb):
      (_, m), g = grad_fn(state.params, mb)
      return jax.tree.map(jnp.add, carry, (m, g)), None

    (metrics, grads), _ = jax.lax.scan(accumulate, zeros, micro)
    if "assignments" in metrics:
      metrics["dropped_fraction"] = metrics["dropped"] / jnp.maximum(metrics["assignments"], 1)
    for key in ("dispatch_per_token", "remote_per_token"):  # means, not sums
      if key in metrics:
        metrics[key] = metrics[key] / n_micro

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  model_state = state.model_state
  metrics = dict(metrics, grad_norm=optax.global_norm(grads))
  if options.lr_schedule is not None:
    metrics["learning_rate"] = options.lr_schedule(state.step)
  if lam is not None:
    metrics["mtp_weight"] = lam
  if "expert_load" in metrics and options.router_bias_rate is not None:
    gamma = options.router_bias_rate(state.step)
    model = nnx.merge(graphdef, params, model_state)
    router_bias_update(model, metrics["expert_load"], gamma)
    _, _, model_state = nnx.split(model, nnx.Param, ...)
    metrics["router_bias_rate"] = gamma
  return TrainState(state.step + 1, params, model_state, opt_state), metrics


def jit_train_step(model_cfg: ModelConfig, graphdef, tx, options: StepOptions,
                   shardings: TrainState, mesh: Mesh, rules: Rules):
  """The compiled step: explicit in/out shardings, the state donated, traced under the mesh
  (so MoE layers run expert-parallel when its expert axis is > 1)."""
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sh = batch_sharding(mesh, rules)
  micro_sh = NamedSharding(mesh, PartitionSpec(None, *batch_sh.spec))
  step = functools.partial(train_step, graphdef=graphdef, tx=tx, options=options,
                           model_cfg=model_cfg, micro_sharding=micro_sh)
  return under_mesh(jax.jit(step, in_shardings=(shardings, batch_sh),
                           out_shardings=(shardings, replicated), donate_argnums=(0,)), mesh)
