"""Pipeline-parallel pretraining loss: ``DeepSeekModel`` cut into stages over the mesh's
``stage`` axis and run by a schedule (``parallel.pipeline``: GPipe, 1F1B, DualPipe).

    loss = PipelinedPretrainLoss(n_mtp_modules, Schedule("dualpipe", PP, M), layers_per_stage)
    jit_train_step(..., loss=loss)        # the one train step; nothing else changes

The cut (V3 §3.2.1 trains PP16): the embedding and the dense layers run where a micro-batch
enters the pipeline, the final norm, the head and the MTP modules where it leaves (their
parameters are kept on every rank: ``outer``); the MoE stack is split into PP stages of
``layers_per_stage`` layers (uneven cuts are padded to the longest stage with masked layers,
``scan_blocks(layer_mask=)``). Rank r holds stage r, and with DualPipe also stage PP - 1 - r.

The loss is a ``Loss`` like ``PretrainLoss`` and equals it (value, gradients and metrics,
tested) when the balance terms are per sequence: each (grad_accum) micro-batch is split into
M pipeline micro-batches whose losses add up, with the normalisers of the whole batch (V2's
token dropping and batch-scope balance are computed per pipeline micro-batch instead). The
pipeline computes its gradients itself (forward and backward interleave by the schedule), so
the loss is a ``jax.custom_vjp`` whose backward pass returns them; the train step's
``value_and_grad`` is unchanged.

Errors (ValueError, before compiling): ``config.mesh.stage`` that does not divide the MoE
layers when even cuts are asked for; ``config.pipeline.layers_per_stage`` of the wrong length,
sum or with an empty stage; micro-batches that do not divide the batch rows; the schedule's own
checks (``Schedule``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from deepseek_jax.model.transformer import scan_blocks
from deepseek_jax.parallel.mesh import BATCH_AXES
from deepseek_jax.parallel.pipeline import STAGE_AXIS, Schedule, run_pipeline, stage_layers
from deepseek_jax.train.loss import Normalizers, batch_fields, batch_normalizers, head_loss
from deepseek_jax.train.moe_step import (BALANCE_TERMS, PER_TOKEN, finish_moe_metrics,
                                         moe_metrics)
from deepseek_jax.train.step import split_micro


@dataclasses.dataclass(frozen=True)
class StageCut:
  """Static tables of a cut: ``index`` [PP, V, Lc] the MoE layer in each chunk slot (padding
  repeats the stage's last layer, masked), ``mask`` [PP, Lc] which slots of model stage s are real,
  ``holders`` [L, V] / ``holder_on`` the (rank, chunk, slot) flat indices holding each layer."""

  layers: tuple[int, ...]
  chunks_per_rank: int

  @property
  def n_stages(self) -> int:
    return len(self.layers)

  @property
  def width(self) -> int:
    return max(self.layers)

  def stage_of(self, r: int, v: int) -> int:
    return r if v == 0 else self.n_stages - 1 - r

  def index(self) -> np.ndarray:
    starts = np.cumsum((0,) + self.layers[:-1])
    out = np.zeros((self.n_stages, self.chunks_per_rank, self.width), np.int32)
    for r in range(self.n_stages):
      for v in range(self.chunks_per_rank):
        s = self.stage_of(r, v)
        out[r, v] = starts[s] + np.minimum(np.arange(self.width), self.layers[s] - 1)
    return out

  def mask(self) -> np.ndarray:
    return np.arange(self.width)[None] < np.asarray(self.layers)[:, None]

  def holders(self) -> np.ndarray:
    """[L, V] flat index r * V * Lc + v * Lc + j of every copy of each layer."""
    out = [[] for _ in range(sum(self.layers))]
    starts = np.cumsum((0,) + self.layers[:-1])
    v_n, lc = self.chunks_per_rank, self.width
    for r in range(self.n_stages):
      for v in range(v_n):
        s = self.stage_of(r, v)
        for j in range(self.layers[s]):
          out[starts[s] + j].append((r * v_n + v) * lc + j)
    return np.asarray(out, np.int32)


@dataclasses.dataclass(frozen=True)
class PipelinedPretrainLoss:
  """``PretrainLoss`` run as a pipeline (see the module docstring): ``schedule`` over the
  mesh's stage axis, the MoE stack cut by ``layers_per_stage`` (empty: even)."""

  n_mtp_modules: int
  schedule: Schedule
  layers_per_stage: tuple = ()
  mtp_weight: Optional[Callable[[jax.Array], jax.Array]] = None

  def normalizers(self, batch: dict, n_micro: int) -> Normalizers:
    return batch_normalizers(batch, self.n_mtp_modules, n_micro)

  def __call__(self, model, batch: dict, *, normalizers: Normalizers, step: jax.Array):
    cfg = model.config
    if cfg.n_mtp_modules != self.n_mtp_modules:
      raise ValueError(f"PipelinedPretrainLoss(n_mtp_modules={self.n_mtp_modules}) for a model "
                       f"with n_mtp_modules={cfg.n_mtp_modules}")
    if model.moe_layers is None:
      raise ValueError("config.mesh.stage: pipeline parallelism cuts the MoE stack into stages, "
                       "and this model has no MoE layers; use mesh.stage=1")
    cut = StageCut(stage_layers(cfg.n_moe_layers, self.schedule.n_stages, self.layers_per_stage),
                   self.schedule.chunks_per_rank)
    rows, m = batch["inputs"].shape[0], self.schedule.n_micro
    if rows % m:
      raise ValueError(f"config.pipeline.micro_batches: {m} pipeline micro-batches do not "
                       f"divide the {rows} sequences of the (grad_accum) micro-batch")
    lam = jnp.asarray(cfg.mtp_loss_weight if self.mtp_weight is None else self.mtp_weight(step),
                      jnp.float32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    run = _pipelined(graphdef, self.schedule, cut)
    return run(params, rest, batch, normalizers, lam)

  def finish(self, metrics: dict, *, step: jax.Array, n_micro: int) -> dict:
    metrics = finish_moe_metrics(metrics, n_micro)
    if self.mtp_weight is not None:
      metrics["mtp_weight"] = self.mtp_weight(step)
    return metrics


def _is_stack(path) -> bool:
  return getattr(path[0], "key", None) == "moe_layers"


@functools.lru_cache(maxsize=32)
def _pipelined(graphdef, schedule: Schedule, cut: StageCut):
  """The custom-vjp loss (params, rest, batch, normalizers, lambda) -> (loss, metrics)."""

  @jax.custom_vjp
  def run(params, rest, batch, norm, lam):
    return _forward_backward(graphdef, schedule, cut, params, rest, batch, norm, lam)[0]

  def fwd(params, rest, batch, norm, lam):
    out, grads = _forward_backward(graphdef, schedule, cut, params, rest, batch, norm, lam)
    return out, grads

  def bwd(grads, cotangent):
    g = cotangent[0]
    return (jax.tree.map(lambda x: (x * g).astype(x.dtype), grads), None, None, None, None)

  run.defvjp(fwd, bwd)
  return run


def _forward_backward(graphdef, schedule: Schedule, cut: StageCut, params, rest, batch,
                      norm: Normalizers, lam):
  """((loss, metrics), d loss / d params) of the pipelined pretraining loss."""
  model = nnx.merge(graphdef, params, rest)
  cfg = model.config
  stack_gd, stack_p, stack_r = nnx.split(model.moe_layers, nnx.Param, ...)
  model.moe_layers = None
  shell_gd, outer_p, outer_r = nnx.split(model, nnx.Param, ...)
  m = schedule.n_micro
  scale = norm.balance / m  # each pipeline micro-batch's share of the per-sequence balance terms
  layer_mask = jnp.asarray(cut.mask())
  kw = dict(scan_layers=cfg.scan_layers, remat_policy=cfg.remat_policy)

  def context(data):
    _, _, _, segment_ids, positions, token_mask = batch_fields(data)
    if positions is None:
      b, t = data["inputs"].shape
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    return dict(positions=positions, segment_ids=segment_ids, mask=token_mask)

  def first_fn(outer, data):
    shell = nnx.merge(shell_gd, *outer)
    c = context(data)
    x = shell.embed(data["inputs"])
    x, _, _ = scan_blocks(shell.dense_layers, x, c["positions"], segment_ids=c["segment_ids"],
                          mask=c["mask"], **kw)
    return x

  def stage_fn(chunk, x, data, stage):
    c = context(data)
    x, _, stats = scan_blocks(nnx.merge(stack_gd, *chunk), x, c["positions"],
                              segment_ids=c["segment_ids"], mask=c["mask"],
                              layer_mask=layer_mask[stage], **kw)
    aux = sum(stats[term].sum() for term in BALANCE_TERMS) * scale
    return x, aux, stats

  def last_fn(outer, y, data):
    shell = nnx.merge(shell_gd, *outer)
    hidden = shell.final_norm(y)
    total, metrics, mtp_stats = head_loss(shell, shell.head(hidden), hidden, data, norm, lam)
    if mtp_stats is not None:
      total = total + sum(mtp_stats[term].sum() for term in BALANCE_TERMS) * scale
      metrics["mtp_moe_stats"] = mtp_stats
    return total, metrics

  micro = split_micro(batch, m)
  micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
      x, PartitionSpec(None, BATCH_AXES)), micro)
  index = jnp.asarray(cut.index())
  chunks = jax.tree.map(lambda a: a[index], (stack_p, stack_r))  # [PP, V, Lc, ...]

  def body(chunks, outer, micro):
    res = run_pipeline(schedule, first_fn, stage_fn, last_fn,
                       jax.tree.map(lambda a: a[0], chunks), outer, micro)
    total = jax.lax.psum(res.loss, STAGE_AXIS)
    metrics = jax.lax.psum(res.metrics, STAGE_AXIS)
    outer_grads = jax.lax.psum(res.outer_grads, STAGE_AXIS)
    lift = lambda tree: jax.tree.map(lambda a: a[None], tree)
    return total, metrics, lift(res.stats), lift(res.stage_grads), outer_grads

  staged = PartitionSpec(STAGE_AXIS)
  total, metrics, stats, stage_grads, outer_grads = jax.shard_map(
      body, in_specs=(staged, PartitionSpec(), PartitionSpec()),
      out_specs=(PartitionSpec(), PartitionSpec(), staged, staged, PartitionSpec()),
      axis_names={STAGE_AXIS}, check_vma=False)(chunks, (outer_p, outer_r), micro)

  # Chunk gradients back to the [L, ...] stack (copies of a layer summed), then all params.
  _, to_stack = jax.vjp(lambda p: jax.tree.map(lambda a: a[index], p), stack_p)
  (stack_grads,) = to_stack(jax.tree.map(lambda g, p: g.astype(p.dtype), stage_grads[0],
                                         jax.tree.map(lambda a: a[index], stack_p)))
  grads = _assemble(params, outer_grads[0], stack_grads)

  # Metrics as PretrainLoss reports them: MoE stats of every layer in order, then MTP's.
  holders = jnp.asarray(cut.holders())
  layer_stats = jax.tree.map(
      lambda a: a.reshape((-1,) + a.shape[3:])[holders].sum(1), stats)
  metrics = dict(metrics)
  mtp_stats = metrics.pop("mtp_moe_stats", None)
  all_stats = layer_stats if mtp_stats is None else jax.tree.map(
      lambda a, b: jnp.concatenate([a, b.astype(a.dtype)]), layer_stats, mtp_stats)
  moe = moe_metrics(all_stats, scale)
  for key in PER_TOKEN:
    if key in moe:
      moe[key] = moe[key] / m
  metrics.update(moe)
  metrics["loss"] = total
  return (total, metrics), grads


def _assemble(params, outer_grads, stack_grads):
  """A gradient tree shaped like ``params`` from the outer part (every top-level entry but the
  MoE stack, in order) and the stack's."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  outer, stack = iter(jax.tree.leaves(outer_grads)), iter(jax.tree.leaves(stack_grads))
  out = [(next(stack) if _is_stack(path) else next(outer)).astype(leaf.dtype)
         for path, leaf in leaves]
  return jax.tree.unflatten(treedef, out)
