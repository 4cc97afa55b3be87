"""The training loop behind ``experiments/train.py``, and evaluate / sample from a workdir.

    setup   validate the config (no compile yet) -> distributed init -> mesh -> tokenizer
    state   the workdir locked; sharded init (or train.init_from's weights), or restore of the
            newest checkpoint that verifies (state + data), or of --step
    loop    global batch from each process's shard -> jitted step -> every log_every: metrics,
            NaN check -> checkpoint every checkpoint.every when the updated state is finite,
            sealed (checksums) once the next step's loss and gradient at it are finite ->
            SIGTERM / Ctrl-C: save now and stop (exit code PREEMPTED_EXIT_CODE)
    end     final checkpoint, held-out loss, a sample from the trained model

A resumed run continues from the exact step, parameters, optimizer state and data position:
its parameters and loss curve are bitwise those of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
from typing import Any, Optional

import jax
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from deepseek_jax import analytics
from deepseek_jax.cli import RunError, check_cpu_devices, is_remote, set_cpu_devices
from deepseek_jax.config import ModelConfig
from deepseek_jax.inference.generate import SamplingConfig, generate
from deepseek_jax.model.execution import Execution, resolve_execution, set_execution
from deepseek_jax.model.transformer import abstract_model
from deepseek_jax.parallel.mesh import batch_shards, make_mesh, under_mesh
from deepseek_jax.parallel.pipeline import Schedule, analyse
from deepseek_jax.parallel.partitioning import (batch_sharding, get_rules, replicated_dims,
                                                replication_summary)
from deepseek_jax.train import config as config_lib
from deepseek_jax.train import data as data_lib
from deepseek_jax.train import extrapolation
from deepseek_jax.interop import integrity
from deepseek_jax.interop.integrity import step_directories
from deepseek_jax.interop.orbax_params import load_model, resolve_checkpoint, saved_record
from deepseek_jax.train.checkpoint import (Checkpointer, check_compatible, check_data_position,
                                           config_record)
from deepseek_jax.train.loss import PretrainLoss, loss_fn
from deepseek_jax.train.pipeline import PipelinedPretrainLoss, stage_layers
from deepseek_jax.train.metrics import MetricsLogger, device_peak_flops, say
from deepseek_jax.train.optimizer import lr_schedule, make_optimizer, piecewise_constant
from deepseek_jax.train.sft import chat_context
from deepseek_jax.train.step import (StepOptions, TrainState, abstract_train_state,
                                     init_train_state, jit_train_step)
from deepseek_jax.train.workdir import WorkdirLock, check_workdir

# Exit code of a run stopped by SIGTERM or Ctrl-C after saving its step: non-zero, so a
# scheduler that restarts failed jobs restarts it (and it resumes); EX_TEMPFAIL, "try again".
PREEMPTED_EXIT_CODE = 75


class TrainingDiverged(RunError):
  """The loss, the gradient norm or the updated state became NaN/Inf."""


def setup_distributed(cfg) -> None:
  """jax.distributed.initialize when launched as several processes (call before any JAX op)."""
  mode = cfg.initialize
  if mode not in ("auto", "always", "never"):
    raise ValueError(f"config.distributed.initialize must be auto|always|never, got {mode!r}")
  explicit = bool(cfg.coordinator) or cfg.num_processes > 1
  from_env = "JAX_COORDINATOR_ADDRESS" in os.environ or len(
      os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
  if mode == "never" or (mode == "auto" and not (explicit or from_env)):
    return
  kwargs = {}
  if cfg.coordinator:
    kwargs = dict(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                  process_id=cfg.process_id)
  jax.distributed.initialize(**kwargs)


@dataclasses.dataclass
class Setup:
  """What a run decided before compiling anything: the validated configs, the mesh and its
  sharding rules, the execution choices (kernels, MoE dispatch), tokenizer and optimizer."""

  config: Any
  model_cfg: ModelConfig
  mesh: Mesh
  rules: Any
  tokenizer: Any
  tx: optax.GradientTransformation
  execution: Execution


def start_setup(config, schema=None, free_form=()) -> Setup:
  """Devices (CPU split, distributed init) then the validated setup; before any compile."""
  set_cpu_devices(config.cpu_devices)
  setup_distributed(config.distributed)
  check_cpu_devices(config.cpu_devices)
  return build_setup(config, schema, free_form)


def build_setup(config, schema=None, free_form=()) -> Setup:
  """Everything decided before compiling; every check raises with the field named.
  ``schema`` / ``free_form``: the known fields (``config_lib.validate``)."""
  mesh_sizes = dict(config.mesh)
  try:
    mesh = make_mesh(mesh_sizes)
  except ValueError as e:
    if jax.default_backend() != "cpu" or config.cpu_devices:
      raise
    raise ValueError(f"{e}; on a CPU-only host, split it into devices with "
                     "--config.cpu_devices=N") from None
  model_cfg = config_lib.validate(config, jax.process_count(), batch_shards(mesh),
                                  mesh.shape["expert"], schema=schema,
                                  free_form=free_form, stages=mesh.shape["stage"],
                                  fsdp_shards=mesh.shape["fsdp"])
  rules = get_rules(config.partitioning.rules)
  tokenizer = data_lib.make_tokenizer(config.data)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"config.data.tokenizer has {tokenizer.vocab_size} ids but the model's "
                     f"vocab_size is {model_cfg.vocab_size}; raise "
                     f"config.model.overrides.vocab_size")
  data_lib.check_data(config.data, tokenizer, vocab_size=model_cfg.vocab_size,
                      seq_len=config.train.seq_len, shard_count=jax.process_count())
  return Setup(config, model_cfg, mesh, rules, tokenizer, make_optimizer(_optimizer_cfg(config)),
               resolve_execution(model_cfg, mesh))


def startup_report(setup: Setup) -> list[str]:
  """The lines a run prints before compiling: where it runs, how (the execution choices, said
  once), and every weight dimension that stays whole because its mesh axes do not divide it."""
  c, mesh = setup.config, setup.mesh
  lines = [f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
           f"device(s), {jax.process_count()} process(es); rules {c.partitioning.rules!r}",
           f"execution {setup.execution.summary()}"]
  loss = pretrain_loss(setup)
  if isinstance(loss, PipelinedPretrainLoss):
    a = analyse(loss.schedule)
    cut = stage_layers(setup.model_cfg.n_moe_layers, a.n_stages, loss.layers_per_stage)
    lines.append(f"pipeline {a.name} over {a.n_stages} stages, {loss.schedule.n_micro} "
                 f"micro-batches, MoE layers per stage {cut}: {a.ticks} ticks, "
                 f"{1 - a.busy:.0%} idle; bubble {a.bubble_formula}, at most {a.activations} "
                 f"micro-batches in flight per rank ({a.activations_formula}), "
                 f"{a.parameter_copies} parameter cop"
                 f"{'ies' if a.parameter_copies > 1 else 'y'}")
  replicated = replication_summary(replicated_dims(
      nnx.state(abstract_model(setup.model_cfg), nnx.Param), mesh, setup.rules))
  if replicated:
    lines.append(f"sharding: {replicated}")
  return lines


def _optimizer_cfg(config):
  """config.optimizer with total_steps resolved (-1 = train.steps)."""
  opt = config.optimizer.copy_and_resolve_references()
  with opt.unlocked():
    opt.total_steps = config_lib.schedule_steps(config)
  return opt


def make_data(setup: Setup, split: str = "train", repeat: bool = True, batch_size=None):
  c = setup.config
  batch = batch_size or c.train.batch_size
  data_cfg = c.data
  return data_lib.make_dataset(
      data_cfg, setup.tokenizer, seq_len=c.train.seq_len, batch_size=batch // jax.process_count(),
      split=split, seed=c.seed, shard_index=jax.process_index(),
      shard_count=jax.process_count(), repeat=repeat)


def global_batch(setup: Setup, local: dict) -> dict:
  sharding = batch_sharding(setup.mesh, setup.rules)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def _checkpointer(setup: Setup, workdir: str, create: bool = True) -> Checkpointer:
  c = setup.config.checkpoint
  return Checkpointer(os.path.join(workdir, "checkpoints"), every=c.every, keep=c.keep,
                      async_save=c.async_save, create=create)


def restore_or_init(setup: Setup, ckpt: Checkpointer, data_iter, step: Optional[int] = None):
  """(graphdef, state, shardings, start step).

  ``step`` None: the newest checkpoint that verifies, else ``train.init_from`` or a fresh
  init; ``step=0``: the initialisation; ``step=N``: checkpoint N (it must verify). Newer steps
  than the one started from are set aside (kept) so this run can save their numbers again;
  a resume that would reinterpret the saved data position is refused."""
  if step == 0:  # the initialisation: every saved step is newer
    choice = integrity.Choice(None, {})
  else:
    choice = ckpt.choose(step, report=say, hint="or --step=0 to start from the initialisation")
  start = choice.step or 0
  newer = sorted(s for s in step_directories(ckpt.directory) if s > start or
                 (step == 0 and s == 0))
  if choice.step is not None and not epath.Path(ckpt.directory, str(start), "data").is_dir():
    raise ValueError(
        f"{ckpt.directory}/{start} holds weights only (a parameters checkpoint: no optimizer "
        "state or data position), so a run cannot resume it; to fine-tune from it, use a new "
        f"--workdir with --config.train.init_from={os.path.dirname(ckpt.directory)}")
  if start:
    saved, now = ckpt.saved_config(start), config_record(setup.config, setup.model_cfg)
    check_compatible(saved, now, ckpt.directory)
    check_data_position(saved, now, ckpt.directory, start)
    if setup.config.train.init_from:
      say(f"config.train.init_from is ignored: resuming step {start} of this workdir")
  if start >= setup.config.train.steps:
    return None, None, None, start
  if newer:
    why = "failed-verification" if choice.skipped and step is None else "superseded"
    aside = ckpt.set_aside(newer, why)
    say(f"moved step(s) {newer} (newer than step {start}) to {aside}; nothing was deleted")
  if start:
    return (*_restore(setup, ckpt, start, data_iter), start)
  graphdef, state, shardings = init_train_state(setup.model_cfg, setup.tx, setup.mesh,
                                                setup.rules, setup.config.seed, setup.execution)
  if setup.config.train.init_from:
    state = _init_from(setup, state, shardings)
  return graphdef, state, shardings, 0


def _init_from(setup: Setup, state: TrainState, shardings: TrainState) -> TrainState:
  """The weights (parameters and router biases) of ``train.init_from`` in place of the
  initialisation; the optimizer, step counter and data start fresh (fine-tuning)."""
  source = setup.config.train.init_from
  try:
    root, step = resolve_checkpoint(source, report=say)
  except (FileNotFoundError, ValueError) as e:
    raise type(e)(f"config.train.init_from={source}: {e}") from None
  model = load_model(os.path.join(root, str(step)), mesh=setup.mesh,
                     rules=setup.config.partitioning.rules, execution=setup.execution)
  check_compatible({"model_config": model.config.to_dict()},
                   config_record(setup.config, setup.model_cfg), os.path.join(root, str(step)))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.device_put(params, shardings.params)
  rest = jax.device_put(rest, shardings.model_state)
  say(f"initialised from the weights of {root}/{step} (fresh optimizer and data)")
  return state._replace(params=params, model_state=rest)


def _restore(setup: Setup, ckpt: Checkpointer, step: int, data_iter=None):
  """(graphdef, state, shardings) of checkpoint ``step`` (``restore_or_init`` has checked that
  it is this model and this data)."""
  graphdef, shardings, abstract = abstract_train_state(setup.model_cfg, setup.tx, setup.mesh,
                                                       setup.rules, setup.execution)
  return graphdef, ckpt.restore(step, abstract, data_iter), shardings


class Preemption:
  """SIGTERM or Ctrl-C (SIGINT) sets a flag; the loop saves at the next step and stops (a
  second Ctrl-C interrupts at once; while XLA compiles, Python sees signals only when the
  compile returns, and two Ctrl-C then count as one). With several processes the flags are all-gathered every
  step (plus jax's preemption sync point), so every process stops at, and saves, the same step
  even when the signal reaches the hosts at different steps (a process alone in a collective
  save would hang)."""

  def __init__(self):
    self.requested: Optional[str] = None
    self._previous = {sig: signal.signal(sig, self._handle)
                      for sig in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name
    if signum == signal.SIGINT:  # a second Ctrl-C is a KeyboardInterrupt
      signal.signal(signal.SIGINT, self._previous[signal.SIGINT])

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      anyone = bool(np.any(multihost_utils.process_allgather(np.array(bool(self.requested)))))
      return multihost_utils.reached_preemption_sync_point(step) or anyone
    return bool(self.requested)

  def late(self, result: dict) -> dict:
    """``result`` of a run whose loop had finished; a signal that came after its loop (during
    the final evaluation or sampling) is reported as ``preempted_at`` its last step, so a
    caller running several stages stops too instead of losing it."""
    if self.requested and not result.get("preempted_at"):
      step = result.get("step", result.get("already_at"))
      say(f"{self.requested} after the last step ({step}), which is saved; stopping")
      return dict(result, preempted_at=step)
    return result

  def restore(self):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


def host_metrics(metrics: dict) -> dict:
  return jax.tree.map(np.asarray, jax.device_get(metrics))


def finite_metrics(metrics: dict) -> bool:
  return bool(np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]))


def diverged_error(ckpt: Checkpointer, step: int, what: str) -> TrainingDiverged:
  """The error for a non-finite step; a checkpoint of step-1 (whose parameters gave it) is
  moved aside, so the advice (rerun to resume) resumes from a step that trains."""
  moved = ""
  try:
    ckpt.manager.wait_until_finished()  # a save of step-1 may still be under way
  except Exception:  # noqa: BLE001 (the divergence is the error to report)
    pass
  if step - 1 in step_directories(ckpt.directory):
    aside = ckpt.reject(step - 1, "diverged")
    moved = f" Step {step - 1}, whose parameters gave it, was moved to {aside}."
  try:
    ckpt.wait()
  except Exception:  # noqa: BLE001 (the divergence is the error to report)
    pass
  good = ckpt.sealed_steps()[-1] if ckpt.sealed_steps() else None
  return TrainingDiverged(
      f"{what} at step {step}; stopped without saving it.{moved} "
      + (f"Last good checkpoint: step {good} in {ckpt.directory}. " if good else
         "No good checkpoint yet. ") + "Lower config.optimizer.learning_rate or raise "
      "warmup_steps, then rerun" + (" to resume from it" if good else " to start again"))


def train(config, workdir: str, step: Optional[int] = None) -> dict:
  """Train per ``config`` in ``workdir``: resume from its newest checkpoint that verifies, or
  from ``step`` (0: from the initialisation); see ``restore_or_init``. Returns the last logged
  record plus the final held-out loss and the samples; ``preempted_at`` (and no eval) when
  SIGTERM/Ctrl-C stopped it, ``already_at`` when the workdir is already at train.steps.
  Raises WorkdirLocked, TrainingDiverged, SaveFailed, CheckpointIntegrityError and ValueError
  for bad input, each with one line naming the field, file or step."""
  check_workdir(workdir)
  source = config.train.init_from
  if source and "://" not in source and not os.path.exists(source):
    raise FileNotFoundError(f"config.train.init_from={source} does not exist; give a training "
                            "workdir, a step folder .../checkpoints/N or a parameters checkpoint")
  setup = start_setup(config)
  c = config
  say(f"model {setup.model_cfg.name}: {analytics.summary(setup.model_cfg, c.train.seq_len)}")
  for line in startup_report(setup):
    say(line)
  say(f"workdir {workdir}")
  lock = WorkdirLock(workdir, report=say)
  if jax.process_index() == 0:
    lock.acquire()
  preemption = Preemption()  # from here on, SIGTERM / Ctrl-C save the step the loop reaches
  try:
    return preemption.late(_train_locked(setup, workdir, step, preemption))
  finally:
    preemption.restore()
    lock.release()


def pretrain_loss(setup: Setup, mtp_weight=None):
  """The run's pretraining objective: ``PretrainLoss``, or its pipelined form over the mesh's
  stage axis (``train.pipeline``) when mesh.stage > 1."""
  n_mtp, stages = setup.model_cfg.n_mtp_modules, setup.mesh.shape["stage"]
  if stages == 1:
    return PretrainLoss(n_mtp, mtp_weight)
  p = setup.config.pipeline
  schedule = Schedule(p.schedule, stages, config_lib.pipeline_micro_batches(setup.config, stages))
  return PipelinedPretrainLoss(n_mtp, schedule, tuple(p.layers_per_stage), mtp_weight)


def _train_locked(setup: Setup, workdir: str, requested: Optional[int],
                  preemption: "Preemption") -> dict:
  c, mesh = setup.config, setup.mesh
  data_iter = iter(make_data(setup))
  ckpt = _checkpointer(setup, workdir)
  try:
    graphdef, state, shardings, start = restore_or_init(setup, ckpt, data_iter, requested)
  except BaseException:
    ckpt.manager.close()
    raise
  if graphdef is None:
    ckpt.manager.close()
    say(f"already at step {start} (config.train.steps={c.train.steps}); nothing to do. Raise "
        "config.train.steps to train further")
    return {"already_at": start}
  if start:
    say(f"resumed from step {start} ({ckpt.directory})")
  options = StepOptions(grad_accum=c.train.grad_accum, lr_schedule=lr_schedule(_optimizer_cfg(c)),
                        router_bias_rate=piecewise_constant(c.train.router_bias_rate))
  loss = pretrain_loss(setup, piecewise_constant(c.train.mtp_weight))
  step_fn = jit_train_step(setup.model_cfg, graphdef, setup.tx, options, shardings, mesh,
                           setup.rules, loss)
  peak, peak_source = device_peak_flops(c.metrics.peak_flops_per_device)
  say(f"MFU peak: {peak / 1e12:.2f} TFLOP/s per device ({peak_source})")
  logger = MetricsLogger(workdir, total_steps=c.train.steps,
                         tokens_per_step=c.train.batch_size * c.train.seq_len,
                         flops_per_token=analytics.train_flops_per_token(setup.model_cfg,
                                                                         c.train.seq_len),
                         n_devices=jax.device_count(), peak_flops=peak,
                         tensorboard=c.metrics.tensorboard, resume_step=start)
  record_cfg = config_record(c, setup.model_cfg)
  record: dict = {}
  failed = True
  check_next = start + 1  # this step's metrics judge the state saved (or restored) before it
  try:
    for step in range(start + 1, c.train.steps + 1):
      state, metrics = step_fn(state, global_batch(setup, next(data_iter)))
      if step == start + 1:  # keep compile time out of the throughput numbers
        jax.block_until_ready(metrics)
        say(f"step {step} (including compilation) took {logger.compiled(step):.1f} s")
      ckpt.poll()
      last = step == c.train.steps
      due_save = step % c.checkpoint.every == 0 or last
      stop = preemption.reached(step)
      if step % c.train.log_every == 0 or due_save or stop or step == check_next:
        host = host_metrics(metrics)
        if not finite_metrics(host):
          raise diverged_error(ckpt, step, f"loss or gradient norm is not finite (loss "
                                      f"{host['loss']}, grad norm {host['grad_norm']})")
        if step == check_next and step - 1 > start:
          ckpt.confirm(step - 1)
        if step % c.train.log_every == 0 or last:
          record = logger.log(step, host)
        if host.get("overflow", 0) > 0:
          say(f"warning: step {step}: {int(host['overflow'])} expert assignments did not fit "
              f"the expert-parallel receive buffers and were left out; raise "
              f"config.model.overrides.expert_buffer_factor, or leave it unset (worst case)")
      if c.train.eval_every and step % c.train.eval_every == 0:
        with logger.paused():
          result = _evaluate_state(setup, graphdef, state)
          logger.log_eval(step, result)
          say(f"eval at step {step}: {result}")
      if due_save or stop:
        if not host.get("state_finite", 1.0):
          raise diverged_error(ckpt, step, "the updated parameters or optimizer moments are not "
                                      "finite")
        with logger.paused():
          ckpt.save(step, state, data_iter, record_cfg, force=True)
        check_next = step + 1
        if last or stop:  # no next step to judge it: its finite state is the evidence
          ckpt.confirm(step)
      if stop:
        ckpt.wait()
        say(f"{preemption.requested}: saved step {step} to {ckpt.directory}; stopping (exit code "
            f"{PREEMPTED_EXIT_CODE}; rerun to resume)")
        failed = False
        return dict(record, preempted_at=step)
    ckpt.wait()
    failed = False
  finally:
    logger.close()
    if failed:
      try:  # the error in flight is the one to report; a save still running is abandoned
        ckpt.manager.close()
      except Exception:  # noqa: BLE001
        pass
    else:
      ckpt.close()
  final = dict(record, eval=_evaluate_state(setup, graphdef, state))
  say(f"held-out: loss {final['eval']['loss']:.4f}, perplexity {final['eval']['perplexity']:.2f}")
  final["samples"] = (_sample_state(setup, graphdef, state) if setup.config.sample.prompts
                      else [])
  return final


@functools.lru_cache(maxsize=4)
def _eval_fn(graphdef, mesh):
  return under_mesh(
      jax.jit(lambda params, rest, batch: loss_fn(nnx.merge(graphdef, params, rest), batch)[1]),
      mesh)


def _evaluate_state(setup: Setup, graphdef, state: TrainState, max_batches: Optional[int] = None):
  """Token-weighted loss and perplexity over the held-out split."""
  c = setup.config
  eval_fn = _eval_fn(graphdef, setup.mesh)
  total = count = 0.0
  limit = max_batches or c.train.eval_batches
  batches, template = iter(make_data(setup, "eval", repeat=False)), None
  for _ in range(limit):
    local = next(batches, None)
    if jax.process_count() > 1:
      # Shards can hold different numbers of batches; every process must run the same number
      # of (collective) eval steps, so one that has run out feeds a fully masked batch.
      # (A process with no batch at all has no template, and then all stop together.)
      ran_out = multihost_utils.process_allgather(
          np.array([local is None, local is None and template is None]))
      if ran_out[:, 0].all() or ran_out[:, 1].any():
        break
      local = local if local is not None else {k: v[:0] for k, v in template.items()}
      template = local
    elif local is None:
      break
    local = data_lib.pad_batch(local, c.train.batch_size // jax.process_count())
    m = jax.device_get(eval_fn(state.params, state.model_state, global_batch(setup, local)))
    total += float(m["ce"]) * float(m["tokens"])
    count += float(m["tokens"])
  loss = total / max(count, 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count)}


def _chat_template(config) -> bool:
  """Sample in the chat template: ``sample.chat_template``, or an RL config's
  ``task.chat_template`` (the policy was trained on prompts in it)."""
  task = config.get("task")
  return bool(config.sample.chat_template or (task is not None and task.get("chat_template")))


def _sample_state(setup: Setup, graphdef, state: TrainState, prompts=None) -> list[str]:
  c, tok = setup.config, setup.tokenizer
  prompts = list(prompts or c.sample.prompts)
  model = nnx.merge(graphdef, state.params, state.model_state)
  # Few short rows: local MoE dispatch (no expert-parallel split of a handful of tokens).
  set_execution(model, resolve_execution(setup.model_cfg, setup.mesh, expert_parallel=False))
  if _chat_template(c):
    encoded = [chat_context(p, tok) for p in prompts]
  else:
    encoded = [([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(p) for p in prompts]
  out = generate(model, encoded, max_new_tokens=c.sample.max_new_tokens,
                 sampling=SamplingConfig(temperature=c.sample.temperature),
                 stop_tokens=[tok.eos_id] if tok.eos_id is not None else [],
                 pad_id=tok.pad_id, rng=jax.random.key(c.seed),
                 speculative=c.sample.get("speculative") or None)
  tokens, lengths = (multihost_utils.process_allgather(a, tiled=True)
                     for a in (out.tokens, out.lengths))
  if out.drafted is not None:  # (gathered: rows may span processes)
    drafted, accepted = (np.asarray(multihost_utils.process_allgather(a, tiled=True))
                         for a in (out.drafted, out.accepted))
    rate = accepted.sum(0) / np.maximum(drafted.sum(0), 1)
    say(f"speculative decoding (MTP drafts): {int(np.asarray(lengths).sum())} tokens from "
        f"{int(drafted[:, 0].sum())} verify steps over {len(prompts)} prompt(s); draft "
        "acceptance by depth " + ", ".join(f"{r:.0%}" for r in rate))
  texts = []
  for prompt, row, n in zip(prompts, np.asarray(tokens), np.asarray(lengths)):
    texts.append(prompt + tok.decode(row[:n]))
    say(f"--- sample ---\n{texts[-1]}")
  return texts


def _load_for_inference(config, workdir: str, step: Optional[int]):
  """Read-only: the workdir must exist (nothing is created); ``step`` (0 included) or the
  newest checkpoint that verifies. Only the weights are read, so a training workdir and a
  parameters checkpoint (convert --to_orbax) both work."""
  setup = _inference_setup(config, workdir)
  return (setup, *_inference_weights(setup, workdir, step))


def inference_model(config, workdir: str, step: Optional[int] = None):
  """(setup, DeepSeekModel, step): a checkpoint's model for decoding and scripts, read-only
  (``_load_for_inference``'s checks), with local MoE dispatch (no expert-parallel split of a
  few rows)."""
  setup, graphdef, state, step = _load_for_inference(config, workdir, step)
  model = nnx.merge(graphdef, state.params, state.model_state)
  set_execution(model, resolve_execution(setup.model_cfg, setup.mesh, expert_parallel=False))
  return setup, model, step


def _inference_setup(config, workdir: str) -> Setup:
  """The checks and setup of reading a checkpoint, before any weight is read."""
  check_workdir(workdir, must_exist=True)
  # An RL run's config (deepseek_jax/rl/config.py) adds sections that reading weights ignores;
  # its model, data, mesh and sample sections are this module's.
  return start_setup(config, schema=config if "rl" in config else None)


def _inference_weights(setup: Setup, workdir: str, step: Optional[int]):
  """(graphdef, TrainState with params and model state, step) of the chosen checkpoint."""
  root = os.path.join(workdir, "checkpoints")
  if not epath.Path(root).is_dir():
    raise FileNotFoundError(f"no checkpoints in {workdir}; train first with --workdir={workdir}")
  step = integrity.choose_step(root, step, report=say).step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {root}; train first with --workdir={workdir}")
  step_dir = os.path.join(root, str(step))
  check_compatible(saved_record(step_dir), config_record(setup.config, setup.model_cfg), root)
  model = load_model(step_dir, mesh=setup.mesh, rules=setup.config.partitioning.rules,
                     execution=setup.execution, config=setup.model_cfg, verified=True)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, TrainState(None, params, rest, None), step


def evaluate(config, workdir: str, step: Optional[int] = None, max_batches: Optional[int] = None):
  """Held-out loss / perplexity of a checkpoint (the latest by default)."""
  setup, graphdef, state, step = _load_for_inference(config, workdir, step)
  result = dict(_evaluate_state(setup, graphdef, state, max_batches), step=step)
  say(f"step {step}: held-out loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} "
      f"over {result['tokens']:,} tokens")
  return result


def position_loss(config, workdir: str, lengths, *, yarn: bool = True,
                  step: Optional[int] = None, max_windows: Optional[int] = None,
                  output: Optional[str] = None, overwrite: bool = False) -> dict:
  """Held-out loss by position on windows of each length in ``lengths`` (tokens, or "2x" for
  twice ``train.seq_len``: ``extrapolation.parse_lengths``; lengths past ``train.seq_len``
  test extrapolation; held-out documents joined by newlines), and with ``yarn`` also under
  YaRN for those lengths (``train.extrapolation``). ``max_windows`` caps the windows per
  length.

  Returns (and with ``output`` writes as JSON) {"step", "train_len", "curves": {name:
  {"length", "yarn_factor", "windows", "loss": [L] mean nats per position,
  "in_range_first_document", "in_range_later_documents": mean nats over the targets at
  positions < train_len in a window's first document / in the documents after it}}}, curves
  named "L<length>" and "L<length>_yarn". The later documents' in-range loss is the reference
  for positions past train_len, which lie in later documents too.

  Raises, before the weights are read: ValueError for a bad or empty length list, a model that
  already uses YaRN when ``yarn``, too little held-out data, several processes;
  FileExistsError when ``output`` exists and not ``overwrite``; IsADirectoryError or
  PermissionError for an ``output`` that cannot be written."""
  lengths = extrapolation.parse_lengths(lengths, config.train.seq_len)
  if jax.process_count() > 1:
    raise ValueError("--lengths (loss by position) runs in one process, not "
                     f"{jax.process_count()}; run evaluate.py on one host")
  if max_windows is not None and max_windows < 1:
    raise ValueError(f"--windows must be >= 1, got {max_windows}")
  if output:
    _check_output_file(output, overwrite)
  setup = _inference_setup(config, workdir)
  train_len = config.train.seq_len
  plan = [(n, False) for n in lengths] + [(n, True) for n in lengths if yarn and n > train_len]
  configs = {(n, y): extrapolation.extended_config(setup.model_cfg, train_len, n, y)
             for n, y in plan}
  tok = setup.tokenizer
  documents = extrapolation.strip_document_marks(
      data_lib.token_sequences(config.data, tok, "eval"), tok.bos_id, tok.eos_id)
  windows = {n: extrapolation.document_windows(documents, n, bos=tok.bos_id,
                                               separator=tok.encode("\n"),
                                               max_windows=max_windows) for n in lengths}
  graphdef, state, step = _inference_weights(setup, workdir, step)
  model = nnx.merge(graphdef, state.params, state.model_state)
  set_execution(model, resolve_execution(setup.model_cfg, setup.mesh, expert_parallel=False))
  curves = {}
  for n, use_yarn in plan:
    cfg = configs[(n, use_yarn)]
    tokens, owner = windows[n]
    per_token = extrapolation.token_losses(extrapolation.with_config(model, cfg), tokens,
                                           batch_size=min(8, len(tokens)))
    losses = per_token.astype(np.float64).mean(0)
    in_range = np.arange(n)[None] < train_len
    first, later = (per_token[in_range & (owner[:, 1:] == 0)],
                    per_token[in_range & (owner[:, 1:] > 0)])
    name = f"L{n}" + ("_yarn" if use_yarn else "")
    curves[name] = {"length": n, "yarn_factor": cfg.yarn_factor, "windows": len(tokens),
                    "loss": [round(float(v), 5) for v in losses],
                    "in_range_first_document": _mean_or_none(first),
                    "in_range_later_documents": _mean_or_none(later)}
    edges = [0, train_len, 2 * train_len, 4 * train_len, 8 * train_len, n]
    edges = sorted({e for e in edges if e <= n})
    means = extrapolation.bucket_means(losses, edges)
    say(f"{name}: {len(tokens)} windows; mean loss by position " + ", ".join(
        f"[{lo}, {hi}) {m:.4f}" for lo, hi, m in zip(edges, edges[1:], means))
        + (f"; before {train_len}: first document {first.mean():.4f}, later documents "
           f"{later.mean():.4f}" if first.size and later.size else ""))
  result = {"step": step, "train_len": train_len, "curves": curves}
  if output and jax.process_index() == 0:
    _write_json(output, result)
    say(f"wrote {output}")
  return result


def _mean_or_none(x: np.ndarray) -> Optional[float]:
  return round(float(x.mean()), 5) if x.size else None


def _check_output_file(path: str, overwrite: bool) -> None:
  """Before any work: ``path`` can be written (a new file, or an existing one with
  ``overwrite``). Raises FileExistsError, IsADirectoryError or PermissionError naming it."""
  if is_remote(path):  # gs://: epath; an object store has no folder permissions to check
    if epath.Path(path).is_dir():
      raise IsADirectoryError(f"--output={path} is a folder; give a file path")
    if epath.Path(path).exists() and not overwrite:
      raise FileExistsError(f"{path} exists; give another --output or delete it")
    return
  if os.path.isdir(path):
    raise IsADirectoryError(f"--output={path} is a folder; give a file path, e.g. "
                            f"{os.path.join(path, 'position_loss.json')}")
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; give another --output or delete it")
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):  # the first folder that exists must take new entries
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise PermissionError(f"--output={path} cannot be written: {parent} is not a writable "
                          "folder")


def _write_json(path: str, value) -> None:
  """Write atomically: a temporary file in the same folder, renamed over ``path``; removed if
  anything fails, so a reader never sees half a file and nothing is left behind."""
  import tempfile
  if is_remote(path):  # an object is written whole: already atomic
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(path).write_text(json.dumps(value))
    return
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(value, f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def sample(config, workdir: str, prompts=None, step: Optional[int] = None) -> list[str]:
  """Generate from a checkpoint (the latest by default)."""
  setup, graphdef, state, step = _load_for_inference(config, workdir, step)
  say(f"sampling from step {step} of {workdir}"
      + (" (prompts in the chat template)" if _chat_template(setup.config) else ""))
  return _sample_state(setup, graphdef, state, prompts)
