"""Pipeline schedules as static timetables: which micro-batch each pipeline rank runs forward
(F) and backward (B) at every tick, and the buffer slots that hold activations in between.

Axis legend: PP pipeline ranks (the mesh's ``stage`` axis), M micro-batches per step, N ticks.

A schedule is a per-rank *order* of operations: ``F m``, ``B m``, or ``FB (m_f, m_b)`` (the
forward of one micro-batch and the backward of another in the same tick, overlapped, as
DualPipe does). ``timetable`` turns the orders into ticks: every rank runs its next operation
at the first tick where its inputs have arrived, i.e. the previous rank's F (or the next rank's
B) finished at an earlier tick (point-to-point sends take one tick), and after its own F (an
earlier tick, or the same ``FB`` tick where the micro-batch leaves the pipeline). A tick does at
most one F and one B per rank. The runtime (``runtime.run_pipeline``) computes both slots on
every rank every tick and masks idle ones, so a step costs ``n_ticks`` x (F + B) in time;
``busy()`` is the share of F/B slots that hold a micro-batch. Three schedules:

* ``gpipe``  (Huang et al. 2019): all M forwards, then all M backwards. Activations of all M
  micro-batches are held at once.
* ``1f1b``   (PipeDream-flush, Narayanan et al. 2021): rank r runs PP - r - 1 warm-up forwards,
  then pairs F(i + PP - r - 1) with B(i), then the remaining backwards. At most PP - r
  micro-batches are in flight on rank r. Bubble (PP - 1)(F + B).
* ``dualpipe`` (DeepSeek-V3 §3.2.1, Fig. 5): bidirectional. Each rank holds two model stages
  (rank r: stage r for micro-batches fed from rank 0, stage PP - 1 - r for those fed from rank
  PP - 1), so parameters are stored twice; half the micro-batches enter at each end; in the
  steady phase every tick overlaps the forward of one direction with the backward of the other.
  The per-rank order follows DualPipe's eight phases (warm-up forwards, F0F1, B1F1, the main
  F0B1/F1B0 pairs, B1F1B0, B1B0, B0, W). We do not split the backward into input-gradient (B)
  and weight-gradient (W) parts (zero-bubble), so the phases' W steps are empty; the paper's
  bubble (PP/2 - 1)(F&B + B - 3W) counts the W that split would move into the bubble.

Errors: ValueError naming the field (``pipeline.schedule``, ``mesh.stage``,
``pipeline.micro_batches``) for an unknown schedule, fewer than 2 stages, an odd stage count
or micro-batch count for DualPipe, or too few micro-batches.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

SCHEDULES = ("gpipe", "1f1b", "dualpipe")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """``name`` in SCHEDULES over ``n_stages`` = PP ranks with ``n_micro`` = M micro-batches."""

  name: str
  n_stages: int
  n_micro: int

  def __post_init__(self):
    if self.name not in SCHEDULES:
      raise ValueError(f"config.pipeline.schedule: must be one of {SCHEDULES}, got {self.name!r}")
    pp, m = self.n_stages, self.n_micro
    if pp < 2:
      raise ValueError(f"config.mesh.stage: a pipeline needs >= 2 stages, got {pp}")
    if m < 1:
      raise ValueError(f"config.pipeline.micro_batches: must be >= 1, got {m}")
    if self.name == "dualpipe":
      if pp % 2:
        raise ValueError(f"config.mesh.stage: dualpipe pairs rank r with rank PP - 1 - r and "
                         f"needs an even stage count, got {pp}; use 1f1b or an even mesh.stage")
      if m % 2 or m < 2 * pp:
        raise ValueError(f"config.pipeline.micro_batches: dualpipe feeds half the micro-batches "
                         f"from each end and needs an even count >= 2 x stages = {2 * pp}, got "
                         f"{m}")

  @property
  def chunks_per_rank(self) -> int:
    """Model stages each rank holds: 2 for DualPipe (stage r and PP - 1 - r), else 1."""
    return 2 if self.name == "dualpipe" else 1

  def direction(self, m: int) -> int:
    """0: micro-batch m enters at rank 0 and leaves at rank PP - 1; 1: the reverse."""
    return int(self.name == "dualpipe" and m >= self.n_micro // 2)

  def path(self, m: int) -> list[int]:
    """The ranks micro-batch m visits, model stage 0 first."""
    ranks = list(range(self.n_stages))
    return ranks[::-1] if self.direction(m) else ranks

  def rank_ops(self, r: int) -> list[tuple]:
    """Rank r's operations in order: ("F", m), ("B", m) or ("FB", m_f, m_b)."""
    pp, m = self.n_stages, self.n_micro
    if self.name == "gpipe":
      return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    if self.name == "1f1b":
      warm = min(pp - r - 1, m)
      ops = [("F", i) for i in range(warm)]
      ops += [("FB", warm + i, i) for i in range(m - warm)]
      return ops + [("B", i) for i in range(m - warm, m)]
    return _dualpipe_ops(r, pp, m)


def _dualpipe_ops(r: int, pp: int, m: int) -> list[tuple]:
  """DualPipe's per-rank order (phases 1-8 of its step), W folded into B. Phase 0 is the
  direction whose first stage is on this rank's half of the pipeline."""
  half, h, n = pp // 2, min(r, pp - 1 - r), m // 2
  own = 0 if r < half else 1  # the direction of phase 0
  next_f, next_b = [0, 0], [0, 0]

  def mb(phase, counters):
    d = own if phase == 0 else 1 - own
    i = counters[phase]
    counters[phase] += 1
    return i + d * n

  f = lambda p: ("F", mb(p, next_f))
  b = lambda p: ("B", mb(p, next_b))
  fb = lambda pf, pb: ("FB", mb(pf, next_f), mb(pb, next_b))
  ops = [f(0) for _ in range(2 * (half - h - 1))]  # 1: nF0
  for _ in range(h + 1):  # 2: nF0F1
    ops += [f(0), f(1)]
  for _ in range(half - h - 1):  # 3: nB1W1F1
    ops += [b(1), f(1)]
  for i in range(n - pp + h + 1):  # 4: nF0B1F1B0 (the middle ranks do not overlap the first)
    ops += [f(0), b(1)] if (i == 0 and h == half - 1) else [fb(0, 1)]
    ops.append(fb(1, 0))
  for _ in range(half - h - 1):  # 5: nB1F1B0
    ops += [b(1), fb(1, 0)]
  for _ in range(h + 1):  # 6: nB1B0
    ops += [b(1), b(0)]
  ops += [b(0) for _ in range(half - h - 1)]  # 7: nWB0 (8: nW is empty without the W split)
  return ops


class Timetable(NamedTuple):
  """A schedule laid out in ticks (arrays [N, PP], -1 = idle) with its buffer slots.

  ``stash_slot`` [M, PP]: the activation slot that holds micro-batch m's input to rank r's
  stage from its arrival until its backward (-1 on the rank where m enters: it recomputes from
  the tokens). ``grad_slot`` [M, PP]: the slot holding dL/d(output) of rank r's stage from the
  next rank's backward until rank r's (-1 where m leaves: its loss is computed there).
  """

  forward: np.ndarray  # [N, PP] micro-batch run forward, or -1
  backward: np.ndarray  # [N, PP]
  stash_slot: np.ndarray  # [M, PP]
  grad_slot: np.ndarray  # [M, PP]
  n_stash: int
  n_grad: int

  @property
  def n_ticks(self) -> int:
    return self.forward.shape[0]

  def in_flight(self) -> int:
    """Peak number of micro-batches whose F has run and B has not, on any rank: the activation
    memory the schedule's formula counts (GPipe M, 1F1B PP, DualPipe PP + 1)."""
    live = np.cumsum(self.forward >= 0, 0) - np.cumsum(self.backward >= 0, 0)
    return int((live + (self.backward >= 0)).max())

  def busy(self) -> float:
    """Fraction of (rank, tick, F/B) slots doing work; 1 - busy() is the bubble in ticks."""
    return float(((self.forward >= 0).sum() + (self.backward >= 0).sum())
                 / (2 * self.forward.size))


def timetable(schedule: Schedule) -> Timetable:
  """Lay out ``schedule`` in ticks (see the module docstring). Raises RuntimeError if the
  per-rank orders deadlock (a schedule bug, never a user error)."""
  pp, m = schedule.n_stages, schedule.n_micro
  orders = [schedule.rank_ops(r) for r in range(pp)]
  for r, ops in enumerate(orders):
    fs = sorted(x for op in ops for x in ([op[1]] if op[0] in ("F", "FB") else []))
    bs = sorted(op[-1] for op in ops if op[0] in ("B", "FB"))
    assert fs == bs == list(range(m)), (schedule, r)
  paths = [schedule.path(i) for i in range(m)]
  done_f = np.full((m, pp), -1)  # tick at which rank r finished F of m
  done_b = np.full((m, pp), -1)
  pos = [0] * pp
  fwd, bwd = [], []

  def ready_f(i, r, t):
    k = paths[i].index(r)
    return k == 0 or 0 <= done_f[i, paths[i][k - 1]] < t

  def ready_b(i, r, t, paired_f=-1):
    k = paths[i].index(r)
    after = k == pp - 1 or 0 <= done_b[i, paths[i][k + 1]] < t
    return after and (paired_f == i or 0 <= done_f[i, r] < t)

  t = 0
  while any(p < len(o) for p, o in zip(pos, orders)):
    row_f, row_b = [-1] * pp, [-1] * pp
    for r in range(pp):
      if pos[r] == len(orders[r]):
        continue
      op = orders[r][pos[r]]
      if op[0] == "F" and ready_f(op[1], r, t):
        row_f[r] = op[1]
      elif op[0] == "B" and ready_b(op[1], r, t):
        row_b[r] = op[1]
      elif op[0] == "FB" and ready_f(op[1], r, t) and ready_b(op[2], r, t, op[1]):
        row_f[r], row_b[r] = op[1], op[2]
      else:
        continue
      pos[r] += 1
    if row_f == row_b == [-1] * pp:
      raise RuntimeError(f"pipeline schedule {schedule} deadlocks at tick {t}")
    for r in range(pp):
      if row_f[r] >= 0:
        done_f[row_f[r], r] = t
      if row_b[r] >= 0:
        done_b[row_b[r], r] = t
    fwd.append(row_f)
    bwd.append(row_b)
    t += 1

  stash = [[] for _ in range(pp)]  # per rank: (written at end of tick, last read at tick, m)
  grads = [[] for _ in range(pp)]
  for i, path in enumerate(paths):
    for k, r in enumerate(path):
      if k > 0:
        stash[r].append((done_f[i, path[k - 1]], done_b[i, r], i))
      if k < pp - 1:
        grads[r].append((done_b[i, path[k + 1]], done_b[i, r], i))
  stash_slot, n_stash = _allocate(stash, m, pp)
  grad_slot, n_grad = _allocate(grads, m, pp)
  return Timetable(np.asarray(fwd, np.int32), np.asarray(bwd, np.int32), stash_slot, grad_slot,
                   n_stash, n_grad)


def _allocate(intervals, m: int, pp: int):
  """Slots for buffer lifetimes (write at the end of tick a, read during tick b >= a + 1): a
  slot is reused once its holder has been read (greedy interval colouring, which is optimal:
  the slot count is the peak number of live buffers on any rank)."""
  slot = np.full((m, pp), -1, np.int32)
  n = 0
  for r, items in enumerate(intervals):
    free_at = []  # per slot: the tick its holder is read
    for write, read, i in sorted(items):
      for s, busy_until in enumerate(free_at):
        if busy_until <= write:
          free_at[s] = read
          break
      else:
        s = len(free_at)
        free_at.append(read)
      slot[i, r] = s
    n = max(n, len(free_at))
  return slot, n


class Analysis(NamedTuple):
  """What ``analyse`` reports for one schedule (times in units of one stage's F)."""

  name: str
  n_stages: int
  ticks: int
  busy: float  # fraction of F/B slots doing work in the timetable
  bubble_formula: str
  bubble: float  # the paper's formula, F = 1, B = 2, W = 1 (B includes W unless split)
  activations: int  # peak micro-batches between their F and B on one rank (the formula's)
  activations_formula: str
  stash_slots: int  # stage inputs one rank buffers (also those that arrived before their F)
  parameter_copies: int


def analyse(schedule: Schedule, f: float = 1.0, b: float = 2.0, w: float = 1.0) -> Analysis:
  """The schedule's bubble and activation memory per rank, from the formulas of REFERENCE §6
  / DeepSeek-V3 Table 2 (1F1B (PP - 1)(F + B); DualPipe (PP/2 - 1)(F&B + B - 3W), with F&B the
  overlapped pair's time, taken as F + B) and from its timetable."""
  pp = schedule.n_stages
  table = timetable(schedule)
  if schedule.name == "dualpipe":
    formula, bubble = "(PP/2-1)(F&B+B-3W)", (pp / 2 - 1) * ((f + b) + b - 3 * w)
    act_formula = "PP+1"
  else:
    formula, bubble = "(PP-1)(F+B)", (pp - 1) * (f + b)
    act_formula = "M" if schedule.name == "gpipe" else "PP"
  return Analysis(schedule.name, pp, table.n_ticks, table.busy(), formula, bubble,
                  table.in_flight(), act_formula, table.n_stash, schedule.chunks_per_rank)


def stage_layers(n_layers: int, n_stages: int, layers_per_stage=()) -> tuple[int, ...]:
  """MoE layers per pipeline stage: ``layers_per_stage`` if given (checked), else an even cut.
  Raises ValueError naming the config field when the cut is impossible."""
  if layers_per_stage:
    cut = tuple(int(n) for n in layers_per_stage)
    if len(cut) != n_stages or sum(cut) != n_layers or min(cut) < 1:
      raise ValueError(f"config.pipeline.layers_per_stage: needs {n_stages} positive counts (one "
                       f"per mesh.stage) summing to the {n_layers} MoE layers, got {cut}")
    return cut
  if n_layers % n_stages:
    raise ValueError(f"config.mesh.stage: {n_stages} stages do not divide the {n_layers} MoE "
                     f"layers evenly; use a divisor, or give uneven cuts with "
                     f"config.pipeline.layers_per_stage (e.g. "
                     f"{','.join(map(str, _uneven(n_layers, n_stages)))})")
  return (n_layers // n_stages,) * n_stages


def _uneven(n_layers: int, n_stages: int) -> tuple[int, ...]:
  """A suggested uneven cut: the remainder goes to the stages after the first (which also
  runs the embedding and the dense layers)."""
  base, extra = divmod(n_layers, n_stages)
  cut = [base] * n_stages
  for i in range(extra):
    cut[(i + 1) % n_stages] += 1
  return tuple(cut)
