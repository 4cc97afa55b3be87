"""The RL run behind ``experiments/rl.py``: rollout -> rule rewards -> GRPO or PPO update, with
the pretraining run's checkpoints, resume, preemption and NaN stop.

    setup   validate the config (RL fields included), mesh, tokenizer, the prompt sets (every
            prompt checked against the budget), the rewards -- all before any compile
    state   the workdir locked; resume the newest checkpoint that verifies (policy, optimizer,
            reference, value model, prompt position) or start from ``config.init_from``'s
            weights (a pretraining workdir, a parameters checkpoint or a Hugging Face directory)
    step    B prompts (more with DAPO dynamic sampling) -> G completions each (``rollout``) ->
            rewards (+ overlong shaping) -> learner.prepare -> learner.update (mu steps of the
            shared train step) -> metrics line -> every rl.eval_every: held-out accuracy
            (greedy) -> checkpoint every checkpoint.every, sealed once the next step is finite
            -> reference refresh every rl.ref_refresh_every
    end     final checkpoint and held-out accuracy, with the accuracy at the start

Every random choice is a function of (config.seed, step), and the prompt order is a grain
iterator saved with each checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import grain
import jax
import numpy as np
from flax import nnx

from deepseek_jax.inference.generate import SamplingConfig
from deepseek_jax.interop.integrity import step_directories
from deepseek_jax.interop.orbax_params import load_model, resolve_checkpoint, saved_record
from deepseek_jax.model.execution import resolve_execution, set_execution
from deepseek_jax.parallel.mesh import batch_shards
from deepseek_jax.rl import config as rl_config
from deepseek_jax.rl.memory import update_memory
from deepseek_jax.rl.advantages import informative_groups
from deepseek_jax.rl.grpo import GRPOLearner, RLState, copy_weights
from deepseek_jax.rl.ppo import PPOLearner, abstract_value_state, init_value_state
from deepseek_jax.rl.rewards import combine, overlong_penalty
from deepseek_jax.rl.rollout import (concat_rollouts, decode_completions, greedy_completions,
                                      rollout, take_groups, to_batch)
from deepseek_jax.rl.tasks import encode_prompts, prompt_ids, task_records
from deepseek_jax.train.checkpoint import (Checkpointer, check_compatible, check_data_position,
                                           config_record)
from deepseek_jax.train.metrics import MetricsLogger, say
from deepseek_jax.train.optimizer import make_optimizer, piecewise_constant
from deepseek_jax.train.step import (StepOptions, TrainState, abstract_train_state,
                                     init_train_state)
from deepseek_jax.train.trainer import (PREEMPTED_EXIT_CODE, Preemption, Setup,
                                        diverged_error, global_batch, start_setup)
from deepseek_jax.train.workdir import WorkdirLock, check_workdir

LEARNERS = {"grpo": GRPOLearner, "ppo": PPOLearner}
FLAT_REWARD_WARNING_STEPS = 5


class Task:
  """The prompt sets, their token ids, the stop tokens and the reward of a run."""

  def __init__(self, config, tokenizer, max_seq_len: int):
    r = config.rl
    self.train = task_records(config.task, "train")
    self.eval = task_records(config.task, "eval")
    # A row of train.seq_len + 1 tokens (at most the model's max_seq_len) holds the prompt
    # and rl.max_new_tokens completion tokens.
    row = min(config.train.seq_len + 1, max_seq_len)
    chat = config.task.chat_template
    longest = max(len(prompt_ids(rec["prompt"], tokenizer, chat))
                  for rec in self.train + self.eval)
    fix = (f"a row holds config.train.seq_len + 1 = {config.train.seq_len + 1} tokens (at most "
           f"the model's max_seq_len {max_seq_len}), {r.max_new_tokens} of them "
           f"(config.rl.max_new_tokens) for the completion: set config.train.seq_len >= "
           f"{longest + r.max_new_tokens - 1} or lower config.rl.max_new_tokens")
    budget = row - r.max_new_tokens
    self.train_ids = encode_prompts(self.train, tokenizer, budget=budget, fix=fix,
                                    chat_template=chat)
    self.eval_ids = encode_prompts(self.eval, tokenizer, budget=budget, fix=fix,
                                   chat_template=chat)
    self.stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    for text in r.stop:
      ids = tokenizer.encode(text)
      if len(ids) != 1:
        raise ValueError(f"config.rl.stop: {text!r} is {len(ids)} tokens; each stop string must "
                         "be exactly one token of the tokenizer")
      self.stop.append(ids[0])
    self.reward = combine(r.rewards.to_dict())
    # A bad reward setting fails here, before compiling.
    self.reward(self.train[:1], [""], ["training record 0 (an empty completion, at start-up)"])
    self.tokenizer = tokenizer

  def decode(self, tokens, lengths) -> list[str]:
    """Completion texts of ``tokens`` [N, L] with ``lengths`` [N] (``decode_completions``)."""
    return decode_completions(self.tokenizer, self.stop, tokens, lengths)


def prompt_iterator(n_records: int, prompts_per_step: int, seed: int):
  """A checkpointable grain iterator of [prompts_per_step] record indices: a seeded shuffle of
  the training prompts, epoch after epoch."""
  ds = grain.MapDataset.range(n_records).seed(seed).shuffle().repeat()
  return iter(ds.batch(prompts_per_step).to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def sampling_model(setup: Setup, graphdef, policy):
  """The policy as a model for ``generate``: local MoE dispatch (a rollout's few tokens per
  step are not worth an expert-parallel exchange); its arrays are the policy's own."""
  model = nnx.merge(graphdef, policy.params, policy.model_state)
  set_execution(model, resolve_execution(setup.model_cfg, setup.mesh, expert_parallel=False))
  return model


def greedy_accuracy(setup: Setup, graphdef, policy, task: Task, split: str = "eval",
                    limit: int = 0, rows: int = 64) -> float:
  """Greedy accuracy (the ``accuracy`` reward, else the total reward > 0) over the first
  ``limit`` prompts (0: all) of ``split``: "eval" (held out) or "train" (the first as many as
  the held-out split has, or ``limit``), ``rows`` prompts per generate call."""
  r = setup.config.rl
  model = sampling_model(setup, graphdef, policy)
  if split == "eval":
    ids, records = task.eval_ids, task.eval
  else:
    ids, records = task.train_ids[:len(task.eval)], task.train[:len(task.eval)]
  if limit:
    ids, records = ids[:limit], records[:limit]
  tokens, lengths = greedy_completions(model, ids, max_new_tokens=r.max_new_tokens,
                                       stop_tokens=task.stop, pad_id=task.tokenizer.pad_id,
                                       rows=rows)
  total, parts = task.reward(records, task.decode(tokens, lengths))
  scores = parts["accuracy"] if "accuracy" in parts else (total > 0).astype(np.float32)
  return float(np.mean(scores))


def check_init_from(setup: Setup) -> str:
  """Where ``config.init_from`` points (a step folder, or a Hugging Face directory), after
  checking that its model is this config's model, before anything is compiled. Raises
  FileNotFoundError / CheckpointIntegrityError / ValueError naming config.init_from."""
  source, c = setup.config.init_from, setup.config
  if not os.path.exists(source):
    raise FileNotFoundError(f"config.init_from={source} does not exist; pretrain there first "
                            "(experiments/train.py --workdir=...), or give another workdir, "
                            "step folder or Hugging Face directory")
  if os.path.isfile(os.path.join(source, "config.json")):
    from deepseek_jax.interop.hf_checkpoint import read_hf_config
    from deepseek_jax.interop.hf_config import from_hf_config
    where, saved = source, from_hf_config(read_hf_config(source)).to_dict()
  else:
    try:
      root, step = resolve_checkpoint(source, report=say)
    except (FileNotFoundError, ValueError) as e:
      raise type(e)(f"config.init_from={source}: {e}") from None
    where = os.path.join(root, str(step))
    saved = saved_record(where).get("model_config")
    if saved is None:
      raise ValueError(f"config.init_from={source}: {where} has no model_config; it was not "
                       "written by deepseek-jax")
  check_compatible({"model_config": saved}, config_record(c, setup.model_cfg), where)
  return where


def initial_policy(setup: Setup, shardings: TrainState, where: str) -> TrainState:
  """The starting policy: the weights at ``where`` (``check_init_from``; "" = a random
  initialisation) restored straight into their shardings, a fresh optimizer state."""
  s, c = setup, setup.config
  if not where:
    say("warning: config.init_from is empty; RL starts from a random initialisation")
    return init_train_state(s.model_cfg, s.tx, s.mesh, s.rules, c.seed, s.execution)[1]
  if os.path.isfile(os.path.join(where, "config.json")):
    from deepseek_jax.interop.hf_checkpoint import load_hf_checkpoint
    model = load_hf_checkpoint(where, mesh=s.mesh, rules=c.partitioning.rules,
                               execution=s.execution)
  else:
    model = load_model(where, mesh=s.mesh, rules=c.partitioning.rules, execution=s.execution,
                       config=s.model_cfg, verified=True)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.device_put(params, shardings.params)
  rest = jax.device_put(rest, shardings.model_state)
  opt_state = jax.jit(s.tx.init, out_shardings=shardings.opt_state)(params)
  say(f"policy initialised from the weights of {where}")
  return TrainState(jax.device_put(np.int32(0), shardings.step), params, rest, opt_state)


def _value_tx(config):
  return make_optimizer(rl_config.optimizer_config(config, config.rl.value_learning_rate))


class Run:
  """The state of one RL run (module doc); ``run`` drives it."""

  def __init__(self, setup: Setup, workdir: str, task: Task, init_from: str = ""):
    self.setup, self.workdir, self.task = setup, workdir, task
    self.init_from = init_from  # checked by check_init_from ("" = not yet)
    c = setup.config
    self.algorithm = LEARNERS[c.rl.algorithm]
    self.ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=c.checkpoint.every,
                             keep=c.checkpoint.keep, async_save=c.checkpoint.async_save)
    self.data = prompt_iterator(len(task.train), c.rl.prompts_per_step, c.seed)
    self.value_tx = _value_tx(c) if c.rl.algorithm == "ppo" else None

  def _abstract(self):
    s = self.setup
    graphdef, sh, abstract = abstract_train_state(s.model_cfg, s.tx, s.mesh, s.rules,
                                                  s.execution)
    ref = ref_sh = value = value_sh = value_graphdef = None
    if self.algorithm.keeps_reference(s.config.rl):
      ref, ref_sh = (abstract.params, abstract.model_state), (sh.params, sh.model_state)
    if self.value_tx is not None:
      value_graphdef, value_sh, value = abstract_value_state(graphdef, abstract, self.value_tx,
                                                             s.mesh, s.rules)
    return (graphdef, value_graphdef, RLState(sh, ref_sh, value_sh),
            RLState(abstract, ref, value))

  def learner(self, graphdef, value_graphdef, shardings: RLState):
    """The GRPO or PPO learner of this run (its compiled steps)."""
    s, c = self.setup, self.setup.config
    options = StepOptions(grad_accum=c.train.grad_accum,
                          router_bias_rate=piecewise_constant(c.train.router_bias_rate))
    common = dict(model_cfg=s.model_cfg, graphdef=graphdef, shardings=shardings.policy,
                  tx=s.tx, options=options, mesh=s.mesh, rules=s.rules, rl=c.rl,
                  put=_put(s))
    if c.rl.algorithm == "ppo":
      common.update(value_graphdef=value_graphdef, value_shardings=shardings.value,
                    value_tx=self.value_tx)
    return self.algorithm.create(**common)

  def start(self, requested: Optional[int]):
    """(graphdef, value graphdef, RLState, shardings, start step)."""
    s, c = self.setup, self.setup.config
    if requested == 0:  # the initialisation: every saved step is newer
      start = 0
    else:
      start = self.ckpt.choose(requested, report=say, hint="or --step=0 to start from "
                               "config.init_from").step or 0
    graphdef, value_graphdef, shardings, abstract = self._abstract()
    if start:
      saved, now = self.ckpt.saved_config(start), config_record(c, s.model_cfg)
      check_compatible(saved, now, self.ckpt.directory)
      check_data_position(saved, now, self.ckpt.directory, start,
                          fields=rl_config.DATA_POSITION_FIELDS, init_from="init_from")
      old_rl = saved.get("experiment", {}).get("rl", {})
      if old_rl.get("algorithm") != c.rl.algorithm or (
          self.algorithm.keeps_reference(old_rl) != self.algorithm.keeps_reference(c.rl)):
        raise ValueError(
            f"cannot resume step {start} of {self.ckpt.directory}: it was saved with "
            f"rl.algorithm={old_rl.get('algorithm')!r}, beta={old_rl.get('beta')}, kl_coef="
            f"{old_rl.get('kl_coef')}, which keep different state than this config's "
            f"{c.rl.algorithm!r}, {c.rl.beta}, {c.rl.kl_coef}; resume with the saved values, or "
            f"start a new --workdir with --config.init_from={self.ckpt.directory}/{start}")
    newer = sorted(st for st in step_directories(self.ckpt.directory)
                   if st > start or requested == 0)
    if newer:
      say(f"moved step(s) {newer} (newer than step {start}) to "
          f"{self.ckpt.set_aside(newer, 'superseded')}; nothing was deleted")
    if start:
      state = self.ckpt.restore(start, abstract, self.data)
      say(f"resumed from step {start} ({self.ckpt.directory})")
      return graphdef, value_graphdef, state, shardings, start
    if c.init_from and not self.init_from:  # every saved step failed verification
      self.init_from = check_init_from(s)
    policy = initial_policy(s, shardings.policy, self.init_from)
    ref = copy_weights(policy) if shardings.ref is not None else None
    value = None
    if self.value_tx is not None:
      value_graphdef, value, _ = init_value_state(graphdef, policy, self.value_tx, s.mesh,
                                                  s.rules)
    return graphdef, value_graphdef, RLState(policy, ref, value), shardings, 0


def run(config, workdir: str, step: Optional[int] = None) -> dict:
  """RL per ``config`` in ``workdir`` (module doc): resume its newest checkpoint that verifies
  (or ``step``). Returns the last record plus ``eval_accuracy_start`` / ``eval_accuracy``;
  ``preempted_at`` when SIGTERM / Ctrl-C stopped it. Raises ValueError / FileNotFoundError for
  bad input (one line naming the field or file, before compiling), RewardError for a failing
  reward, TrainingDiverged, WorkdirLocked, SaveFailed."""
  check_workdir(workdir)
  setup = start_setup(config, schema=rl_config.default_config(), free_form=("rl.rewards",))
  rl_config.validate_rl(config, batch_shards(setup.mesh), jax.process_count())
  setup.tx = make_optimizer(rl_config.optimizer_config(config))  # train.steps x mu steps
  saved = step_directories(os.path.join(workdir, "checkpoints"))
  where = ""
  if config.init_from and (step == 0 or not saved):  # starting fresh: check it now
    where = check_init_from(setup)
  task = Task(config, setup.tokenizer, setup.model_cfg.max_seq_len)
  r = config.rl
  say(f"RL {r.algorithm}: {len(task.train)} training / {len(task.eval)} held-out prompts, "
      f"{r.prompts_per_step} prompts x G={r.group_size} per step, mu={r.iterations}, "
      f"rewards {dict(r.rewards.to_dict())}")
  lock = WorkdirLock(workdir, report=say)
  if jax.process_index() == 0:
    lock.acquire()
  preemption = Preemption()
  try:
    return preemption.late(_run_locked(Run(setup, workdir, task, where), step, preemption))
  finally:
    preemption.restore()
    lock.release()


def _put(setup: Setup):
  """Host rows (every process holds all of them) -> global arrays split over the batch axes."""
  n, i = jax.process_count(), jax.process_index()

  def put(host: dict) -> dict:
    local = {k: v[len(v) * i // n:len(v) * (i + 1) // n] for k, v in host.items()}
    return global_batch(setup, local)
  return put


def sample_step(run: Run, model, step: int):
  """Rollout of one step: B prompt groups (DAPO dynamic sampling: informative ones, sampling
  more prompts up to rl.dynamic_sampling_rounds times). Returns (rollout, rewards [N], metrics
  of the first round's completions: what the policy scores)."""
  c, task = run.setup.config, run.task
  r = c.rl
  sampling = SamplingConfig(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)
  pieces, metrics = [], {}
  kept = 0
  for round_ in range(r.dynamic_sampling_rounds + 1):
    indices = [int(i) for i in next(run.data)]
    prompts = [task.train_ids[i] for i in indices]
    records = [task.train[i] for i in indices for _ in range(r.group_size)]
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(c.seed), step), round_)
    ro = rollout(model, prompts, group_size=r.group_size, max_new_tokens=r.max_new_tokens,
                 sampling=sampling, stop_tokens=task.stop, pad_id=task.tokenizer.pad_id,
                 rng=rng, prompt_bucket=16)
    labels = [f"training record {i} (sample {g} of step {step})" for i in indices
              for g in range(r.group_size)]
    total, parts = task.reward(records, task.decode(ro.tokens, ro.lengths), labels)
    total = total + overlong_penalty(ro.lengths, r.max_new_tokens, r.overlong_buffer,
                                     r.overlong_penalty)
    # DAPO keeps groups with 0 < #correct < G: judged on accuracy when it is a component.
    judged = parts.get("accuracy", total)
    if round_ == 0:
      metrics = {"reward": float(total.mean()), "reward_std": float(total.std()),
                 **{f"reward_{k}": float(v.mean()) for k, v in parts.items()}}
      if "accuracy" in parts:
        metrics["accuracy"] = float(parts["accuracy"].mean())
      metrics["sampled_tokens"] = int(ro.lengths.sum())
    else:
      metrics["sampled_tokens"] += int(ro.lengths.sum())
    pieces.append((ro, total, judged))
    if not r.dynamic_sampling_rounds:
      break
    kept += int(informative_groups(judged, r.group_size).sum())
    if kept >= r.prompts_per_step:
      break
  if not r.dynamic_sampling_rounds:
    ro, total, _ = pieces[0]
    return ro, total, metrics
  # Informative groups first (in sampling order), then equal-reward ones (zero advantage) if
  # the rounds ran out: the batch keeps its shape, so nothing recompiles.
  ro_all = concat_rollouts([p[0] for p in pieces])
  total_all = np.concatenate([p[1] for p in pieces])
  informative = informative_groups(np.concatenate([p[2] for p in pieces]), r.group_size)
  order = list(np.flatnonzero(informative)) + list(np.flatnonzero(~informative))
  groups = order[:r.prompts_per_step]
  metrics["kept_groups"] = float(informative[groups].mean())
  metrics["sampling_rounds"] = float(len(pieces))
  rows = np.asarray([g * r.group_size + j for g in groups for j in range(r.group_size)])
  return take_groups(ro_all, groups), total_all[rows], metrics


def _evaluate(setup: Setup, graphdef, policy, task: Task) -> dict:
  """``eval_accuracy`` (held out) and ``train_accuracy`` (training prompts), both greedy."""
  limit = setup.config.rl.eval_prompts
  return {"eval_accuracy": greedy_accuracy(setup, graphdef, policy, task, "eval", limit),
          "train_accuracy": greedy_accuracy(setup, graphdef, policy, task, "train", limit)}


class _RLLogger(MetricsLogger):
  def console_line(self, rec: dict) -> str:
    parts = [f"step {rec['step']}/{self.total_steps}"]
    if "reward" in rec:
      parts.append(f"reward {rec['reward']:.3f}")
    parts += [f"{k[7:]} {rec[k]:.3f}" for k in sorted(rec) if k.startswith("reward_")
              and k != "reward_std"]
    for key, label, fmt in (("eval_accuracy", "held-out acc", ".3f"),
                            ("train_accuracy", "train acc", ".3f"), ("kl", "kl", ".4f"),
                            ("clip_fraction", "clip", ".3f"), ("entropy", "entropy", ".3f"),
                            ("response_length", "len", ".1f"), ("value_loss", "vloss", ".4f"),
                            ("kept_groups", "kept", ".2f"), ("grad_norm", "gnorm", ".2f")):
      if key in rec:
        parts.append(f"{label} {rec[key]:{fmt}}")
    if "rollout_s" in rec:
      parts.append(f"rollout {rec['rollout_s']:.2f} s ({rec['rollout_tokens_per_s']:,.0f} tok/s) "
                   f"update {rec['update_s']:.2f} s ({rec['update_tokens_per_s']:,.0f} tok/s)")
    return " | ".join(parts)


def _run_locked(run: Run, requested: Optional[int], preemption: Preemption) -> dict:
  setup, task = run.setup, run.task
  c, r = setup.config, setup.config.rl
  try:
    graphdef, value_graphdef, state, shardings, start = run.start(requested)
  except BaseException:
    run.ckpt.manager.close()
    raise
  if start >= c.train.steps:
    run.ckpt.manager.close()
    say(f"already at step {start} (config.train.steps={c.train.steps}); nothing to do")
    return {"already_at": start}
  learner = run.learner(graphdef, value_graphdef, shardings)
  logger = _RLLogger(run.workdir, total_steps=c.train.steps, tokens_per_step=None,
                     flops_per_token=0.0, n_devices=jax.device_count(), peak_flops=0.0,
                     tensorboard=c.metrics.tensorboard,
                     resume_step=start if start else -1)  # a fresh start logs step 0 too
  # load_model, init_from, evaluate and sample read the policy's weights of an RL checkpoint.
  record_cfg = dict(config_record(c, setup.model_cfg), weights_under="policy")
  first_eval = None
  if start == 0:
    first = _evaluate(setup, graphdef, state.policy, task)
    first_eval = first["eval_accuracy"]
    n_eval = min(r.eval_prompts or len(task.eval), len(task.eval))
    say(f"before RL (greedy, {n_eval} prompts of each split): held-out "
        f"accuracy {first_eval:.3f}, training-set accuracy {first['train_accuracy']:.3f}")
    logger.log(0, first)
  record, failed, check_next = {}, True, start + 1
  flat = 0  # consecutive steps in which every completion got the same reward
  rows = r.prompts_per_step * r.group_size
  try:
    for step in range(start + 1, c.train.steps + 1):
      t0 = time.perf_counter()
      model = sampling_model(setup, graphdef, state.policy)
      ro, rewards, sample_metrics = sample_step(run, model, step)
      t1 = time.perf_counter()
      batch = learner.prepare(state, to_batch(ro, c.train.seq_len, task.tokenizer.pad_id),
                              rewards)
      state, metrics = learner.update(state, batch)
      t2 = time.perf_counter()
      run.ckpt.poll()
      if not metrics.pop("finite"):
        raise diverged_error(run.ckpt, step, f"loss or gradient norm is not finite (loss "
                                             f"{metrics['loss']}, grad norm "
                                             f"{metrics['grad_norm']})")
      if step == check_next and step - 1 > start:
        run.ckpt.confirm(step - 1)
      flat = flat + 1 if sample_metrics["reward_std"] == 0 else 0
      if flat == FLAT_REWARD_WARNING_STEPS:
        say(f"warning: for {flat} steps every completion got reward "
            f"{sample_metrics['reward']:g}, so no group has an advantage and nothing is "
            f"learned; check config.rl.rewards {r.rewards.to_dict()} against what the model "
            "writes (e.g. first_line for answers without <answer> tags)")
      if r.record_memory and step == start + 1:
        with logger.paused():
          metrics.update({f"memory_{k}_bytes": float(v)
                          for k, v in update_memory(learner, state, batch).items()})
      metrics.update(sample_metrics, rollout_s=t1 - t0, update_s=t2 - t1,
                     rollout_tokens_per_s=sample_metrics["sampled_tokens"] / (t1 - t0),
                     update_tokens_per_s=rows * c.train.seq_len * r.iterations / (t2 - t1))
      if r.ref_refresh_every and step % r.ref_refresh_every == 0 and state.ref is not None:
        state = state._replace(ref=copy_weights(state.policy))
      last = step == c.train.steps
      if (r.eval_every and step % r.eval_every == 0) or last:
        with logger.paused():
          metrics.update(_evaluate(setup, graphdef, state.policy, task))
      if (step % c.train.log_every == 0 or last or "eval_accuracy" in metrics
          or "memory_update_peak_bytes" in metrics):
        record = logger.log(step, metrics)
      stop = preemption.reached(step)
      if step % c.checkpoint.every == 0 or last or stop:
        if not metrics["state_finite"]:
          raise diverged_error(run.ckpt, step, "the updated parameters or optimizer moments "
                                               "are not finite")
        with logger.paused():
          run.ckpt.save(step, state, run.data, record_cfg, force=True)
        check_next = step + 1
        if last or stop:
          run.ckpt.confirm(step)
      if stop:
        run.ckpt.wait()
        say(f"{preemption.requested}: saved step {step} to {run.ckpt.directory}; stopping "
            f"(exit code {PREEMPTED_EXIT_CODE}; rerun to resume)")
        failed = False
        return dict(record, preempted_at=step)
    run.ckpt.wait()
    failed = False
  finally:
    logger.close()
    if failed:
      try:
        run.ckpt.manager.close()
      except Exception:  # noqa: BLE001 (the error in flight is the one to report)
        pass
    else:
      run.ckpt.close()
  result = dict(record, eval_accuracy_start=first_eval)
  say(f"held-out accuracy: {record.get('eval_accuracy', float('nan')):.3f}"
      + (f" (before RL: {first_eval:.3f})" if first_eval is not None else ""))
  return result
