"""The training loop behind ``experiments/train.py``, and evaluate / sample from a workdir.

    setup   validate the config (no compile yet) -> distributed init -> mesh -> tokenizer
    state   sharded init, or restore of the latest checkpoint in the workdir (state + data)
    loop    global batch from each process's shard -> jitted step -> every log_every: metrics,
            NaN check -> checkpoint every checkpoint.every -> SIGTERM: save now and stop
    end     final checkpoint, held-out loss, a sample from the trained model

A resumed run continues from the exact step, parameters, optimizer state and data position:
its parameters and loss curve are bitwise those of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
from typing import Any, Optional

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from deepseek_jax import analytics
from deepseek_jax.cli import RunError, check_cpu_devices, set_cpu_devices
from deepseek_jax.config import ModelConfig
from deepseek_jax.inference.generate import SamplingConfig, generate
from deepseek_jax.model.execution import Execution, resolve_execution, set_execution
from deepseek_jax.model.transformer import abstract_model
from deepseek_jax.parallel.mesh import batch_shards, make_mesh, under_mesh
from deepseek_jax.parallel.partitioning import (batch_sharding, get_rules, replicated_dims,
                                                replication_summary)
from deepseek_jax.train import config as config_lib
from deepseek_jax.train import data as data_lib
from deepseek_jax.train.checkpoint import Checkpointer, check_compatible, config_record
from deepseek_jax.train.loss import PretrainLoss, loss_fn
from deepseek_jax.train.metrics import MetricsLogger, device_peak_flops, say
from deepseek_jax.train.optimizer import lr_schedule, make_optimizer, piecewise_constant
from deepseek_jax.train.step import (StepOptions, TrainState, abstract_train_state,
                                     init_train_state, jit_train_step)


class TrainingDiverged(RunError):
  """The loss or gradient norm became NaN/Inf."""


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


def start_setup(config) -> Setup:
  """Devices (CPU split, distributed init) then the validated setup; before any compile."""
  set_cpu_devices(config.cpu_devices)
  setup_distributed(config.distributed)
  check_cpu_devices(config.cpu_devices)
  return build_setup(config)


def build_setup(config) -> Setup:
  """Everything decided before compiling; every check raises with the field named."""
  mesh_sizes = dict(config.mesh)
  try:
    mesh = make_mesh(mesh_sizes)
  except ValueError as e:
    if jax.default_backend() != "cpu" or config.cpu_devices:
      raise
    raise ValueError(f"{e}; on a CPU-only host, split it into devices with "
                     "--config.cpu_devices=N") from None
  model_cfg = config_lib.validate(config, jax.process_count(), batch_shards(mesh),
                                  mesh.shape["expert"])
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


def _checkpointer(setup: Setup, workdir: str) -> Checkpointer:
  c = setup.config.checkpoint
  return Checkpointer(os.path.join(workdir, "checkpoints"), every=c.every, keep=c.keep,
                      async_save=c.async_save)


def restore_or_init(setup: Setup, ckpt: Checkpointer, data_iter):
  """(graphdef, state, shardings, step): the latest checkpoint if any, else a fresh init."""
  latest = ckpt.latest_step()
  if latest is None:
    graphdef, state, shardings = init_train_state(setup.model_cfg, setup.tx, setup.mesh,
                                                  setup.rules, setup.config.seed, setup.execution)
    return graphdef, state, shardings, 0
  return (*_restore(setup, ckpt, latest, data_iter), latest)


def _restore(setup: Setup, ckpt: Checkpointer, step: int, data_iter=None):
  """(graphdef, state, shardings) of checkpoint ``step``, after checking it is this model."""
  check_compatible(ckpt.saved_config(step), config_record(setup.config, setup.model_cfg),
                   ckpt.directory)
  graphdef, shardings, abstract = abstract_train_state(setup.model_cfg, setup.tx, setup.mesh,
                                                       setup.rules, setup.execution)
  return graphdef, ckpt.restore(step, abstract, data_iter), shardings


class _Preemption:
  """SIGTERM sets a flag; the loop saves at the next step and stops. With several processes
  the flags are all-gathered every step (plus jax's preemption sync point), so every process
  stops at, and saves, the same step even when the signal reaches the hosts at different
  steps (a process alone in a collective save would hang)."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      anyone = bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))
      return multihost_utils.reached_preemption_sync_point(step) or anyone
    return self.requested

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _host(metrics: dict) -> dict:
  return jax.tree.map(np.asarray, jax.device_get(metrics))


def _finite(metrics: dict) -> bool:
  return bool(np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]))


def train(config, workdir: str) -> dict:
  """Train per ``config`` in ``workdir`` (resuming if it holds checkpoints). Returns the last
  logged record plus the final held-out loss and the samples."""
  setup = start_setup(config)
  c, mesh = config, setup.mesh
  say(f"model {setup.model_cfg.name}: {analytics.summary(setup.model_cfg, c.train.seq_len)}")
  for line in startup_report(setup):
    say(line)
  say(f"workdir {workdir}")
  data_iter = iter(make_data(setup))
  ckpt = _checkpointer(setup, workdir)
  graphdef, state, shardings, start = restore_or_init(setup, ckpt, data_iter)
  if start:
    say(f"resumed from step {start} ({ckpt.directory})")
  options = StepOptions(grad_accum=c.train.grad_accum, lr_schedule=lr_schedule(_optimizer_cfg(c)),
                        router_bias_rate=piecewise_constant(c.train.router_bias_rate))
  loss = PretrainLoss(setup.model_cfg.n_mtp_modules, piecewise_constant(c.train.mtp_weight))
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
  preemption = _Preemption()
  record: dict = {}
  try:
    for step in range(start + 1, c.train.steps + 1):
      state, metrics = step_fn(state, global_batch(setup, next(data_iter)))
      if step == start + 1:  # keep compile time out of the throughput numbers
        jax.block_until_ready(metrics)
        say(f"step {step} (including compilation) took {logger.compiled(step):.1f} s")
      last = step == c.train.steps
      due_save = step % c.checkpoint.every == 0 or last
      stop = preemption.reached(step)
      if step % c.train.log_every == 0 or due_save or stop:
        host = _host(metrics)
        if not _finite(host):
          good = ckpt.latest_step()
          raise TrainingDiverged(
              f"loss or gradient norm is not finite at step {step} (loss {host['loss']}, "
              f"grad norm {host['grad_norm']}); stopped without saving. Last good checkpoint: "
              f"{'step ' + str(good) if good else 'none'} in {ckpt.directory}. Lower "
              "config.optimizer.learning_rate or raise warmup_steps, then rerun to resume.")
        if step % c.train.log_every == 0 or last:
          record = logger.log(step, host)
        if host.get("overflow", 0) > 0:
          say(f"warning: step {step}: {int(host['overflow'])} expert assignments did not fit "
              f"the expert-parallel receive buffers and were left out; raise "
              f"config.model.overrides.expert_buffer_factor, or leave it unset (worst case)")
      if c.train.eval_every and step % c.train.eval_every == 0:
        with logger.paused():
          say(f"eval at step {step}: {_evaluate_state(setup, graphdef, state)}")
      if due_save or stop:
        with logger.paused():
          ckpt.save(step, state, data_iter, record_cfg, force=True)
      if stop:
        ckpt.wait()
        say(f"SIGTERM: saved step {step} to {ckpt.directory}; stopping (rerun to resume)")
        return dict(record, preempted_at=step)
  finally:
    preemption.restore()
    ckpt.close()
    logger.close()
  final = dict(record, eval=_evaluate_state(setup, graphdef, state))
  say(f"held-out: loss {final['eval']['loss']:.4f}, perplexity {final['eval']['perplexity']:.2f}")
  final["samples"] = _sample_state(setup, graphdef, state)
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


def _sample_state(setup: Setup, graphdef, state: TrainState, prompts=None) -> list[str]:
  c, tok = setup.config, setup.tokenizer
  prompts = list(prompts or c.sample.prompts)
  model = nnx.merge(graphdef, state.params, state.model_state)
  # Few short rows: local MoE dispatch (no expert-parallel split of a handful of tokens).
  set_execution(model, resolve_execution(setup.model_cfg, setup.mesh, expert_parallel=False))
  bos = [tok.bos_id] if tok.bos_id is not None else []
  encoded = [bos + tok.encode(p) for p in prompts]
  out = generate(model, encoded, max_new_tokens=c.sample.max_new_tokens,
                 sampling=SamplingConfig(temperature=c.sample.temperature),
                 stop_tokens=[tok.eos_id] if tok.eos_id is not None else [],
                 pad_id=tok.pad_id, rng=jax.random.key(c.seed))
  tokens, lengths = (multihost_utils.process_allgather(a, tiled=True) for a in out)
  texts = []
  for prompt, row, n in zip(prompts, np.asarray(tokens), np.asarray(lengths)):
    texts.append(prompt + tok.decode(row[:n]))
    say(f"--- sample ---\n{texts[-1]}")
  return texts


def _load_for_inference(config, workdir: str, step: Optional[int]):
  setup = start_setup(config)
  ckpt = _checkpointer(setup, workdir)
  step = step or ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}; train first with --workdir={workdir}")
  graphdef, state, _ = _restore(setup, ckpt, step)
  ckpt.close()
  return setup, graphdef, state, step


def evaluate(config, workdir: str, step: Optional[int] = None, max_batches: Optional[int] = None):
  """Held-out loss / perplexity of a checkpoint (the latest by default)."""
  setup, graphdef, state, step = _load_for_inference(config, workdir, step)
  result = dict(_evaluate_state(setup, graphdef, state, max_batches), step=step)
  say(f"step {step}: held-out loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} "
      f"over {result['tokens']:,} tokens")
  return result


def sample(config, workdir: str, prompts=None, step: Optional[int] = None) -> list[str]:
  """Generate from a checkpoint (the latest by default)."""
  setup, graphdef, state, _ = _load_for_inference(config, workdir, step)
  return _sample_state(setup, graphdef, state, prompts)
