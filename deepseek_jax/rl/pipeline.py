r"""The DeepSeek-R1 pipeline (R1 §2.3, REFERENCE.md §7) at toy scale, one resumable run per stage.

    base ──> cold_start_sft ──> reasoning_rl ──> rejection_sft ──> all_rl
      └────────────────────────> r1_zero (RL straight from the base: the comparison row)

    cold_start_sft  SFT of the base on rule-written chain-of-thought records (rl/cold_start.py)
    reasoning_rl    GRPO on the arithmetic prompts, in the chat template, rewarded by accuracy +
                    format + language consistency (R1 §2.3.2)
    rejection_sft   N samples per training prompt from reasoning_rl, kept when every required
                    reward component passes (rl/rejection.py), mixed with non-reasoning records
                    (the corpus's Q/A pairs answered directly), then SFT of the BASE on that set
                    (R1 §2.3.3 fine-tunes DeepSeek-V3-Base, not the RL checkpoint)
    all_rl          GRPO from rejection_sft on every scenario: arithmetic and fact questions
    r1_zero         GRPO from the base on the raw prompts, first-line accuracy (the recipe of
                    experiments/configs/r1_zero.py); it runs first, so the comparison row exists
                    even when the chain stops

Layout of ``workdir``, one folder per seed (``pipeline.seeds``)::

    seed0/data/       prompt files, the cold-start and rejection-sampling SFT sets, acceptance
    seed0/<stage>/    the stage's own training / RL workdir (checkpoints, metrics.jsonl)
    seed0/eval/<stage>.json    the stage's held-out evaluation (``evaluate``)
    r1_pipeline.csv / .md       the table over seeds

A stage whose final step is saved and verifies is skipped (with a warning when a stage it was
built from has changed since: ``<stage>/pipeline_inputs.json``); an interrupted one resumes
(its own runner resumes from its newest verified checkpoint); SIGTERM / Ctrl-C stops the
pipeline after the running stage saves. ``pipeline.stages`` runs a subset; input stages that
are neither requested nor finished stop the run before anything runs, named in one line.

Evaluation (every finished stage and the base): greedy completions of the held-out prompts
(arithmetic problems and fact questions that no stage trained on) -> accuracy per task, format
rate (R1's template), mean completion length in tokens; and the KL to the base, the mean per
completion token of log pi(y_t) - log pi_base(y_t) over completions sampled from the stage's
policy at temperature 1 (the k1 estimator of KL(pi || pi_base), REFERENCE.md §7).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
from typing import Callable, Optional

import jax
import ml_collections
import numpy as np
from flax import nnx

from deepseek_jax.inference.generate import SamplingConfig
from deepseek_jax.interop.integrity import choose_step, step_directories
from deepseek_jax.interop.orbax_params import load_model, resolve_checkpoint
from deepseek_jax.model.execution import resolve_execution, set_execution
from deepseek_jax.parallel.mesh import batch_shards
from deepseek_jax.rl import config as rl_config
from deepseek_jax.rl import loop
from deepseek_jax.rl.cold_start import cold_start_records
from deepseek_jax.rl.grpo import log_prob_fn
from deepseek_jax.rl.rejection import accept
from deepseek_jax.rl.rewards import accuracy_reward, combine, format_reward
from deepseek_jax.rl.rollout import decode_completions, greedy_completions, rollout, to_batch
from deepseek_jax.rl.tasks import KIND_OF_OP, arithmetic_records, fact_records, prompt_ids
from deepseek_jax.train import config as train_config
from deepseek_jax.train import trainer
from deepseek_jax.train.data import sft_examples
from deepseek_jax.train.metrics import say

# In the order they run: R1-Zero first, so the comparison row exists even when the chain stops.
STAGES = ("r1_zero", "cold_start_sft", "reasoning_rl", "rejection_sft", "all_rl")
# The stage whose weights each stage starts from ("base": config.init_from) and the stage
# whose output it needs.
STARTS_FROM = {"cold_start_sft": "base", "reasoning_rl": "cold_start_sft",
               "rejection_sft": "base", "all_rl": "rejection_sft", "r1_zero": "base"}
NEEDS = {"cold_start_sft": (), "reasoning_rl": ("cold_start_sft",),
         "rejection_sft": ("reasoning_rl",), "all_rl": ("rejection_sft",), "r1_zero": ()}
# The table's rows: the chain in order, then the comparison.
ROWS = ("base", "cold_start_sft", "reasoning_rl", "rejection_sft", "all_rl", "r1_zero")
CHAT_STAGES = ("cold_start_sft", "reasoning_rl", "rejection_sft", "all_rl")
COMPONENTS = ("accuracy", "format", "language")


def default_config() -> ml_collections.ConfigDict:
  """The RL config (rl/config.py: model, optimizer, ``rl.*`` for both RL stages) plus
  ``pipeline.*``: which stages and seeds, the SFT settings, each stage's length, rejection
  sampling and evaluation."""
  c = rl_config.default_config()
  c.task.chat_template = True
  c.rl.stop = ()  # a chat model ends its answer with <eos>
  c.rl.max_new_tokens = 128
  c.train.seq_len = 168  # the longest chat prompt (36 tokens) + 128 new tokens fit
  # R1's reasoning RL: accuracy + format + language consistency, summed.
  c.rl.rewards = ml_collections.ConfigDict({"accuracy": {"weight": 1.0},
                                            "format": {"weight": 1.0},
                                            "language": {"weight": 1.0}})
  p = c.pipeline = ml_collections.ConfigDict()
  p.stages = ",".join(STAGES)  # a comma-separated subset runs only those
  p.seeds = "0,1"  # one run of every stage per seed, in <workdir>/seed<N>
  # The task family: arithmetic "a op b =" (operands 0..max_operand, ops) and fact questions
  # about the corpus world; eval_fraction of each is held out from every stage.
  p.ops = "+-*"
  p.max_operand = 9
  p.eval_fraction = 0.2
  p.split_seed = 0
  p.corpus_seed = 0
  # Cold start: rule-written chain-of-thought records (operands up to cold_start_max_operand,
  # held-out prompts excluded).
  p.cold_start_records = 400
  p.cold_start_max_operand = 99
  # Both SFT stages.
  p.sft_steps = 100
  p.sft_batch_size = 8
  p.sft_seq_len = 256
  p.sft_learning_rate = 1e-3
  p.sft_warmup_steps = 5
  p.sft_eval_every = 20  # every 20th SFT record is held out (the SFT stages' eval loss)
  # RL stage lengths (steps of rl.prompts_per_step x rl.group_size rollouts).
  p.reasoning_rl_steps = 30
  p.all_rl_steps = 30
  p.r1_zero_steps = 60
  # Rejection sampling: samples per training prompt, the reward components a kept sample must
  # pass (score 1.0; comma-separated, "" keeps every distinct sample), the cap per prompt, and
  # the non-reasoning records (fact questions answered directly) mixed in.
  p.rejection_samples = 4
  p.rejection_require = "accuracy,format,language"
  p.rejection_per_prompt = 2
  p.rejection_temperature = 1.0
  p.qa_records = 100
  # Evaluation: completions sampled per held-out prompt for the KL estimate.
  p.kl_samples = 4
  return c


def _fail(field: str, message: str):
  raise ValueError(f"config.pipeline.{field}: {message}")


def stages_of(config) -> list[str]:
  """``pipeline.stages`` as a list in pipeline order. Raises ValueError naming an unknown
  stage."""
  asked = [s.strip() for s in config.pipeline.stages.split(",") if s.strip()]
  unknown = [s for s in asked if s not in STAGES]
  if unknown or not asked:
    _fail("stages", f"unknown or no stage(s) {unknown}; choose from {','.join(STAGES)}")
  return [s for s in STAGES if s in asked]


def seeds_of(config) -> list[int]:
  try:
    seeds = [int(s) for s in str(config.pipeline.seeds).split(",") if s.strip()]
  except ValueError:
    seeds = []
  if not seeds:
    _fail("seeds", f"a comma-separated list of integer seeds, got {config.pipeline.seeds!r}")
  return seeds


def validate_pipeline(config) -> None:
  """The pipeline fields' checks and every stage's config checks (``stage_config`` +
  the runners' validation), before anything is compiled. Raises ValueError naming the
  field."""
  p = config.pipeline
  stages_of(config)
  seeds_of(config)
  for name in ("cold_start_records", "sft_steps", "sft_batch_size", "sft_seq_len",
               "reasoning_rl_steps", "all_rl_steps", "r1_zero_steps", "rejection_samples",
               "rejection_per_prompt", "kl_samples"):
    if p[name] < 1:
      _fail(name, f"must be >= 1, got {p[name]}")
  if p.qa_records < 0 or p.sft_learning_rate <= 0:
    _fail("qa_records", "qa_records must be >= 0 and sft_learning_rate > 0")
  unknown = set(_required(config)) - set(COMPONENTS)
  if unknown:
    _fail("rejection_require", f"unknown component(s) {sorted(unknown)}; choose from "
          f"{','.join(COMPONENTS)}")
  if not config.init_from:
    raise ValueError("config.init_from: the pipeline starts from a pretrained base; give its "
                     "workdir (experiments/train.py --config=experiments/configs/small.py)")
  for stage in STAGES:
    stage_config(config, stage, "/nonexistent", 0)  # builds (ml_collections checks types)


def _required(config) -> list[str]:
  return [s.strip() for s in config.pipeline.rejection_require.split(",") if s.strip()]


def _data(seed_dir: str, name: str) -> str:
  return os.path.join(seed_dir, "data", name)


def stage_config(config, stage: str, seed_dir: str, seed: int):
  """The config of one stage's run (a training config for the SFT stages, an RL config for
  the others), every field not named here as in ``config``."""
  p = config.pipeline
  start = config.init_from if STARTS_FROM[stage] == "base" else os.path.join(
      seed_dir, STARTS_FROM[stage])
  if stage.endswith("_sft"):
    c = train_config.default_config()
    for key in ("model", "mesh", "partitioning", "checkpoint", "distributed", "metrics"):
      c[key] = config[key].copy_and_resolve_references()
    c.cpu_devices = config.cpu_devices
    for key in ("tokenizer", "tokenizer_path", "bos_token", "eos_token", "pad_token"):
      c.data[key] = config.data[key]
    c.seed = seed
    c.data.source = "sft"
    c.data.sft_path = _data(seed_dir, "cold_start.jsonl" if stage == "cold_start_sft"
                            else "rejection_sft.jsonl")
    c.data.eval_every = p.sft_eval_every
    c.train.init_from = start
    c.train.steps = p.sft_steps
    c.train.batch_size = p.sft_batch_size
    c.train.seq_len = p.sft_seq_len
    c.train.log_every = 10
    c.optimizer.learning_rate = p.sft_learning_rate
    c.optimizer.warmup_steps = min(p.sft_warmup_steps, p.sft_steps - 1)
    c.checkpoint.every = p.sft_steps
    c.sample.chat_template = True
    c.sample.prompts = ("7 + 5 =", "Q: Where does Mia live?\nA:")
    c.sample.max_new_tokens = config.rl.max_new_tokens
    return c
  c = ml_collections.ConfigDict(config.to_dict())
  del c["pipeline"]
  c.seed = seed
  c.init_from = start
  c.task.source = "jsonl"
  c.task.eval_path = _data(seed_dir, "eval.jsonl")
  c.task.train_path = _data(seed_dir, "all_train.jsonl" if stage == "all_rl"
                            else "reasoning_train.jsonl")
  c.train.steps = p[f"{stage}_steps"]
  c.checkpoint.every = min(c.checkpoint.every, c.train.steps)
  if stage == "r1_zero":  # configs/r1_zero.py's recipe: the base continues "a op b =" directly
    c.task.chat_template = False
    c.task.eval_path = _data(seed_dir, "eval_arithmetic.jsonl")
    c.rl.stop = ("\n",)
    c.rl.max_new_tokens = 6
    c.train.seq_len = 16
    c.rl.rewards = ml_collections.ConfigDict({"accuracy": {"weight": 1.0, "first_line": True},
                                              "format": {"weight": 0.0},
                                              "language": {"weight": 0.0}})
  return c


# --- data -----------------------------------------------------------------------------------

def task_sets(config) -> dict[str, list[dict]]:
  """The prompt sets: ``reasoning_train`` (arithmetic), ``all_train`` (arithmetic + facts),
  ``eval`` (held-out arithmetic + facts), ``eval_arithmetic``; records carry ``kind``."""
  p = config.pipeline
  split = dict(eval_fraction=p.eval_fraction, seed=p.split_seed)
  arith = {s: arithmetic_records(s, ops=p.ops, max_operand=p.max_operand, **split)
           for s in ("train", "eval")}
  facts = {s: fact_records(s, corpus_seed=p.corpus_seed, **split) for s in ("train", "eval")}
  return {"reasoning_train": arith["train"], "all_train": arith["train"] + facts["train"],
          "eval": arith["eval"] + facts["eval"], "eval_arithmetic": arith["eval"]}


def qa_records(facts: list[dict], n: int, seed: int) -> list[dict]:
  """``n`` non-reasoning SFT records: fact questions (from ``facts``, the training split)
  answered directly, with the empty think block R1 writes for simple queries."""
  rng = np.random.default_rng(seed)
  chosen = [facts[int(i)] for i in rng.integers(0, len(facts), n)] if facts else []
  return [{"prompt": q["prompt"], "response": f"<think></think><answer>{q['answer']}</answer>",
           "answer": q["answer"], "kind": "qa"} for q in chosen]


def write_jsonl(path: str, records: list[dict]) -> None:
  """Write ``records`` to ``path`` (atomically: a temporary file, then a rename). An existing
  file with other contents is never replaced: ValueError says what to do."""
  text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      if f.read() == text:
        return
    raise ValueError(f"{path} holds other records than this config writes (was a pipeline "
                     "field changed?); use a new --workdir, or move that file away to "
                     "rebuild it")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def write_task_data(config, seed_dir: str, seed: int) -> dict[str, list[dict]]:
  """The prompt files and the cold-start set of one seed (deterministic: rewritten only when
  missing). Returns ``task_sets``."""
  p = config.pipeline
  sets = task_sets(config)
  for name, records in sets.items():
    write_jsonl(_data(seed_dir, f"{name}.jsonl"), records)
  held_out = {r["prompt"] for r in sets["eval"]}
  write_jsonl(_data(seed_dir, "cold_start.jsonl"),
              cold_start_records(p.cold_start_records, seed=seed,
                                 max_operand=p.cold_start_max_operand,
                                 corpus_seed=p.corpus_seed, exclude=held_out))
  return sets


def rejection_set(records, completions, reward, required, *, per_prompt: int, others,
                  usable=None, on_stats: Optional[Callable] = None):
  """Stage 3's SFT set: the completions that pass every ``required`` component (rl/rejection
  ``accept``; ``usable`` as there) plus the non-reasoning records ``others``. Returns
  (records, Acceptance); ``on_stats(stats)`` is called first (to save the table). Raises
  ValueError showing the acceptance per kind and per component when nothing passed:
  fine-tuning on the non-reasoning records alone would not be stage 3."""
  kept, stats = accept(records, completions, reward, {c: 1.0 for c in required},
                       per_prompt=per_prompt, usable=usable)
  if on_stats is not None:
    on_stats(stats)
  if not kept:
    rates = ", ".join(f"{k or '-'} {stats.rate(k):.1%}" for k in sorted(stats.sampled))
    parts = ", ".join(f"{c} {v:.1%}" for c, v in stats.components.items())
    raise ValueError(f"rejection sampling kept none of {sum(stats.sampled.values())} "
                     f"completions (acceptance per kind: {rates}; passing each requirement: "
                     f"{parts or 'nothing required'}); the reasoning_rl policy writes no "
                     "accepted answer: fine-tune and train it longer "
                     "(config.pipeline.sft_steps, config.pipeline.reasoning_rl_steps), sample "
                     "more (config.pipeline.rejection_samples), or require less "
                     "(config.pipeline.rejection_require; empty keeps every distinct sample)")
  return kept + list(others), stats


# --- stages ---------------------------------------------------------------------------------

def finished_step(workdir: str, steps: int) -> Optional[int]:
  """The newest step of ``workdir``'s checkpoints that verifies, when it is ``steps`` or
  later (the stage is done); else None."""
  root = os.path.join(workdir, "checkpoints")
  if not step_directories(root) or max(step_directories(root)) < steps:
    return None
  step = choose_step(root, None, report=say).step
  return step if step is not None and step >= steps else None


def _stage_steps(config, stage: str) -> int:
  p = config.pipeline
  return p.sft_steps if stage.endswith("_sft") else p[f"{stage}_steps"]


def _load(setup, workdir: str):
  """(model for sampling, step) of the newest verified checkpoint of ``workdir`` (a
  pretraining, SFT or RL workdir, or a step folder)."""
  root, step = resolve_checkpoint(workdir, report=say)
  model = load_model(os.path.join(root, str(step)), mesh=setup.mesh,
                     rules=setup.config.partitioning.rules, execution=setup.execution,
                     config=setup.model_cfg, verified=True)
  set_execution(model, resolve_execution(setup.model_cfg, setup.mesh, expert_parallel=False))
  return model, step


def sample_rejection(config, seed_dir: str, seed: int, setup, sets) -> None:
  """Stage 3's data: ``rejection_samples`` completions of every training arithmetic prompt
  from the reasoning_rl checkpoint, selected (``rejection_set``), mixed with ``qa_records``;
  written with the acceptance table to ``data/``."""
  p, r = config.pipeline, config.rl
  out = _data(seed_dir, "rejection_sft.jsonl")
  if os.path.exists(out):
    say(f"rejection sampling: {out} exists; skipped (move it away to sample again)")
    return
  model, step = _load(setup, os.path.join(seed_dir, "reasoning_rl"))
  tok = setup.tokenizer
  records = sets["reasoning_train"]
  ids = [prompt_ids(rec["prompt"], tok, True) for rec in records]
  stop = [tok.eos_id] if tok.eos_id is not None else []
  texts, usable = [], []
  chunk = 32
  for i, start in enumerate(range(0, len(ids), chunk)):
    part = ids[start:start + chunk]
    padded = part + [part[-1]] * (chunk - len(part))  # one compiled shape
    ro = rollout(model, padded, group_size=p.rejection_samples, max_new_tokens=r.max_new_tokens,
                 sampling=SamplingConfig(temperature=p.rejection_temperature), stop_tokens=stop,
                 pad_id=tok.pad_id, rng=jax.random.fold_in(jax.random.key(seed), i),
                 prompt_bucket=16)
    n = len(part) * p.rejection_samples
    texts += decode_completions(tok, stop, ro.tokens[:n], ro.lengths[:n])
    # A model's vocabulary may be larger than the tokenizer's: ids with no text never pass.
    usable += [bool((row[:k] < tok.vocab_size).all())
               for row, k in zip(ro.tokens[:n], ro.lengths[:n])]
  repeated = [rec for rec in records for _ in range(p.rejection_samples)]
  reward = combine({name: {"weight": 1.0} for name in COMPONENTS})
  facts = [rec for rec in sets["all_train"] if rec["kind"] == "fact"]

  def save(stats):
    table = stats.table()
    say(f"rejection sampling from reasoning_rl step {step}:\n{table}")
    with open(_data(seed_dir, "acceptance.md"), "w", encoding="utf-8") as f:
      f.write(table + "\n")

  mixed, _ = rejection_set(repeated, texts, reward, _required(config),
                           per_prompt=p.rejection_per_prompt,
                           others=qa_records(facts, p.qa_records, seed), usable=usable,
                           on_stats=save)
  say(f"{len(mixed) - p.qa_records} reasoning + {p.qa_records} non-reasoning records")
  write_jsonl(out, mixed)


def check_order(config, stages, seed_dir: str) -> None:
  """Every input stage of a requested stage is requested before it or already finished.
  Raises ValueError naming the whole missing chain, before anything runs."""
  missing = []
  def need(stage):
    for before in NEEDS[stage]:
      if before in stages or before in missing:
        continue
      if finished_step(os.path.join(seed_dir, before), _stage_steps(config, before)) is None:
        missing.append(before)
        need(before)
  for stage in stages:
    need(stage)
  if missing:
    chain = [s for s in STAGES if s in missing]
    fixed = ",".join(s for s in STAGES if s in stages or s in missing)
    raise ValueError(f"config.pipeline.stages={','.join(stages)} needs stage(s) "
                     f"{','.join(chain)} finished in {seed_dir}, and they are not; add them: "
                     f"--config.pipeline.stages={fixed}")


def _input_record(config, stage: str, seed_dir: str) -> dict:
  """What a stage was built from: its starting checkpoint and, for rejection_sft, the
  reasoning_rl checkpoint it sampled (the newest step of each)."""
  record = {}
  sources = [STARTS_FROM[stage]] + list(NEEDS[stage])
  for source in dict.fromkeys(sources):
    where = config.init_from if source == "base" else os.path.join(seed_dir, source)
    steps = step_directories(os.path.join(where, "checkpoints"))
    record[source] = max(steps) if steps else None
  return record


def run_stage(config, stage: str, seed_dir: str, seed: int, setup, sets) -> dict:
  """Run (or resume) one stage; a finished stage is skipped (with a warning when a stage it
  was built from has changed since). Returns the runner's result (``preempted_at`` when
  SIGTERM / Ctrl-C stopped it; {} when skipped). Raises ValueError naming the pipeline field
  for bad input."""
  workdir = os.path.join(seed_dir, stage)
  marker = os.path.join(workdir, "pipeline_inputs.json")
  done = finished_step(workdir, _stage_steps(config, stage))
  if done is not None:
    say(f"stage {stage} (seed {seed}): done (step {done} in {workdir}); skipped")
    if os.path.exists(marker):
      with open(marker) as f:
        built_from = json.load(f)
      now = _input_record(config, stage, seed_dir)
      if built_from != now:
        say(f"warning: stage {stage} was built from {built_from} and its inputs are now at "
            f"{now}; move {workdir} away to rebuild it from them")
    return {}
  say(f"=== stage {stage} (seed {seed}) -> {workdir}")
  with pipeline_fields(stage):
    if stage == "rejection_sft":
      sample_rejection(config, seed_dir, seed, setup, sets)
    c = stage_config(config, stage, seed_dir, seed)
    result = trainer.train(c, workdir) if stage.endswith("_sft") else loop.run(c, workdir)
  if not result.get("preempted_at"):
    with open(marker, "w") as f:
      json.dump(_input_record(config, stage, seed_dir), f)
  return result


# A stage's own field -> the pipeline field that sets it (error messages name the latter).
SFT_FIELDS = {"train.seq_len": "pipeline.sft_seq_len", "train.steps": "pipeline.sft_steps",
              "train.batch_size": "pipeline.sft_batch_size",
              "optimizer.learning_rate": "pipeline.sft_learning_rate",
              "optimizer.warmup_steps": "pipeline.sft_warmup_steps",
              "data.eval_every": "pipeline.sft_eval_every"}
TASK_FIELDS = {"task.ops": "pipeline.ops", "task.max_operand": "pipeline.max_operand",
               "task.eval_fraction": "pipeline.eval_fraction", "task.seed": "pipeline.split_seed"}


@contextlib.contextmanager
def pipeline_fields(stage: Optional[str] = None):
  """ValueErrors raised inside name the pipeline's fields (``SFT_FIELDS``, ``TASK_FIELDS``,
  ``train.steps`` of an RL stage) and the stage (if one), instead of the stage run's own
  fields."""
  names = dict(TASK_FIELDS)
  if stage and stage.endswith("_sft"):
    names.update(SFT_FIELDS)
  elif stage in STAGES:
    names["train.steps"] = f"pipeline.{stage}_steps"
  try:
    yield
  except ValueError as e:
    message = str(e)
    for own, theirs in names.items():
      message = re.sub(rf"\bconfig\.{re.escape(own)}\b", f"config.{theirs}", message)
    raise type(e)(f"stage {stage}: {message}" if stage else message) from e


def check_stages(config, stages, seed_dir: str, seed: int, setup) -> None:
  """Each stage's config through its runner's checks, and every RL prompt against its
  stage's token budget, so a bad field stops the pipeline before its first stage compiles.
  Raises ValueError naming the field."""
  shards, procs = batch_shards(setup.mesh), jax.process_count()
  for stage in stages:
    c = stage_config(config, stage, seed_dir, seed)
    with pipeline_fields(stage):
      if stage.endswith("_sft"):
        train_config.validate(c, procs, shards)
        if stage == "cold_start_sft":
          for split in ("train", "eval"):
            longest = max(len(ids) for ids, _ in sft_examples(c.data, setup.tokenizer, split))
            if longest - 1 > c.train.seq_len:
              raise ValueError(f"config.train.seq_len={c.train.seq_len} is shorter than the "
                               f"longest cold-start record ({longest} tokens); use >= "
                               f"{longest - 1}")
      else:
        train_config.validate(c, procs, shards, schema=rl_config.default_config(),
                              free_form=("rl.rewards",))
        rl_config.validate_rl(c, shards, procs)
        loop.Task(c, setup.tokenizer, setup.model_cfg.max_seq_len)


# --- evaluation -----------------------------------------------------------------------------

def evaluate(setup, model, base_model, records: list[dict], *, chat_template: bool,
             max_new_tokens: int, kl_samples: int, seed: int, rows: int = 32) -> dict:
  """Held-out metrics of ``model`` (module doc): ``accuracy_<kind>`` (greedy; the ``<answer>``
  tags, or for a raw-prompt model its first line), ``accuracy`` (over every record),
  ``format_rate``, ``response_length`` (mean completion tokens, stop token included) and
  ``kl_to_base`` (nats per completion token). ``records``: held-out prompt records."""
  tok = setup.tokenizer
  stop = [tok.eos_id] if tok.eos_id is not None else []
  if not chat_template:
    stop = stop + tok.encode("\n")
  ids = [prompt_ids(rec["prompt"], tok, chat_template) for rec in records]
  tokens, n = greedy_completions(model, ids, max_new_tokens=max_new_tokens, stop_tokens=stop,
                                 pad_id=tok.pad_id, rows=rows)
  texts, lengths = decode_completions(tok, stop, tokens, n), [int(x) for x in n]
  correct = [accuracy_reward(rec, text, first_line=not chat_template)
             for rec, text in zip(records, texts)]
  result = {"accuracy": float(np.mean(correct)),
            "format_rate": float(np.mean([format_reward(rec, t)
                                          for rec, t in zip(records, texts)])),
            "response_length": float(np.mean(lengths)), "prompts": len(records)}
  kinds = [rec.get("kind", "") for rec in records]
  for kind in sorted(set(kinds)):
    result[f"accuracy_{kind or 'other'}"] = float(np.mean(
        [c for k, c in zip(kinds, correct) if k == kind]))
  arithmetic = [c for k, c in zip(kinds, correct) if k in KIND_OF_OP.values()]
  if arithmetic:
    result["accuracy_arithmetic"] = float(np.mean(arithmetic))
  result["kl_to_base"] = kl_to_base(setup, model, base_model, ids, stop=stop,
                                    max_new_tokens=max_new_tokens, samples=kl_samples,
                                    seed=seed, rows=rows)
  result["example"] = records[0]["prompt"] + " -> " + texts[0]
  return result


def kl_to_base(setup, model, base_model, ids, *, stop, max_new_tokens: int, samples: int,
               seed: int, rows: int = 32) -> float:
  """Mean over completion tokens of log pi(y_t) - log pi_base(y_t), y sampled from ``model``
  at temperature 1 (``samples`` per prompt): the k1 Monte-Carlo estimate of KL(pi || pi_base)
  per token, in nats. pi's log-probs are the sampler's own (equal to a forward pass to ~1e-5,
  tests/inference/test_generate.py); pi_base's come from a forward pass of the base."""
  tok = setup.tokenizer
  seq_len = max(len(x) for x in ids) + max_new_tokens
  _, base_params, base_rest = nnx.split(base_model, nnx.Param, ...)
  graphdef = nnx.graphdef(base_model)
  base_log_probs = log_prob_fn(graphdef, setup.mesh, 1.0)
  per_chunk = max(1, rows // samples)
  total, count = 0.0, 0.0
  for i, start in enumerate(range(0, len(ids), per_chunk)):
    part = ids[start:start + per_chunk]
    part = part + [part[-1]] * (per_chunk - len(part))
    ro = rollout(model, part, group_size=samples, max_new_tokens=max_new_tokens,
                 sampling=SamplingConfig(temperature=1.0), stop_tokens=stop, pad_id=tok.pad_id,
                 rng=jax.random.fold_in(jax.random.key(seed + 1000), i), prompt_bucket=16)
    batch = to_batch(ro, seq_len, tok.pad_id)
    real = min(len(ids) - start, per_chunk) * samples  # padded prompts' rows do not count
    base = np.asarray(base_log_probs(base_params, base_rest, {
        k: batch[k] for k in ("inputs", "targets", "mask", "token_mask")}))
    mask = batch["mask"][:real]
    total += float(((batch["old_log_probs"][:real] - base[:real]) * mask).sum())
    count += float(mask.sum())
  return total / max(count, 1.0)


def evaluate_stage(config, stage: str, seed_dir: str, seed: int, setup, base, sets) -> dict:
  """The held-out metrics of ``stage`` ("base" or a finished stage), cached in
  ``eval/<stage>.json`` with the step they were measured at."""
  where = config.init_from if stage == "base" else os.path.join(seed_dir, stage)
  cache = os.path.join(seed_dir, "eval", f"{stage}.json")
  model, step = (base if stage == "base" else _load(setup, where))
  if os.path.exists(cache):
    with open(cache) as f:
      saved = json.load(f)
    if saved.get("step") == step and saved.get("where") == os.path.abspath(where):
      return saved
  chat = stage in CHAT_STAGES
  result = evaluate(setup, model, base[0], sets["eval"], chat_template=chat,
                    max_new_tokens=config.rl.max_new_tokens, kl_samples=config.pipeline.kl_samples,
                    seed=seed)
  result.update(stage=stage, seed=seed, step=step, where=os.path.abspath(where))
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  with open(cache, "w") as f:
    json.dump(result, f, indent=1)
  say(f"{stage} (seed {seed}, step {step}): held-out accuracy {result['accuracy']:.3f} "
      f"(arithmetic {result.get('accuracy_arithmetic', 0):.3f}, facts "
      f"{result.get('accuracy_fact', 0):.3f}), format "
      f"{result['format_rate']:.2f}, length {result['response_length']:.1f}, KL to base "
      f"{result['kl_to_base']:.3f}; e.g. {result['example']!r}")
  return result


# --- the run --------------------------------------------------------------------------------

def run(config, workdir: str, report: Callable[[str], None] = say) -> dict:
  """Every requested stage for every seed (module doc), then the table. Returns ``rows`` (the
  table's rows, one per stage and seed: ``evaluate``'s metrics), or ``preempted`` (the stage)
  and ``preempted_at`` (its saved step) when SIGTERM / Ctrl-C stopped a stage: rerun to
  resume. Raises ValueError / FileNotFoundError for bad input (one line naming the field,
  before compiling) and whatever a stage's runner raises."""
  validate_pipeline(config)
  stages = stages_of(config)
  if not os.path.exists(config.init_from):
    raise FileNotFoundError(f"config.init_from={config.init_from} does not exist; pretrain the "
                            "base there first (experiments/train.py --config=experiments/"
                            "configs/small.py --workdir=...)")
  os.makedirs(workdir, exist_ok=True)
  rows = []
  for seed in seeds_of(config):
    seed_dir = os.path.join(workdir, f"seed{seed}")
    with pipeline_fields():
      sets = write_task_data(config, seed_dir, seed)
    probe = stage_config(config, "reasoning_rl", seed_dir, seed)
    setup = trainer.start_setup(probe, schema=rl_config.default_config(),
                                free_form=("rl.rewards",))
    check_order(config, stages, seed_dir)
    check_stages(config, stages, seed_dir, seed, setup)
    try:
      base = _load(setup, config.init_from)
    except (FileNotFoundError, ValueError) as e:
      raise type(e)(f"config.init_from={config.init_from}: {e}") from None
    for stage in stages:
      result = run_stage(config, stage, seed_dir, seed, setup, sets)
      if result.get("preempted_at") is not None:
        say(f"the pipeline stopped in stage {stage} (seed {seed}) at its saved step "
            f"{result['preempted_at']}; rerun the same command to resume")
        return {"preempted": stage, "preempted_at": result["preempted_at"], "rows": rows}
    for stage in ROWS:
      steps = None if stage == "base" else _stage_steps(config, stage)
      if stage != "base" and finished_step(os.path.join(seed_dir, stage), steps) is None:
        continue
      rows.append(evaluate_stage(config, stage, seed_dir, seed, setup, base, sets))
  write_table(rows, workdir)
  report(table_markdown(rows))
  return {"rows": rows}


COLUMNS = (("accuracy_arithmetic", "held-out arithmetic acc", ".3f"),
           ("accuracy_fact", "held-out fact acc", ".3f"),
           ("format_rate", "format rate", ".2f"),
           ("response_length", "mean length (tokens)", ".1f"),
           ("kl_to_base", "KL to base (nats/token)", ".3f"))


def summary(rows: list[dict]) -> list[dict]:
  """One dict per stage present: each column's mean and per-seed values, in pipeline order."""
  out = []
  for stage in ROWS:
    mine = [r for r in rows if r["stage"] == stage]
    if not mine:
      continue
    entry = {"stage": stage, "seeds": [r["seed"] for r in mine]}
    for key, _, _ in COLUMNS:
      values = [r.get(key, float("nan")) for r in mine]
      entry[key] = float(np.mean(values))
      entry[f"{key}_per_seed"] = values
    out.append(entry)
  return out


def table_markdown(rows: list[dict]) -> str:
  """The markdown table: one row per stage, each cell the mean over seeds (the seeds'
  values in brackets)."""
  lines = ["| stage | " + " | ".join(label for _, label, _ in COLUMNS) + " |",
           "|---|" + "---|" * len(COLUMNS)]
  for entry in summary(rows):
    cells = []
    for key, _, fmt in COLUMNS:
      per = [0.0 if abs(v) < 5e-4 else v for v in entry[f"{key}_per_seed"]]  # no "-0.000"
      entry[key] = 0.0 if abs(entry[key]) < 5e-4 else entry[key]
      cells.append(f"{entry[key]:{fmt}}" + (" (" + ", ".join(f"{v:{fmt}}" for v in per) + ")"
                                            if len(per) > 1 else ""))
    name = entry["stage"] + (" (comparison)" if entry["stage"] == "r1_zero" else "")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_table(rows: list[dict], workdir: str) -> None:
  """``r1_pipeline.csv`` (one line per stage and seed) and ``r1_pipeline.md`` in workdir."""
  keys = ["stage", "seed", "step"] + [k for k, _, _ in COLUMNS] + ["accuracy", "prompts"]
  with open(os.path.join(workdir, "r1_pipeline.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  with open(os.path.join(workdir, "r1_pipeline.md"), "w") as f:
    f.write(table_markdown(rows) + "\n")
