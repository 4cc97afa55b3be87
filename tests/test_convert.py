"""python -m deepseek_jax.convert, and the README's load-and-generate one-liner, in subprocesses."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.inference.generate import generate
from deepseek_jax.interop.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
from deepseek_jax.interop.orbax_params import load_model, save_model
from deepseek_jax.model.transformer import create_model

REPO = pathlib.Path(__file__).resolve().parents[1]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return env


def _convert(*args):
  return subprocess.run([sys.executable, "-m", "deepseek_jax.convert", *args], env=_env(),
                        capture_output=True, text=True, timeout=600, cwd=REPO)


def _same_weights(a, b):
  fa, fb = (dict(nnx.to_flat_state(nnx.state(m))) for m in (a, b))
  assert sorted(fa) == sorted(fb)
  for path in fa:
    np.testing.assert_array_equal(np.asarray(fb[path][...]), np.asarray(fa[path][...]), str(path))


@pytest.fixture(scope="module")
def params_checkpoint(tmp_path_factory):
  model = create_model(ModelConfig.preset("tiny", init_std=0.1), seed=5)
  directory = tmp_path_factory.mktemp("orbax") / "params"
  save_model(model, str(directory))
  return model, directory


def test_convert_round_trips_orbax_hf_orbax_hf_bit_exactly(params_checkpoint, tmp_path):
  model, orbax_dir = params_checkpoint
  hf1, orbax2, hf2 = tmp_path / "hf1", tmp_path / "orbax2", tmp_path / "hf2"
  for args in ([f"--from_orbax={orbax_dir}", f"--to_hf={hf1}", "--expert_layout=fused"],
               [f"--from_hf={hf1}", f"--to_orbax={orbax2}"],
               [f"--from_orbax={orbax2}", f"--to_hf={hf2}", "--expert_layout=fused"]):
    proc = _convert(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "converted" in proc.stdout and "1 MTP" in proc.stdout
  for name in os.listdir(hf1):
    if name.endswith(".safetensors"):
      assert (hf1 / name).read_bytes() == (hf2 / name).read_bytes(), name
  _same_weights(model, load_hf_checkpoint(str(hf1)))
  _same_weights(model, load_model(str(orbax2)))


def test_convert_casts_to_bfloat16_on_request(params_checkpoint, tmp_path):
  _, orbax_dir = params_checkpoint
  proc = _convert(f"--from_orbax={orbax_dir}", f"--to_hf={tmp_path / 'bf16'}", "--dtype=bfloat16")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert load_hf_checkpoint(str(tmp_path / "bf16")).config.param_dtype == "bfloat16"


def test_convert_errors_are_one_line_and_nothing_is_overwritten(params_checkpoint, tmp_path):
  _, orbax_dir = params_checkpoint
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "mine.txt").write_text("keep")
  cases = [
      ([f"--from_orbax={orbax_dir}", f"--to_hf={tmp_path / 'taken'}"], "not empty"),
      ([f"--from_hf={tmp_path / 'absent'}", f"--to_orbax={tmp_path / 'x'}"], "no config.json"),
      ([f"--from_orbax={orbax_dir}", f"--to_orbax={tmp_path / 'y'}", f"--to_hf={tmp_path / 'z'}"],
       "exactly one source"),
      ([f"--from_orbax={orbax_dir}", f"--to_hf={tmp_path / 'w'}", "--mesh=experts=2"], "--mesh"),
  ]
  for args, message in cases:
    proc = _convert(*args)
    assert proc.returncode == 1, (args, proc.stderr[-2000:])
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and message in proc.stderr
    assert "Traceback" not in proc.stderr
  assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"


def test_readme_one_liner_loads_a_checkpoint_and_generates(tmp_path):
  """The exact command under <!-- hf-generate --> in the README, pointed at a tiny checkpoint
  with a word-level tokenizer, prints what our generate() decodes in-process."""
  tokenizers = pytest.importorskip("tokenizers")
  readme = (REPO / "README.md").read_text()
  command = re.search(r"<!-- hf-generate -->\n```bash\n(.*?)\n```", readme, re.S).group(1)
  directory = tmp_path / "ckpt"
  model = create_model(ModelConfig.preset("tiny", init_std=0.1, n_mtp_modules=0,
                                          mtp_loss_weight=0.0), seed=7)
  save_hf_checkpoint(model, str(directory))
  words = ["[UNK]", "The", "capital", "of", "France", "is"] + [f"w{i}" for i in range(122)]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                          unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(directory / "tokenizer.json"))

  proc = subprocess.run(command.replace("/ckpt/DeepSeek-V2-Lite", str(directory)), shell=True,
                        env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-2000:]
  expected = generate(model, [tok.encode("The capital of France is").ids], max_new_tokens=32)
  assert proc.stdout.strip() == tok.decode(np.asarray(expected.tokens[0]).tolist())
  assert len(proc.stdout.split()) == 32
