"""Experiment configs: command-line overrides, and errors that name the field before compiling."""

import os

import pytest
from absl import flags
from ml_collections import config_flags

from deepseek_jax import typed_fields
from deepseek_jax.config import ModelConfig
from deepseek_jax.train import trainer
from deepseek_jax.train.config import default_config, model_config, validate

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "configs")


def _parse(*args):
  argv = ["train.py", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_command_line_overrides_any_field():
  c = _parse(f"--config={CONFIGS}/small.py:runlocal", "--config.train.steps=7",
             "--config.optimizer.learning_rate=0.01", "--config.mesh.fsdp=2",
             "--config.data.packing=False")
  assert (c.train.steps, c.optimizer.learning_rate, c.mesh.fsdp, c.data.packing) == (7, 0.01, 2, False)
  assert c.optimizer.total_steps == -1  # -1: the schedule spans train.steps
  assert c.train.log_every == 10  # from the runlocal variant


def test_unknown_override_and_bad_value_and_unknown_variant_fail():
  with pytest.raises(AttributeError, match='Did you mean "steps"'):
    _parse(f"--config={CONFIGS}/small.py", "--config.train.stepz=7")
  with pytest.raises(flags.IllegalFlagValueError, match="seven"):
    _parse(f"--config={CONFIGS}/small.py", "--config.train.steps=seven")
  with pytest.raises(Exception, match="unknown variant"):
    _parse(f"--config={CONFIGS}/small.py:fast")


def _tiny(**train):
  c = default_config()
  c.model.preset = "tiny"
  c.model.overrides.vocab_size = 320
  c.mesh.update(dict(data=2, fsdp=4))
  c.train.update(train)
  return c


@pytest.mark.parametrize("change, field", [
    (lambda c: c.train.update(batch_size=12), "train.batch_size"),  # 12 % 8 devices
    (lambda c: c.train.update(batch_size=16, grad_accum=3), "train.batch_size"),
    (lambda c: c.train.update(batch_size=16, grad_accum=4), "train.batch_size"),  # micro 4 < 8
    (lambda c: c.train.update(steps=0), "train.steps"),
    (lambda c: c.optimizer.update(total_steps=3), "optimizer.total_steps"),
    (lambda c: c.train.update(mtp_weight=((10, 0.3),)), "train.mtp_weight"),
    (lambda c: c.model.overrides.update(n_activated_experts=99), "ModelConfig.n_activated_experts"),
    (lambda c: c.model.overrides.update(vocab_size=128), "vocab_size"),  # byte tokenizer needs 259
    (lambda c: c.mesh.update(data=3), "mesh"),
    (lambda c: c.partitioning.update(rules="zero9"), "rules"),
])
def test_invalid_configs_fail_before_compiling_with_the_field_named(change, field):
  c = _tiny(batch_size=16)
  change(c)
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    trainer.build_setup(c)


def test_unknown_field_in_a_config_file_is_rejected():
  c = _tiny(batch_size=16)
  c.train.learning_rate = 0.1  # belongs in optimizer: a typo a locked CLI cannot catch
  with pytest.raises(ValueError, match=r"unknown config field\(s\) \['train.learning_rate'\]"):
    trainer.build_setup(c)


def test_a_valid_config_builds_without_compiling():
  setup = trainer.build_setup(_tiny(batch_size=16))
  assert setup.model_cfg.name == "tiny" and dict(setup.mesh.shape)["fsdp"] == 4


def test_a_misspelt_override_is_one_error_line_and_exit_1(tmp_path):
  import subprocess
  import sys
  script = os.path.join(CONFIGS, "..", "train.py")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, script, f"--config={CONFIGS}/tiny.py",
                        f"--workdir={tmp_path / 'run'}", "--config.train.stpes=5"],
                       capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 1
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and 'Did you mean "steps"' in errors[0], out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert not (tmp_path / "run").exists()  # nothing written


def _parse_file(tmp_path, *args):
  """Parse a temporary config file (``default_config()``) the way experiments/train.py does."""
  path = tmp_path / "default.py"
  path.write_text("from deepseek_jax.train.config import default_config\n\n\n"
                  "def get_config():\n  return default_config()\n")
  argv = ["train.py", f"--config={path}", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_default_config_types_every_model_field_from_its_annotation():
  overrides = default_config().model.overrides
  kinds = typed_fields.field_types(ModelConfig)
  assert sorted(overrides) == sorted(set(kinds) - {"name"})
  for field in overrides:
    assert overrides.get_type(field) is kinds[field].flag_type, field
    assert overrides[field] is None, field  # None keeps the preset's value


# Optional fields that are None in the tiny preset, and values of their type.
_SAMPLES = dict(n_kv_heads=2, capacity_factor=1.25, expert_buffer_factor=2.0)


def test_every_model_field_is_overridable_from_the_command_line_with_its_type(tmp_path):
  tiny = ModelConfig.preset("tiny")
  values = {f: getattr(tiny, f) for f in typed_fields.field_types(ModelConfig) if f != "name"}
  values.update(_SAMPLES)
  c = _parse_file(tmp_path, "--config.model.preset=tiny",
                  *(f"--config.model.overrides.{f}={v}" for f, v in values.items()))
  for field, value in values.items():
    parsed = c.model.overrides[field]
    assert parsed == value and type(parsed) is type(value), (field, parsed)
  for field in _SAMPLES:  # a valid tiny config again: the samples go back to None
    c.model.overrides[field] = None
  assert model_config(c) == tiny


def test_command_line_choice_and_optional_overrides_reach_the_model_config(tmp_path):
  c = _parse_file(tmp_path, "--config.model.preset=tiny",
                  "--config.model.overrides.attention_kind=gqa",
                  "--config.model.overrides.n_kv_heads=2",
                  "--config.model.overrides.q_lora_rank=16",
                  "--config.model.overrides.dtype=bfloat16")
  cfg = model_config(c)
  assert (cfg.attention_kind, cfg.n_kv_heads, cfg.q_lora_rank, cfg.dtype) == ("gqa", 2, 16,
                                                                               "bfloat16")
  c = _parse_file(tmp_path, "--config.model.overrides.attention_kind=linear")
  with pytest.raises(ValueError) as error:
    model_config(c)
  assert str(error.value) == ("ModelConfig.attention_kind: must be one of ('mla', 'mha', 'gqa'), "
                              "got 'linear'")
  with pytest.raises(flags.IllegalFlagValueError, match="sixteen"):
    _parse_file(tmp_path, "--config.model.overrides.q_lora_rank=sixteen")


def test_the_fp8_ablation_switch_from_the_command_line(tmp_path):
  c = _parse_file(tmp_path, "--config.model.preset=tiny",
                  "--config.model.overrides.matmul_format=fp8_blockwise",
                  "--config.model.overrides.fp8_cache_inputs=true")
  cfg = model_config(c)
  assert (cfg.matmul_format, cfg.fp8_cache_inputs) == ("fp8_blockwise", True)
  c = _parse_file(tmp_path, "--config.model.overrides.matmul_format=fp4")
  with pytest.raises(ValueError, match=r"ModelConfig.matmul_format: must be one of \('bf16', "
                                       r"'fp8_blockwise', 'fp8_tensorwise'\), got 'fp4'"):
    model_config(c)
  c = _parse_file(tmp_path, "--config.model.overrides.fp8_cache_inputs=true")
  with pytest.raises(ValueError, match="fp8_cache_inputs: needs an FP8 matmul_format"):
    model_config(c)


def test_tuple_overrides_parse_through_absl_flags(tmp_path):
  c = _parse_file(tmp_path, "--config.train.mtp_weight=((0, 0.3), (100, 0.1))",
                  "--config.sample.prompts=a", "--config.sample.prompts=b")
  assert c.train.mtp_weight == ((0, 0.3), (100, 0.1))
  assert c.sample.prompts == ("a", "b")


def test_set_none_turns_an_optional_field_off_from_the_command_line(tmp_path):
  from deepseek_jax.train.config import model_config
  c = default_config()
  c.model.preset = "small"
  c.model.set_none = ("q_lora_rank",)
  assert model_config(c).q_lora_rank is None  # the small preset compresses queries (128)
  c.model.set_none = ("d_model",)
  with pytest.raises(ValueError, match="'d_model' is not an optional ModelConfig field"):
    model_config(c)
  c.model.set_none = ("q_lora_rank",)
  c.model.overrides.q_lora_rank = 16
  with pytest.raises(ValueError, match="also set by config.model.overrides.q_lora_rank=16"):
    model_config(c)


def test_set_none_parses_from_the_command_line(tmp_path):
  from deepseek_jax.train.config import model_config
  for args in (["--config.model.set_none=q_lora_rank,capacity_factor"],
               ["--config.model.set_none=q_lora_rank", "--config.model.set_none=capacity_factor"]):
    config = _parse_file(tmp_path, "--config.model.preset=deepseek-v2", *args)
    cfg = model_config(config)
    assert cfg.q_lora_rank is None and cfg.capacity_factor is None


def test_an_expert_axis_that_does_not_divide_the_experts_is_named_before_the_batch():
  c = default_config()
  c.model.preset = "tiny"
  c.train.batch_size = 8  # not a multiple of 3 either: the expert axis must be reported first
  with pytest.raises(ValueError, match="config.mesh.expert: 3 does not divide n_routed_experts=8"):
    validate(c, n_processes=1, batch_shards=3, expert_shards=3)


@pytest.mark.parametrize("path, value, match", [
    ("optimizer.learning_rate", 0.0, "config.optimizer.learning_rate: must be positive, got 0.0"),
    ("optimizer.learning_rate", -1e-3, "config.optimizer.learning_rate: must be positive"),
    ("optimizer.warmup_steps", -5, "config.optimizer.warmup_steps: must be >= 0, got -5"),
    ("optimizer.moment_dtype", "int8", "config.optimizer.moment_dtype: must be one of"),
    ("data.eval_every", 0, "config.data.eval_every: .* must be >= 2, got 0"),
    ("data.text_errors", "ignore", "config.data.text_errors: must be one of"),
    ("sample.temperature", -0.5, "config.sample.temperature: must be >= 0"),
    ("sample.speculative", "eagle", "config.sample.speculative: must be '' \\(off\\) or 'mtp'"),
    ("train.eval_every", -1, "config.train.eval_every: train.eval_every must be >= 0"),
])
def test_values_that_fail_only_after_compiling_are_refused_up_front(path, value, match):
  c = default_config()
  section, field = path.split(".")
  c[section][field] = value
  with pytest.raises(ValueError, match=match):
    validate(c, n_processes=1, batch_shards=1)


def test_speculative_sampling_needs_mtp_modules():
  c = default_config()
  c.sample.speculative = "mtp"
  assert validate(c, n_processes=1, batch_shards=1).n_mtp_modules == 1  # small: one module
  c.model.overrides.n_mtp_modules = 0
  with pytest.raises(ValueError, match="config.sample.speculative: 'mtp' drafts with the MTP "
                     "modules, but the model has none"):
    validate(c, n_processes=1, batch_shards=1)
