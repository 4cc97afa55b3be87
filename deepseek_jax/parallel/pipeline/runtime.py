"""Run a pipeline schedule inside ``jax.shard_map`` over the mesh's ``stage`` axis: every rank
executes the same tick loop and reads its own column of the timetable; activations go to the
next rank and gradients to the previous one with ``lax.ppermute``.

Axis legend (one rank's view): V model stages held by this rank (2 for DualPipe), M
micro-batches, S activation (stash) slots, G gradient slots, X one micro-batch's activation
[mb, T, D].

The model is given as three functions (this module knows nothing of the model):

    first_fn(outer, data)                -> x        the embedding (and dense layers) on the
                                                     rank where a micro-batch enters
    stage_fn(chunk, x, data, stage)      -> (y, aux, stats)
                                                     one model stage: ``chunk`` is its
                                                     parameters, ``stage`` its index (traced),
                                                     ``aux`` a scalar loss term (MoE balance)
    last_fn(outer, y, data)              -> (loss, metrics)
                                                     head and loss where the micro-batch leaves

Each tick a rank runs one forward (F) slot and one backward (B) slot. There is no ``lax.cond``
on the rank: a collective that the partitioner places inside a branch (resharding over the
data or expert axes) would wait forever for the ranks that took the other branch. So an idle
slot computes on stale buffers and its results are masked out (bubble ticks cost a full tick,
as they do in wall time anyway): every F slot evaluates ``first_fn``, every B slot ``first_fn``
and ``last_fn``, each kept only where the micro-batch enters / leaves. That is the price of no
branches: per tick and rank, one embedding + dense-layer pass more than needed in F, and the
head, MTP and loss forward and backward in B (about one layer plus the head for V3). F computes the stage output and sends it
on. B *recomputes* the stage from its stashed input (stage-level activation recomputation: a
rank holds one input [mb, T, D] per micro-batch in flight, the timetable's stash slots, never
the stage's internal activations) and pulls the received output gradient back through it with
``jax.vjp``: the parameter gradient is accumulated, the input gradient sent to the previous
rank. Where a micro-batch enters, B also differentiates ``first_fn``; where it leaves,
``last_fn`` (its loss gets cotangent 1), so the returned gradients are those of
sum over micro-batches of (last_fn's loss + every stage's aux).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.parallel.pipeline.schedules import Schedule, Timetable, timetable

STAGE_AXIS = "stage"


class PipelineResult(NamedTuple):
  """One rank's sums over the micro-batches it finished (psum over the stage axis for the
  whole pipeline's: every term is counted on exactly one rank)."""

  loss: jax.Array  # f32 scalar: last_fn losses (leaving rank) + stage aux terms
  metrics: dict  # last_fn's metrics, summed (zero on other ranks)
  stats: object  # stage_fn's stats per held chunk, leading [V], summed over micro-batches
  stage_grads: object  # d loss / d chunks, leading [V]
  outer_grads: object  # d loss / d outer (first_fn and last_fn parts of this rank)


class _Ticks(NamedTuple):
  """The timetable as per-tick, per-rank int32 columns the loop indexes ([N, PP] each)."""

  f_mb: np.ndarray  # micro-batch forwarded (0 when idle)
  f_on: np.ndarray  # 1 if a forward runs
  f_chunk: np.ndarray  # which of the rank's V chunks
  f_stage: np.ndarray  # model stage index
  f_first: np.ndarray  # 1 where the micro-batch enters (input from first_fn)
  f_read: np.ndarray  # stash slot of the input (S = the spare slot)
  b_mb: np.ndarray
  b_on: np.ndarray
  b_chunk: np.ndarray
  b_stage: np.ndarray
  b_first: np.ndarray
  b_last: np.ndarray  # 1 where the micro-batch leaves (loss computed here)
  b_read: np.ndarray  # stash slot
  b_grad: np.ndarray  # gradient slot (G = the spare slot)
  send_up: np.ndarray  # 1: F output goes to rank r + 1
  send_down: np.ndarray  # 1: F output goes to rank r - 1
  grad_up: np.ndarray  # 1: B input-gradient goes to rank r + 1
  grad_down: np.ndarray
  recv_below: np.ndarray  # stash slot for what rank r - 1 sent up (S: none)
  recv_above: np.ndarray  # stash slot for what rank r + 1 sent down
  grad_below: np.ndarray  # gradient slot for what rank r - 1 sent up (G: none)
  grad_above: np.ndarray


def _ticks(schedule: Schedule, table: Timetable) -> _Ticks:
  pp, m = schedule.n_stages, schedule.n_micro
  n = table.n_ticks
  spare_s, spare_g = table.n_stash, table.n_grad
  cols = {name: np.zeros((n, pp), np.int32) for name in _Ticks._fields}
  paths = [schedule.path(i) for i in range(m)]
  for t in range(n):
    for r in range(pp):
      for kind, mb in (("f", table.forward[t, r]), ("b", table.backward[t, r])):
        if mb < 0:
          cols[f"{kind}_read"][t, r] = spare_s
          if kind == "b":
            cols["b_grad"][t, r] = spare_g
          continue
        k = paths[mb].index(r)
        d = schedule.direction(mb)
        cols[f"{kind}_mb"][t, r], cols[f"{kind}_on"][t, r] = mb, 1
        cols[f"{kind}_chunk"][t, r] = d if schedule.chunks_per_rank == 2 else 0
        cols[f"{kind}_stage"][t, r] = k
        cols[f"{kind}_first"][t, r] = k == 0
        cols[f"{kind}_read"][t, r] = spare_s if k == 0 else table.stash_slot[mb, r]
        nxt = paths[mb][k + 1] if k < pp - 1 else None
        prv = paths[mb][k - 1] if k > 0 else None
        if kind == "f" and nxt is not None:
          cols["send_up" if nxt == r + 1 else "send_down"][t, r] = 1
        if kind == "b":
          cols["b_last"][t, r] = k == pp - 1
          cols["b_grad"][t, r] = spare_g if k == pp - 1 else table.grad_slot[mb, r]
          if prv is not None:
            cols["grad_up" if prv == r + 1 else "grad_down"][t, r] = 1
    for r in range(pp):  # where this tick's sends land (written at the end of the tick)
      below, above = r - 1, r + 1
      cols["recv_below"][t, r] = cols["recv_above"][t, r] = spare_s
      cols["grad_below"][t, r] = cols["grad_above"][t, r] = spare_g
      if below >= 0 and cols["send_up"][t, below]:
        cols["recv_below"][t, r] = table.stash_slot[table.forward[t, below], r]
      if above < pp and cols["send_down"][t, above]:
        cols["recv_above"][t, r] = table.stash_slot[table.forward[t, above], r]
      if below >= 0 and cols["grad_up"][t, below]:
        cols["grad_below"][t, r] = table.grad_slot[table.backward[t, below], r]
      if above < pp and cols["grad_down"][t, above]:
        cols["grad_above"][t, r] = table.grad_slot[table.backward[t, above], r]
  return _Ticks(**cols)


def _zeros(tree):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def _index(tree, i):
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def _add_at(acc, i, value):
  return jax.tree.map(lambda a, v: a.at[i].add(v.astype(a.dtype)), acc, value)


def run_pipeline(schedule: Schedule, first_fn: Callable, stage_fn: Callable, last_fn: Callable,
                 chunks, outer, micro_data, *, axis: str = STAGE_AXIS) -> PipelineResult:
  """One rank's part of a pipelined forward + backward over ``micro_data`` (a pytree whose
  leaves have a leading [M] micro-batch axis; every rank sees all of it). ``chunks``: this
  rank's stage parameters, leading [V] (V = ``schedule.chunks_per_rank``); ``outer``: the
  parameters of ``first_fn`` / ``last_fn`` (the same on every rank). Call inside
  ``jax.shard_map`` with ``axis`` manual; returns this rank's ``PipelineResult``."""
  table = timetable(schedule)
  ticks = _ticks(schedule, table)
  pp = schedule.n_stages
  if jax.lax.axis_size(axis) != pp:
    raise ValueError(f"config.mesh.stage: the schedule has {pp} stages but the mesh's {axis!r} "
                     f"axis has {jax.lax.axis_size(axis)}")
  me = jax.lax.axis_index(axis)
  columns = jax.tree.map(lambda a: jnp.asarray(a)[:, me], ticks)  # [N] each, this rank's

  data0 = _index(micro_data, 0)
  x_shape = jax.eval_shape(first_fn, outer, data0)
  chunk0 = _index(chunks, 0)
  y_shape, _, stats_shape = jax.eval_shape(stage_fn, chunk0, x_shape, data0, jnp.int32(0))
  _, metrics_shape = jax.eval_shape(last_fn, outer, y_shape, data0)

  def backward(chunk, x_stash, data, stage, first, last, on, g_y):
    def full(chunk, outer, x_stash):
      x = jnp.where(first, first_fn(outer, data), x_stash)
      y, aux, stats = stage_fn(chunk, x, data, stage)
      loss, metrics = last_fn(outer, y, data)
      return (y, aux + jnp.where(last, loss, 0.0)), (stats, metrics)

    (_, total), vjp, (stats, metrics) = jax.vjp(full, chunk, outer, x_stash, has_aux=True)
    g_y = jnp.where(on & ~last, g_y, jnp.zeros_like(g_y))
    d_chunk, d_outer, d_x = vjp((g_y, on.astype(total.dtype)))
    keep = lambda tree, cond: jax.tree.map(lambda a: jnp.where(cond, a, jnp.zeros_like(a)), tree)
    return (jnp.where(on, total, 0.0), keep(metrics, on & last), keep(stats, on), d_chunk,
            d_outer, d_x)

  def tick(carry, col):
    stash, grads, acc = carry
    data_f, data_b = _index(micro_data, col.f_mb), _index(micro_data, col.b_mb)
    # No lax.cond on the rank: collectives the partitioner puts inside a branch would wait for
    # ranks that took the other one. Idle slots compute on stale buffers and are masked out.
    x = jnp.where(col.f_first.astype(bool), first_fn(outer, data_f), stash[col.f_read])
    y = stage_fn(_index(chunks, col.f_chunk), x, data_f, col.f_stage)[0]
    total, metrics, stats, d_chunk, d_outer, d_x = backward(
        _index(chunks, col.b_chunk), stash[col.b_read], data_b, col.b_stage,
        col.b_first.astype(bool), col.b_last.astype(bool), col.b_on.astype(bool),
        grads[col.b_grad])
    acc = PipelineResult(acc.loss + total, jax.tree.map(jnp.add, acc.metrics, metrics),
                         _add_at(acc.stats, col.b_chunk, stats),
                         _add_at(acc.stage_grads, col.b_chunk, d_chunk),
                         jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc.outer_grads,
                                      d_outer))

    up = [(i, i + 1) for i in range(pp - 1)]
    down = [(i + 1, i) for i in range(pp - 1)]
    keep = lambda on, v: jnp.where(on.astype(bool), v, jnp.zeros_like(v))
    stash = stash.at[col.recv_below].set(jax.lax.ppermute(keep(col.send_up, y), axis, up))
    grads = grads.at[col.grad_above].set(jax.lax.ppermute(keep(col.grad_down, d_x), axis, down))
    if schedule.chunks_per_rank == 2:  # the second direction flows the other way
      stash = stash.at[col.recv_above].set(jax.lax.ppermute(keep(col.send_down, y), axis, down))
      grads = grads.at[col.grad_below].set(jax.lax.ppermute(keep(col.grad_up, d_x), axis, up))
    return (stash, grads, acc), None

  stash = jnp.zeros((table.n_stash + 1,) + x_shape.shape, x_shape.dtype)
  grads = jnp.zeros((table.n_grad + 1,) + y_shape.shape, y_shape.dtype)
  f32 = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), tree)
  acc = PipelineResult(jnp.zeros((), jnp.float32), f32(metrics_shape),
                       jax.tree.map(lambda s: jnp.zeros((schedule.chunks_per_rank,) + s.shape,
                                                        jnp.float32), stats_shape),
                       f32(chunks), f32(outer))
  (_, _, acc), _ = jax.lax.scan(tick, (stash, grads, acc), columns)
  return acc

