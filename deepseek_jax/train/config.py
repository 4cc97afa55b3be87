"""The experiment config: every field a run reads, with its default, and the checks that run
before anything is compiled.

Experiment files (``experiments/configs/*.py``) start from ``default_config()`` and change
fields; the command line changes any field with ``--config.a.b=value``. ``validate`` rejects
unknown fields (a typo in a config file) and impossible combinations, naming the field and
the fix.
"""

from __future__ import annotations

import math

import ml_collections

from deepseek_jax import typed_fields
from deepseek_jax.config import ModelConfig


def typed_placeholders(cls: type, exclude: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """Every field of dataclass ``cls`` (but ``exclude``) as a typed placeholder: None keeps the
  dataclass's own value, and ``--config.<path>.FIELD=value`` parses as the field's type.

  The types come from ``typed_fields.field_types(cls)``: ``X | None`` parses as X, a
  ``Literal[...]`` as its literals' type (its choices are checked when ``cls`` is built, with a
  message listing them), ``tuple[X, ...]`` as a tuple (``--f=1,2``, ``--f='(1, 2)'`` or
  ``--f=1 --f=2``). Raises TypeError naming the field for an unsupported annotation.
  """
  return ml_collections.ConfigDict({
      name: ml_collections.config_dict.placeholder(kind.flag_type)
      for name, kind in typed_fields.field_types(cls).items() if name not in exclude})


def model_overrides() -> ml_collections.ConfigDict:
  """Every ModelConfig field but ``name`` as a typed placeholder: None keeps the preset's value,
  so ``--config.model.overrides.d_model=512`` parses as an int and a misspelt field fails."""
  return typed_placeholders(ModelConfig, exclude=("name",))


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.preset = "small"
  # Any ModelConfig field; None keeps the preset's value (e.g. overrides.attention_kind="gqa").
  c.model.overrides = model_overrides()
  # Optional ModelConfig fields to set to None (an override of None means "keep the preset"),
  # e.g. --config.model.set_none=q_lora_rank,capacity_factor (no query compression, dropless).
  c.model.set_none = ()

  c.data = ml_collections.ConfigDict()
  c.data.source = "corpus"  # corpus | text | tokens | sft
  c.data.corpus_documents = 20000
  c.data.corpus_seed = 0
  c.data.text_glob = ""
  c.data.tokens_path = ""
  # data.source="sft": JSON lines of {"prompt", "response", optional "system"}; the loss is on
  # the response only (deepseek_jax/train/sft.py). Every data.eval_every-th record is held out.
  c.data.sft_path = ""
  c.data.tokenizer = "byte"  # byte | hf
  c.data.tokenizer_path = ""  # tokenizer.json when tokenizer == "hf"
  c.data.bos_token = ml_collections.config_dict.placeholder(str)
  c.data.eos_token = ml_collections.config_dict.placeholder(str)
  c.data.pad_token = ml_collections.config_dict.placeholder(str)
  c.data.packing = True  # False: one chunk per row, padded
  c.data.packing_bins = 64
  c.data.eval_every = 50  # every 50th document is held out (>= 2)
  # text files that are not valid UTF-8: "strict" refuses them (naming the file and byte),
  # "replace" trains on U+FFFD in place of the bad bytes and reports how many there were.
  c.data.text_errors = "strict"

  c.train = ml_collections.ConfigDict()
  c.train.steps = 600
  c.train.batch_size = 16  # global, in sequences
  c.train.seq_len = 256
  c.train.grad_accum = 1
  c.train.log_every = 20
  c.train.eval_every = 0  # 0: no periodic eval
  c.train.eval_batches = 8
  c.train.mtp_weight = ((0, 0.3),)  # (start step, lambda) pieces; V3: 0.3 then 0.1
  c.train.router_bias_rate = ((0, 0.001),)  # (start step, gamma) pieces; V3: 0.001 then 0
  # Fine-tuning: start from the weights of this checkpoint (a workdir, a parameters checkpoint
  # from convert, or one step folder .../checkpoints/N) with a fresh optimizer and data; used
  # only when the workdir has no checkpoint yet.
  c.train.init_from = ""

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 3e-3
  c.optimizer.schedule = "cosine"  # cosine | wsd | constant
  c.optimizer.warmup_steps = 50
  c.optimizer.total_steps = -1  # length of the LR schedule; -1 = train.steps
  c.optimizer.final_lr_fraction = 0.1
  c.optimizer.decay_fraction = 0.2  # wsd only
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.moment_dtype = "float32"  # bfloat16: both Adam moments in bf16 (V3)

  c.mesh = ml_collections.ConfigDict(dict(stage=1, data=1, fsdp=-1, expert=1, tensor=1))
  # Pipeline parallelism over mesh.stage > 1 (deepseek_jax/parallel/pipeline/): the schedule
  # (gpipe | 1f1b | dualpipe), micro-batches per (grad_accum) micro-batch (0: 2 x stages), and
  # optional uneven cuts: MoE layers per pipeline stage (empty: even, mesh.stage must divide).
  c.pipeline = ml_collections.ConfigDict()
  c.pipeline.schedule = "1f1b"
  c.pipeline.micro_batches = 0
  c.pipeline.layers_per_stage = ()
  # On a CPU-only host: split it into this many XLA devices to run mesh layouts (expert
  # parallelism, FSDP) without accelerators; 0 = one device. Ignored on GPU/TPU.
  c.cpu_devices = 0
  c.partitioning = ml_collections.ConfigDict(dict(rules="fsdp"))

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 100
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = "auto"  # auto (when launched as several processes) | always | never
  c.distributed.coordinator = ""  # host:port; empty = from the environment
  c.distributed.num_processes = 0
  c.distributed.process_id = -1

  c.metrics = ml_collections.ConfigDict()
  c.metrics.peak_flops_per_device = 0.0  # 0: look up the device, or measure it on CPU
  c.metrics.tensorboard = True

  c.sample = ml_collections.ConfigDict()
  # Printed after training (and by experiments/sample.py); () samples nothing after training.
  c.sample.prompts = ("Mia lives in", "Q: Where does Leo live?\nA:", "12 + 7 =")
  c.sample.max_new_tokens = 48
  c.sample.temperature = 0.0
  # Prompts in the SFT chat template (<bos><|User|>prompt<|Assistant|>, train/sft.py), for a
  # model fine-tuned on chat records (data.source="sft").
  c.sample.chat_template = False
  # "mtp": speculative decoding with the MTP modules as the draft (inference/speculative.py);
  # the same text when greedy, the same distribution when sampling. "": plain decoding.
  c.sample.speculative = ""
  return c


def schedule_steps(config) -> int:
  """The LR schedule's length: optimizer.total_steps, or train.steps when it is -1."""
  total = config.optimizer.total_steps
  return config.train.steps if total < 0 else total


def model_config(config) -> ModelConfig:
  """The ModelConfig of an experiment config (validated by ModelConfig itself). Raises
  ValueError naming the field for a ``model.set_none`` entry that is not an optional field or
  is also overridden."""
  overrides = {k: v for k, v in config.model.overrides.items() if v is not None}
  types = typed_fields.field_types(ModelConfig)
  names = [n.strip() for entry in config.model.set_none for n in str(entry).split(",")]
  for name in filter(None, names):
    if name not in types or not types[name].optional:
      optional = sorted(n for n, t in types.items() if t.optional)
      raise ValueError(f"config.model.set_none: {name!r} is not an optional ModelConfig field; "
                       f"those are {optional}")
    if name in overrides:
      raise ValueError(f"config.model.set_none: {name!r} is also set by "
                       f"config.model.overrides.{name}={overrides[name]!r}; keep one")
    overrides[name] = None
  overrides.setdefault("max_seq_len", max(ModelConfig.preset(config.model.preset).max_seq_len,
                                          config.train.seq_len))
  return ModelConfig.preset(config.model.preset, **overrides)


def _unknown_fields(config, schema, prefix="", free_form=()) -> list[str]:
  unknown = []
  for key in config.keys():
    if key not in schema:
      unknown.append(prefix + key)
    elif isinstance(schema[key], ml_collections.ConfigDict) and prefix + key not in free_form:
      unknown += _unknown_fields(config[key], schema[key], f"{prefix}{key}.", free_form)
  return unknown


def _fail(field: str, message: str):
  raise ValueError(f"config.{field}: {message}")


def validate(config, n_processes: int, batch_shards: int, expert_shards: int = 1,
             schema=None, free_form=(), stages: int = 1, fsdp_shards: int = 1) -> ModelConfig:
  """Every check that does not need the model compiled. Returns the ModelConfig.
  ``batch_shards`` / ``expert_shards`` / ``stages`` / ``fsdp_shards``: how many ways the mesh
  splits the batch / the experts / the layers (pipeline stages) / the weights (fsdp);
  ``schema``: the config holding every known field (default ``default_config()``; RL adds its
  sections); ``free_form``: dotted paths whose keys are the user's (RL's reward mapping)."""
  schema = schema if schema is not None else default_config()
  unknown = _unknown_fields(config, schema, free_form=free_form)
  if unknown:
    raise ValueError(f"unknown config field(s) {unknown}; see deepseek_jax/train/config.py")
  model = model_config(config)
  if config.sample.get("speculative") == "mtp" and model.n_mtp_modules < 1:
    _fail("sample.speculative", "'mtp' drafts with the MTP modules, but the model has none; set "
          "config.model.overrides.n_mtp_modules >= 1 (and train them) or leave it ''")
  if model.n_moe_layers and model.n_routed_experts % expert_shards:
    _fail("mesh.expert", f"{expert_shards} does not divide n_routed_experts="
          f"{model.n_routed_experts}; use a divisor of it")
  t = config.train
  for field in ("steps", "batch_size", "seq_len", "grad_accum", "log_every"):
    if t[field] <= 0:
      _fail(f"train.{field}", f"must be positive, got {t[field]}")
  if t.batch_size % t.grad_accum:
    _fail("train.batch_size", f"{t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
  micro = t.batch_size // t.grad_accum
  need = math.lcm(batch_shards, n_processes)
  if micro % need:
    _fail("train.batch_size", f"the micro-batch of {micro} sequences (batch_size / grad_accum) "
          f"must be divisible by the mesh's batch axes data*fsdp*expert={batch_shards} and by the "
          f"{n_processes} process(es); use a multiple of {need}")
  _check_pipeline(config, model, stages, micro // batch_shards, fsdp_shards)
  if 0 <= config.optimizer.total_steps < t.steps:
    _fail("optimizer.total_steps", f"{config.optimizer.total_steps} < train.steps={t.steps}: the "
          "schedule would end before training does (-1 = train.steps)")
  if config.checkpoint.every <= 0 or config.checkpoint.keep <= 0:
    _fail("checkpoint.every", "checkpoint.every and checkpoint.keep must be positive")
  if config.data.packing_bins <= 0:
    _fail("data.packing_bins", "must be positive")
  for field in ("mtp_weight", "router_bias_rate"):
    pieces = list(t[field])
    if not pieces or pieces[0][0] != 0:
      _fail(f"train.{field}", f"must be ((0, value), (step, value), ...), got {t[field]}")
  _check_ranges(config)
  return model


def _check_pipeline(config, model: ModelConfig, stages: int, rows_per_shard: int,
                    fsdp_shards: int) -> None:
  """The pipeline section against the mesh's stage axis (``train.pipeline``)."""
  from deepseek_jax.parallel.pipeline import SCHEDULES, Schedule, stage_layers
  p = config.get("pipeline")
  if p is None:
    return
  if p.schedule not in SCHEDULES:
    _fail("pipeline.schedule", f"must be one of {SCHEDULES}, got {p.schedule!r}")
  if p.micro_batches < 0:
    _fail("pipeline.micro_batches", f"must be >= 0 (0: 2 x mesh.stage), got {p.micro_batches}")
  if stages == 1:
    return
  if not model.n_moe_layers:
    _fail("mesh.stage", "pipeline parallelism cuts the MoE stack into stages and this model has "
          "no MoE layers; use mesh.stage=1")
  if fsdp_shards != 1:
    _fail("mesh.fsdp", f"is {fsdp_shards}; it must be 1 with pipeline stages (mesh.stage="
          f"{stages}): XLA cannot yet partition the stages' ZeRO-3 weight gathers inside the "
          "pipeline; shard the batch with mesh.data instead (V3 trains PP x EP x data "
          "parallelism, no ZeRO-3), e.g. --config.mesh.fsdp=1 --config.mesh.data=-1")
  schedule = Schedule(p.schedule, stages, pipeline_micro_batches(config, stages))
  stage_layers(model.n_moe_layers, stages, tuple(p.layers_per_stage))
  if rows_per_shard % schedule.n_micro:
    default = " (the default, 2 x mesh.stage)" if not p.micro_batches else ""
    _fail("pipeline.micro_batches", f"{schedule.n_micro} pipeline micro-batches{default} must "
          f"divide each batch shard's {rows_per_shard} sequences per step (train.batch_size / "
          "grad_accum / the batch axes); change train.batch_size or pipeline.micro_batches")


def pipeline_micro_batches(config, stages: int) -> int:
  """Pipeline micro-batches per (grad_accum) micro-batch: config.pipeline.micro_batches, or
  2 x stages when it is 0."""
  return config.pipeline.micro_batches or 2 * stages


MOMENT_DTYPES = ("float32", "bfloat16", "float16")
TEXT_ERRORS = ("strict", "replace")


def _check_ranges(config) -> None:
  """Values that would only fail (or silently misbehave) after compiling."""
  opt, t, d = config.optimizer, config.train, config.data
  if not opt.learning_rate > 0:
    _fail("optimizer.learning_rate", f"must be positive, got {opt.learning_rate}")
  if opt.warmup_steps < 0:
    _fail("optimizer.warmup_steps", f"must be >= 0, got {opt.warmup_steps}")
  if opt.moment_dtype not in MOMENT_DTYPES:
    _fail("optimizer.moment_dtype", f"must be one of {MOMENT_DTYPES}, got {opt.moment_dtype!r}")
  if opt.schedule not in ("cosine", "wsd", "constant"):
    _fail("optimizer.schedule", f"must be 'cosine', 'wsd' or 'constant', got {opt.schedule!r}")
  if t.eval_every < 0 or t.eval_batches <= 0:
    _fail("train.eval_every", "train.eval_every must be >= 0 (0: no periodic eval) and "
          f"train.eval_batches > 0, got {t.eval_every} and {t.eval_batches}")
  if d.eval_every < 2:
    _fail("data.eval_every", f"holds out every n-th document and must be >= 2, got {d.eval_every}")
  if d.text_errors not in TEXT_ERRORS:
    _fail("data.text_errors", f"must be one of {TEXT_ERRORS}, got {d.text_errors!r}")
  if config.sample.temperature < 0:
    _fail("sample.temperature", f"must be >= 0 (0: greedy), got {config.sample.temperature}")
  if config.sample.max_new_tokens < 1:
    _fail("sample.max_new_tokens", f"must be >= 1, got {config.sample.max_new_tokens}")
  speculative = config.sample.get("speculative", "")
  if speculative not in ("", "mtp"):
    _fail("sample.speculative", f"must be '' (off) or 'mtp', got {speculative!r}")

