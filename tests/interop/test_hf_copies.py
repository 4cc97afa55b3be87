"""Tensors a checkpoint stores twice are checked, not trusted: a tied model's stored
``lm_head.weight`` and the MTP layer's ``embed_tokens`` / ``shared_head.head`` must equal what
they copy. Equal copies load; a differing copy is refused naming it (never one picked silently)."""

import shutil
import tracemalloc

import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.interop.hf_checkpoint import (_IDENTITY, Entry, Quantization, _check_copies,
                                                load_hf_checkpoint, save_hf_checkpoint)
from deepseek_jax.interop.safetensors_io import (CheckpointError, CheckpointReader, TensorPlan,
                                                 write_checkpoint)
from deepseek_jax.model.transformer import create_model
from tests.interop.test_hf_checkpoint import _rewrite  # noqa: E402

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
MTP = "model.layers.3."  # tiny: 3 layers, then the MTP layer


def _nudged(x):
  """x with one element changed (row 5)."""
  x = x.copy()
  x[5, 3] += 1.0
  return x


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  """kind -> (model, directory): the tiny preset (with its MTP layer), untied or tied."""
  out = {}
  for kind in ("untied", "tied"):
    model = create_model(ModelConfig.preset("tiny", init_std=0.1, tie_embeddings=kind == "tied"),
                         seed=4)
    directory = tmp_path_factory.mktemp(kind) / "hf"
    save_hf_checkpoint(model, str(directory))
    out[kind] = model, directory
  return out


@pytest.fixture(params=["untied", "tied"])
def copy_of_export(exports, tmp_path, request):
  """A writable copy of one export."""
  model, directory = exports[request.param]
  target = tmp_path / "copy"
  shutil.copytree(directory, target)
  return model, target


@pytest.fixture
def tied_copy(exports, tmp_path):
  model, directory = exports["tied"]
  target = tmp_path / "copy"
  shutil.copytree(directory, target)
  return target


def test_equal_copies_load(copy_of_export):
  model, directory = copy_of_export
  if model.config.tie_embeddings:  # a tied head stored anyway, equal to the embedding
    _rewrite(directory, lambda t: t.update({HEAD: t[EMBED].copy()}))
  loaded = load_hf_checkpoint(str(directory))
  assert loaded.config.n_mtp_modules == 1
  for path, value in nnx.to_flat_state(nnx.state(model)):
    np.testing.assert_array_equal(np.asarray(dict(nnx.to_flat_state(nnx.state(loaded)))[path][...]),
                                  np.asarray(value[...]), err_msg=str(path))


def test_differing_tied_lm_head_is_refused_naming_it(tied_copy):
  target = tied_copy
  _rewrite(target, lambda t: t.update({HEAD: _nudged(t[EMBED])}))
  with pytest.raises(CheckpointError, match=r"lm_head\.weight differs from model\.embed_tokens\.weight "
                                            r"\(first in row 5\).*tie_word_embeddings"):
    load_hf_checkpoint(str(target))


def test_tied_lm_head_of_another_shape_is_refused(tied_copy):
  target = tied_copy
  _rewrite(target, lambda t: t.update({HEAD: t[EMBED][:-1].copy()}))
  with pytest.raises(CheckpointError, match=r"lm_head\.weight: checkpoint \[127, 64\], "
                                            r"model expects \[128, 64\]"):
    load_hf_checkpoint(str(target))


@pytest.mark.parametrize("copy", ["shared_head.head.weight", "embed_tokens.weight"])
def test_differing_mtp_copy_is_refused_naming_it(copy_of_export, copy):
  model, directory = copy_of_export
  source = EMBED if copy == "embed_tokens.weight" or model.config.tie_embeddings else HEAD
  _rewrite(directory, lambda t: t.update({MTP + copy: _nudged(t[MTP + copy])}))
  with pytest.raises(CheckpointError, match=rf"{MTP + copy} differs from {source} .*load_mtp=False"):
    load_hf_checkpoint(str(directory))
  assert load_hf_checkpoint(str(directory), load_mtp=False).config.n_mtp_modules == 0


def test_copies_are_compared_in_row_chunks(tmp_path):
  """A 4 MiB copy checked in 256 KiB chunks: the host never holds a whole extra copy, and a
  difference in the very last element is still found."""
  a = np.random.default_rng(0).standard_normal((4096, 256), dtype=np.float32)
  b = a.copy()
  b[-1, -1] += 1
  write_checkpoint(str(tmp_path), [TensorPlan("a", a.shape, a.dtype, lambda: a),
                                   TensorPlan("b", b.shape, b.dtype, lambda b=b: b),
                                   TensorPlan("c", a.shape, a.dtype, lambda: a)])
  del b
  reader = CheckpointReader(str(tmp_path))
  copy_c = Entry("c", a.shape, (), _IDENTITY, copy_of="a")
  tracemalloc.start()
  _check_copies(reader, [copy_c], Quantization(), chunk_bytes=256 * 1024)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert peak < a.nbytes / 2, peak
  with pytest.raises(CheckpointError, match=r"b differs from a \(first in row 4095\)"):
    _check_copies(reader, [Entry("b", a.shape, (), _IDENTITY, copy_of="a")], Quantization(),
                  chunk_bytes=256 * 1024)
