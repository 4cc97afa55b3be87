"""Load and save DeepSeek-V2 / V2-Lite / V3 / R1 checkpoints in HF format (safetensors).

    model = load_hf_checkpoint("/ckpt/DeepSeek-V2-Lite")                  # one device
    model = load_hf_checkpoint("/ckpt/DeepSeek-V3", mesh=mesh, rules="fsdp")  # sharded, any size
    model = load_hf_checkpoint("/ckpt/DeepSeek-R1", mesh=mesh, keep_fp8=True)  # FP8 inference
    save_hf_checkpoint(model, "/out/my-model")                            # back to HF format

Name map, per decoder layer i (HF ``model.layers.{i}.``; ours ``dense_layers[i]`` for
i < first_k_dense_replace, ``moe_layers[i - k]`` after; HF [out, in] matrices are transposed to
our [in, out] einsum layout, per-head axes split out):

    input_layernorm / post_attention_layernorm      attn_norm / ffn_norm
    self_attn.q_a_proj [Q, D] / q_a_layernorm         attention.query.wq_a [D, Q] / q_norm
    self_attn.q_b_proj [N(H+R), Q] (or q_proj [.., D]) attention.query.wq_b [Q, N, H+R] (wq)
    self_attn.kv_a_proj_with_mqa [C+R, D]             attention.wkv_a [D, C+R]
    self_attn.kv_a_layernorm                          attention.kv_norm
    self_attn.kv_b_proj [N(H+V), C]                   attention.w_uk [C, N, H] + w_uv [C, N, V]
    self_attn.o_proj [D, NV]                          attention.wo [N, V, D]
    mlp.{gate,up,down}_proj (dense layers)            ffn.w_gate / w_up [D, F], w_down [F, D]
    mlp.gate.weight [E, D] / .e_score_correction_bias ffn.gate [D, E] / ffn.router_bias [E]
    mlp.experts.{e}.{gate,up,down}_proj (hub layout)  ffn.w_gate[e], w_up[e] [D, F], w_down[e] [F, D]
    mlp.experts.gate_up_proj [E, 2F, D] (v5 fused)    ffn.w_gate, w_up [E, D, F] (gate rows first)
    mlp.experts.down_proj [E, D, F] (v5 fused)        ffn.w_down [E, F, D]
    mlp.shared_experts.{gate,up,down}_proj            ffn.shared.w_*

plus ``model.embed_tokens``, ``model.norm``, ``lm_head`` [V, D] (absent when tied). MTP depth j
is HF layer ``num_hidden_layers + j - 1`` (V3: 61): a full block plus ``enorm``, ``hnorm``,
``eh_proj`` [D, 2D] and ``shared_head.norm``; its ``embed_tokens`` and ``shared_head.head`` are
copies of the shared embedding and head (``Entry.copy_of``), written on save.

Copies are checked, not trusted: a tensor the loader skips because it duplicates another (the
MTP layers' ``embed_tokens`` / ``shared_head.head``, and a stored ``lm_head.weight`` when
``tie_word_embeddings`` is true) must equal what it copies, value for value. Equal: skipped.
Different: refused (``CheckpointError`` naming the tensor) rather than picking one of the two
silently; fix the checkpoint or its config.json. The comparison walks both memory-mapped
tensors in row chunks (``_COPY_CHECK_BYTES``), so the host never holds a second whole copy.

FP8 checkpoints (V3/R1: float8_e4m3fn weights with a ``weight_scale_inv`` per 128x128 block)
are dequantised on load, w = q * s block-wise in float32, then cast to ``param_dtype`` (bf16 for
released FP8 checkpoints, as DeepSeek's own fp8_cast_bf16 does). ``keep_fp8=True`` keeps them
instead, for inference: each FP8 weight becomes a ``quant.fp8.Fp8Weight`` (its E4M3 values and
block scales, transposed and reshaped to our layout: about half the bytes of BF16) wherever
the blocks survive the name map. A transpose, with per-head axes split out of the rows or the
columns, keeps every block; ``kv_b_proj``'s split into per-head W_UK / W_UV keeps them only
when qk_nope_head_dim and v_head_dim are multiples of the block's rows (V3: 128 / 128, yes);
other FP8 weights are dequantised as usual. One line reports what stayed FP8, what was
dequantised and why, and the bytes. ``quantization_config.scale_fmt: "ue8m0"`` (later
DeepSeek releases) makes every scale a power of two, 2^e, stored as float32 or as safetensors
``F8_E8M0`` (one exponent byte): w = q * 2^e is then exact in float32. With ue8m0 a float32
scale that is not a power of two is refused naming the tensor, as is the E8M0 NaN byte 0xFF in
any checkpoint; an unknown ``scale_fmt`` is refused naming the field. Scale values are checked
as each weight is dequantised.

Memory: every weight is built by ``jax.make_array_from_callback`` from memory-mapped tensors,
shard by shard: a process reads only the pieces its devices hold, and the host holds at most
one device shard plus the source tensor it is cut from. Saving writes tensor by tensor.
Everything is validated (files, names, shapes, copies) before any weight is loaded.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from deepseek_jax.config import ModelConfig
from deepseek_jax.interop.hf_config import from_hf_config, to_hf_config
from deepseek_jax.interop.safetensors_io import CheckpointError, CheckpointReader, TensorPlan, write_checkpoint
from deepseek_jax.model.execution import Execution, resolve_execution
from deepseek_jax.model.transformer import DeepSeekModel, abstract_model
from deepseek_jax.interop import require_new_directory
from deepseek_jax.parallel.partitioning import placement
from deepseek_jax.quant.fp8 import Fp8Weight, fp8_weight_bytes

EXPERT_LAYOUTS = ("hub", "fused")
_FP8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
_E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
_SCALE_FMTS = (None, "ue8m0")
_COPY_CHECK_BYTES = 16 * 2**20  # float64 bytes per side compared at a time


class Codec(NamedTuple):
  """HF tensor <-> our piece(s). ``decode`` returns numpy views (nothing copied).

  ``blocks`` (FP8 kept, ``load_hf_checkpoint(keep_fp8=True)``): the HF block scales [out/bo,
  in/bi] and the block (bo, bi) -> per piece (its scales over the piece's 2-D [in, out] view,
  the piece's number of trailing output axes), or a string saying why the blocks do not
  survive ``decode``; None: never kept."""

  decode: Callable[[np.ndarray], tuple]
  encode: Callable[..., np.ndarray]
  blocks: Optional[Callable[[np.ndarray, tuple], object]] = None


_IDENTITY = Codec(lambda x: (x,), lambda w: w)
_TRANSPOSE = Codec(lambda x: (x.T,), lambda w: w.T, lambda s, block: ((s.T, 1),))
_EXPERTS_T = Codec(lambda x: (x.transpose(0, 2, 1),), lambda w: w.transpose(0, 2, 1))


def _heads_out(n: int, h: int) -> Codec:
  """[N*H, In] <-> [In, N, H]: an output projection split into heads."""
  return Codec(lambda x: (x.T.reshape(x.shape[1], n, h),), lambda w: w.reshape(w.shape[0], n * h).T,
               lambda s, block: ((s.T, 2),))


def _heads_in(n: int, v: int) -> Codec:
  """o_proj [D, N*V] <-> [N, V, D]."""
  return Codec(lambda x: (x.T.reshape(n, v, x.shape[0]),),
               lambda w: w.reshape(n * v, w.shape[-1]).T,
               lambda s, block: ((s.T, 1),))


def _kv_b(n: int, h: int, v: int) -> Codec:
  """kv_b_proj [N*(H+V), C] <-> (W_UK [C, N, H], W_UV [C, N, V]); per head, key rows first."""

  def decode(x):
    y = x.reshape(n, h + v, x.shape[-1])
    return y[:, :h].transpose(2, 0, 1), y[:, h:].transpose(2, 0, 1)

  def encode(uk, uv):
    y = np.concatenate([uk.transpose(1, 2, 0), uv.transpose(1, 2, 0)], axis=1)
    return y.reshape(n * (h + v), y.shape[-1])

  def blocks(s, block):
    rows = block[0]  # each head's H key rows then V value rows: whole blocks, or cut ones
    if h % rows or v % rows:
      return (f"kv_b_proj splits per head at qk_nope_head_dim={h} / v_head_dim={v} rows, not "
              f"multiples of the {rows}-row FP8 block")
    y = s.reshape(n, (h + v) // rows, s.shape[-1])
    return ((y[:, :h // rows].reshape(-1, s.shape[-1]).T, 2),
            (y[:, h // rows:].reshape(-1, s.shape[-1]).T, 2))

  return Codec(decode, encode, blocks)


def _gate_up(f: int) -> Codec:
  """Fused experts gate_up_proj [E, 2F, D] <-> (w_gate, w_up) [E, D, F]."""
  return Codec(lambda x: (x[:, :f].transpose(0, 2, 1), x[:, f:].transpose(0, 2, 1)),
               lambda g, u: np.concatenate([g.transpose(0, 2, 1), u.transpose(0, 2, 1)], axis=1))


class Entry(NamedTuple):
  """One HF tensor: its name and shape, and the (our leaf path, leading index) pieces it holds."""

  name: str
  shape: tuple[int, ...]
  targets: tuple  # ((leaf path, lead index), ...), one per codec part
  codec: Codec
  float32: bool = False  # always stored in float32 (the score-correction bias)
  copy_of: Optional[str] = None  # the HF tensor this one duplicates: written, checked, not read


def _block_entries(cfg: ModelConfig, prefix: str, base: tuple, lead: tuple, moe: bool,
                   layout: str) -> list[Entry]:
  d, n, c = cfg.d_model, cfg.n_heads, cfg.kv_lora_rank
  h, r, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
  out: list[Entry] = []

  def add(name, shape, leaves, codec, lead_=lead, **kw):
    out.append(Entry(prefix + name, tuple(shape), tuple((base + leaf, lead_) for leaf in leaves),
                     codec, **kw))

  add("input_layernorm.weight", (d,), [("attn_norm", "scale")], _IDENTITY)
  add("post_attention_layernorm.weight", (d,), [("ffn_norm", "scale")], _IDENTITY)
  q = ("attention", "query")
  if cfg.q_lora_rank:
    add("self_attn.q_a_proj.weight", (cfg.q_lora_rank, d), [q + ("wq_a",)], _TRANSPOSE)
    add("self_attn.q_a_layernorm.weight", (cfg.q_lora_rank,), [q + ("q_norm", "scale")], _IDENTITY)
    add("self_attn.q_b_proj.weight", (n * (h + r), cfg.q_lora_rank), [q + ("wq_b",)], _heads_out(n, h + r))
  else:
    add("self_attn.q_proj.weight", (n * (h + r), d), [q + ("wq",)], _heads_out(n, h + r))
  add("self_attn.kv_a_proj_with_mqa.weight", (c + r, d), [("attention", "wkv_a")], _TRANSPOSE)
  add("self_attn.kv_a_layernorm.weight", (c,), [("attention", "kv_norm", "scale")], _IDENTITY)
  add("self_attn.kv_b_proj.weight", (n * (h + v), c), [("attention", "w_uk"), ("attention", "w_uv")],
      _kv_b(n, h, v))
  add("self_attn.o_proj.weight", (d, n * v), [("attention", "wo")], _heads_in(n, v))
  if not moe:
    f = cfg.dense_ffn_dim
    for proj, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
      add(f"mlp.{proj}_proj.weight", shape, [("ffn", f"w_{proj}")], _TRANSPOSE)
    return out
  e, f = cfg.n_routed_experts, cfg.moe_ffn_dim
  add("mlp.gate.weight", (e, d), [("ffn", "gate")], _TRANSPOSE)
  if cfg.router_bias:
    add("mlp.gate.e_score_correction_bias", (e,), [("ffn", "router_bias")], _IDENTITY, float32=True)
  if layout == "hub":
    for x in range(e):
      for proj, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
        add(f"mlp.experts.{x}.{proj}_proj.weight", shape, [("ffn", f"w_{proj}")], _TRANSPOSE,
            lead_=lead + (x,))
  else:
    add("mlp.experts.gate_up_proj", (e, 2 * f, d), [("ffn", "w_gate"), ("ffn", "w_up")], _gate_up(f))
    add("mlp.experts.down_proj", (e, d, f), [("ffn", "w_down")], _EXPERTS_T)
  if cfg.n_shared_experts:
    fs = cfg.n_shared_experts * f
    for proj, shape in (("gate", (fs, d)), ("up", (fs, d)), ("down", (d, fs))):
      add(f"mlp.shared_experts.{proj}_proj.weight", shape, [("ffn", "shared", f"w_{proj}")],
          _TRANSPOSE)
  return out


def weight_entries(cfg: ModelConfig, expert_layout: str = "hub") -> list[Entry]:
  """Every HF tensor of ``cfg``'s checkpoint, in the order they are written."""
  if expert_layout not in EXPERT_LAYOUTS:
    raise ValueError(f"expert_layout must be one of {EXPERT_LAYOUTS}, got {expert_layout!r}")
  d, vocab = cfg.d_model, cfg.vocab_size
  embed = (("embed", "embedding"), ())
  head = (("lm_head",), ()) if not cfg.tie_embeddings else embed
  head_codec = _IDENTITY if cfg.tie_embeddings else _TRANSPOSE
  head_name = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
  entries = [Entry("model.embed_tokens.weight", (vocab, d), (embed,), _IDENTITY)]
  for i in range(cfg.n_layers):
    moe = i >= cfg.n_dense_layers
    stack, j = ("moe_layers", i - cfg.n_dense_layers) if moe else ("dense_layers", i)
    entries += _block_entries(cfg, f"model.layers.{i}.", (stack,), (j,), moe, expert_layout)
  entries.append(Entry("model.norm.weight", (d,), ((("final_norm", "scale"), ()),), _IDENTITY))
  if not cfg.tie_embeddings:
    entries.append(Entry("lm_head.weight", (vocab, d), (head,), _TRANSPOSE))
  for k in range(cfg.n_mtp_modules):
    prefix, base = f"model.layers.{cfg.n_layers + k}.", ("mtp", k)
    entries += [
        Entry(prefix + "embed_tokens.weight", (vocab, d), (embed,), _IDENTITY,
              copy_of="model.embed_tokens.weight"),
        Entry(prefix + "enorm.weight", (d,), ((base + ("enorm", "scale"), ()),), _IDENTITY),
        Entry(prefix + "hnorm.weight", (d,), ((base + ("hnorm", "scale"), ()),), _IDENTITY),
        Entry(prefix + "eh_proj.weight", (d, 2 * d), ((base + ("eh_proj",), ()),), _TRANSPOSE),
        Entry(prefix + "shared_head.norm.weight", (d,), ((base + ("norm", "scale"), ()),), _IDENTITY),
        Entry(prefix + "shared_head.head.weight", (vocab, d), (head,), head_codec,
              copy_of=head_name),
    ]
    entries += _block_entries(cfg, prefix, base + ("block",), (), cfg.n_moe_layers > 0, expert_layout)
  return entries


# --- loading ---------------------------------------------------------------------------------------

def read_hf_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise CheckpointError(f"{directory} has no config.json; is it an HF model directory?")
  with open(path) as f:
    return json.load(f)


class Quantization(NamedTuple):
  """A checkpoint's ``quantization_config``: FP8 weight blocks [rows, cols], and whether every
  block scale must be a power of two (``scale_fmt: "ue8m0"``)."""

  block: tuple[int, int] = (128, 128)
  ue8m0: bool = False


def read_quantization(hf: dict) -> Quantization:
  """The ``quantization_config`` of config.json ``hf``; raises CheckpointError naming the field
  for a method or scale format not dequantised here."""
  quant = hf.get("quantization_config") or {}
  if quant and quant.get("quant_method", "fp8") != "fp8":
    raise CheckpointError(f"quantization_config.quant_method={quant['quant_method']!r} is not "
                          "supported; only DeepSeek's block-scaled FP8 is dequantised on load")
  scale_fmt = quant.get("scale_fmt")
  if scale_fmt not in _SCALE_FMTS:
    raise CheckpointError(f"quantization_config.scale_fmt={scale_fmt!r} is not supported; known "
                          f"formats: {_SCALE_FMTS} (absent: any float32 scale)")
  return Quantization(tuple(quant.get("weight_block_size") or (128, 128)), scale_fmt == "ue8m0")


def _detect_layout(reader: CheckpointReader, cfg: ModelConfig) -> str:
  if cfg.n_moe_layers and f"model.layers.{cfg.n_dense_layers}.mlp.experts.gate_up_proj" in reader:
    return "fused"
  return "hub"


def _scale_shape(shape, block) -> tuple[int, int]:
  return tuple(-(-s // b) for s, b in zip(shape, block))


def _tied_head(cfg: ModelConfig) -> Entry:
  """A stored ``lm_head.weight`` of a tied model: a copy of the embedding, checked, not read."""
  return Entry("lm_head.weight", (cfg.vocab_size, cfg.d_model), (), _IDENTITY,
               copy_of="model.embed_tokens.weight")


def _validate(reader: CheckpointReader, entries: list[Entry], cfg: ModelConfig, block) -> None:
  """Every expected tensor present with its shape, nothing unexplained left over."""
  missing, wrong, used = [], [], set()
  for entry in entries:
    if entry.name not in reader:
      missing.append(entry.name)
      continue
    used.add(entry.name)
    found = reader.shape(entry.name)
    if found != entry.shape:
      wrong.append(f"{entry.name}: checkpoint {list(found)}, model expects {list(entry.shape)}")
    stored = reader.tensors[entry.name].dtype
    if stored == _E8M0:
      raise CheckpointError(f"{entry.name} is stored as F8_E8M0, a format for block scales only "
                            "(powers of two); re-export it in a weight dtype")
    scale = entry.name + "_scale_inv"
    if stored in _FP8:
      if scale not in reader:
        raise CheckpointError(f"{entry.name} is FP8 but {scale} (its block scales) is missing")
      used.add(scale)
      expected = _scale_shape(found, block)
      if len(found) != 2 or reader.shape(scale) != expected:
        wrong.append(f"{scale}: checkpoint {list(reader.shape(scale))}, expected {list(expected)} "
                     f"for {list(found)} weights in {list(block)} blocks")
  if missing:
    hint = ""
    if all(int(re.match(r"model\.layers\.(\d+)\.", m).group(1)) >= cfg.n_layers
           for m in missing if m.startswith("model.layers.")) and cfg.n_mtp_modules:
      hint = " (only MTP tensors are missing: load with load_mtp=False)"
    raise CheckpointError(f"{reader.directory}: {len(missing)} tensor(s) missing, e.g. "
                          f"{missing[:4]}{hint}")
  if wrong:
    raise CheckpointError(f"{reader.directory}: shape mismatch for {len(wrong)} tensor(s): "
                          + "; ".join(wrong[:4]) + ". Does config.json belong to these weights?")
  extra = [k for k in reader.keys() if k not in used and not _ignored(k, cfg)]
  if extra:
    raise CheckpointError(f"{reader.directory}: {len(extra)} unexpected tensor(s), e.g. {extra[:4]}; "
                          "the checkpoint holds weights this model has no place for")


def _ignored(name: str, cfg: ModelConfig) -> bool:
  """Tensors deliberately not loaded: the MTP layers when MTP is off."""
  m = re.match(r"model\.layers\.(\d+)\.", name)
  return bool(m) and int(m.group(1)) >= cfg.n_layers + cfg.n_mtp_modules


def _scales(reader: CheckpointReader, name: str, quant: Quantization) -> np.ndarray:
  """The float32 block scales ``name`` (an FP8 weight's ``*_scale_inv``), checked: no E8M0 NaN
  byte (0xFF), and only powers of two under ue8m0. Raises CheckpointError naming the tensor."""
  raw = reader.get(name)
  if raw.dtype == _E8M0:
    nan = np.flatnonzero(raw.view(np.uint8) == 0xFF)
    if nan.size:
      raise CheckpointError(f"{name} holds the F8_E8M0 NaN byte 0xFF at flat index {nan[0]}: the "
                            "block scale is undefined; the checkpoint is corrupt, re-download it")
    return raw.astype(np.float32)  # 2^(byte - 127), exact (2^-127 is a float32 subnormal)
  scale = np.asarray(raw, np.float32)
  if quant.ue8m0:
    bad = np.flatnonzero(~(np.isfinite(scale) & (np.frexp(scale)[0] == 0.5)))
    if bad.size:
      raise CheckpointError(f"{name}: scale {scale.flat[bad[0]]!r} at flat index {bad[0]} is not a "
                            "power of two, but quantization_config.scale_fmt is 'ue8m0'; the "
                            "checkpoint is corrupt or its scale_fmt is wrong")
  return scale


def _read(reader: CheckpointReader, name: str, quant: Quantization, start: int = 0,
          stop: Optional[int] = None) -> np.ndarray:
  """Rows [start, stop) of the tensor as stored (a memory-mapped view), or dequantised to
  float32 if it is FP8 (w = q * s per block; ``start`` then a multiple of the block rows)."""
  x = reader.get(name)[start:stop]
  if x.dtype not in _FP8:
    return x
  rows, cols = quant.block
  scale = _scales(reader, name + "_scale_inv", quant)[start // rows:-(-(start + len(x)) // rows)]
  expanded = np.repeat(np.repeat(scale, rows, axis=0), cols, axis=1)
  return x.astype(np.float32) * expanded[:x.shape[0], :x.shape[1]]


def _check_copies(reader: CheckpointReader, entries: list[Entry], quant: Quantization,
                  chunk_bytes: int = _COPY_CHECK_BYTES) -> None:
  """Each ``copy_of`` entry equals, value for value, the tensor it duplicates. Both are read in
  row chunks of about ``chunk_bytes`` (as float64) from the memory maps. Raises CheckpointError
  naming the copy, its source and the fix."""
  for entry in entries:
    if not entry.copy_of:
      continue
    name, source = entry.name, entry.copy_of
    shape = reader.shape(name)
    if reader.shape(source) != shape:
      raise CheckpointError(f"{name} {list(shape)} must be a copy of {source} "
                            f"{list(reader.shape(source))}; {_copy_fix(name, source)}")
    row = 8 * int(np.prod(shape[1:], dtype=np.int64))
    step = max(1, chunk_bytes // max(row, 1))
    if reader.tensors[name].dtype in _FP8 or reader.tensors[source].dtype in _FP8:
      step = max(1, step // quant.block[0]) * quant.block[0]
    for start in range(0, shape[0], step):
      a = np.asarray(_read(reader, name, quant, start, start + step), np.float64)
      b = np.asarray(_read(reader, source, quant, start, start + step), np.float64)
      differ = ~((a == b) | (np.isnan(a) & np.isnan(b)))
      if differ.any():
        first = start + int(np.argwhere(differ)[0][0])
        raise CheckpointError(f"{reader.directory}: {name} differs from {source} (first in row "
                              f"{first}) but must be a copy of it; {_copy_fix(name, source)}")


def _copy_fix(name: str, source: str) -> str:
  if name == "lm_head.weight":
    return ("config.json says tie_word_embeddings=true, so the head is the embedding: delete "
            "lm_head.weight, or set tie_word_embeddings to false if the head was trained apart")
  return ("the MTP module shares the main model's embedding and head (V3 §2.2): store "
          f"{source}'s values there, or load with load_mtp=False")


def _leaf_callback(pieces: dict, shape, dtype, read: Callable[[Entry, int], np.ndarray]):
  """make_array_from_callback's data callback for one leaf: assemble the shard at ``index``
  from the pieces (one HF tensor part each, ``read(entry, part)``) covering its leading
  (layer/expert) axes."""
  depth = len(next(iter(pieces)))

  def callback(index):
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    ranges = [range(*s.indices(n)) for s, n in zip(index, shape)]
    out = np.empty([len(r) for r in ranges], dtype)
    for local, lead in zip(itertools.product(*[range(len(r)) for r in ranges[:depth]]),
                           itertools.product(*ranges[:depth])):
      piece = read(*pieces[lead])
      out[local] = piece[index[depth:]]
    return out

  return callback


def _leaf_pieces(entries: list[Entry], state) -> dict:
  """leaf path -> {lead index: (entry, part)}, checked to cover every leaf completely."""
  pieces: dict = {}
  for entry in entries:
    if entry.copy_of:
      continue
    for part, (path, lead) in enumerate(entry.targets):
      pieces.setdefault(path, {})[lead] = (entry, part)
  for path, variable in nnx.to_flat_state(state):
    leads = pieces.get(path)
    if not leads:
      raise AssertionError(f"no checkpoint tensor maps to {path}")
    depth = len(next(iter(leads)))
    if len(leads) != int(np.prod(variable.shape[:depth])):
      raise AssertionError(f"{path}: {len(leads)} pieces for leading shape {variable.shape[:depth]}")
  return pieces


def _fp8_plan(reader: CheckpointReader, pieces: dict, block) -> tuple[dict, dict]:
  """For the leaves holding FP8 tensors: (leaf path -> n_out for those kept as Fp8Weight,
  leaf path -> why for those dequantised). A leaf is kept when every piece is float8_e4m3fn
  and its codec keeps the blocks."""
  kept, dequantised = {}, {}
  for path, leads in pieces.items():
    stored = {reader.tensors[entry.name].dtype for entry, _ in leads.values()}
    if not stored & set(_FP8):
      continue
    entry, part = next(iter(leads.values()))
    if stored != {_FP8[0]}:
      dequantised[path] = f"its tensors are {sorted(str(d) for d in stored)}, not all float8_e4m3fn"
    elif entry.codec.blocks is None:
      dequantised[path] = "its layout here does not keep the checkpoint's blocks"
    else:
      split = entry.codec.blocks(np.empty(_scale_shape(entry.shape, block), np.float32), block)
      if isinstance(split, str):
        dequantised[path] = split
      else:
        kept[path] = split[part][1]
  return kept, dequantised


def _fp8_summary(kept: dict, dequantised: dict, state, dtype) -> str:
  """One line: which leaves stayed FP8 and their bytes against BF16, which were dequantised
  to ``dtype`` and why."""
  name = lambda path: ".".join(str(p) for p in path)
  mib = lambda n: f"{n / 2**20:.3f} MiB"
  stats = fp8_weight_bytes(state)
  held = stats["fp8_bytes"] + stats["scale_bytes"]
  line = (f"keep_fp8: {len(kept)} weight(s) kept in FP8 ({', '.join(map(name, kept)) or 'none'}): "
          f"{mib(held)} (E4M3 {mib(stats['fp8_bytes'])} + scales {mib(stats['scale_bytes'])}) "
          f"vs {mib(stats['bf16_bytes'])} in bfloat16")
  if stats["bf16_bytes"]:
    line += f" ({held / stats['bf16_bytes']:.3f}x)"
  reasons: dict = {}
  for path, why in dequantised.items():
    reasons.setdefault(why, []).append(name(path))
  for why, paths in reasons.items():
    line += f"; dequantised to {dtype}: {', '.join(paths)} ({why})"
  return line


def load_hf_checkpoint(directory: str, *, mesh: Optional[Mesh] = None, rules: str = "fsdp",
                       load_mtp: Optional[bool] = None, execution: Optional[Execution] = None,
                       keep_fp8: bool = False, report: Callable[[str], None] = print,
                       **overrides) -> DeepSeekModel:
  """An HF-format DeepSeek directory (config.json + safetensors) as a ``DeepSeekModel``.

  ``overrides`` replace ModelConfig fields (``param_dtype="bfloat16"``, ``dtype=...``); by
  default weights keep the checkpoint's dtype (FP8 ones become bfloat16). With ``mesh``, each
  weight is created directly in its shards under the logical-axis ``rules``; otherwise on the
  first device. ``load_mtp``: None loads the MTP module(s) if the checkpoint holds them
  (transformers saves none, though its config counts them), True requires them, False skips them.
  ``execution`` (default ``resolve_execution(cfg, mesh, expert_parallel=False)``: kernels and
  MoE dispatch for running the loaded model on ``mesh`` under XLA's partitioning) may be any
  other, e.g. expert-parallel for a step traced under ``jax.set_mesh(mesh)``.
  ``keep_fp8`` (inference): FP8 weights whose blocks survive the name map become
  ``quant.fp8.Fp8Weight`` values of their Params (E4M3 values sharded like the weight, float32
  block scales replicated; value dtype ``param_dtype``), run by ``ops.matmul.weight_matmul``
  (dequantised under ``matmul_format="bf16"``, the block-scaled GEMM under "fp8_blockwise");
  the rest load as without it, and ``report`` gets one line saying which weights stayed FP8,
  the bytes against BF16, and which were dequantised and why. Not for training: an Fp8Weight
  has no FP8 gradient.
  Raises CheckpointError (files, names, shapes, copies, FP8 scales) or UnsupportedConfig
  (config.json), each naming the tensor or field.
  """
  hf = read_hf_config(directory)
  reader = CheckpointReader(directory)
  if load_mtp is None:
    load_mtp = f"model.layers.{hf.get('num_hidden_layers')}.eh_proj.weight" in reader
  quant = read_quantization(hf)
  if hf.get("quantization_config") and "param_dtype" not in overrides:
    overrides = {"param_dtype": "bfloat16", "dtype": "bfloat16", **overrides}
  cfg = from_hf_config(hf, load_mtp=load_mtp, **overrides)
  entries = weight_entries(cfg, _detect_layout(reader, cfg))
  if cfg.tie_embeddings and "lm_head.weight" in reader:
    entries.append(_tied_head(cfg))
  _validate(reader, entries, cfg, quant.block)
  _check_copies(reader, entries, quant)

  execution = execution or resolve_execution(cfg, mesh, expert_parallel=False)
  graphdef, abstract = nnx.split(abstract_model(cfg, execution))
  pieces = _leaf_pieces(entries, abstract)
  sharding_of = dict(nnx.to_flat_state(placement(abstract, mesh, rules)))

  kept, dequantised = _fp8_plan(reader, pieces, quant.block) if keep_fp8 else ({}, {})
  dequantise = lambda entry, part: entry.codec.decode(_read(reader, entry.name, quant))[part]

  def build(path, variable):
    if path in kept:
      return variable.replace(_fp8_leaf(reader, pieces[path], variable,
                                        sharding_of[path].get_value(), mesh, quant, kept[path],
                                        cfg.param_dtype))
    dtype = np.dtype(variable.dtype)
    callback = _leaf_callback(pieces[path], variable.shape, dtype, dequantise)
    return variable.replace(jax.make_array_from_callback(
        variable.shape, sharding_of[path].get_value(), callback, dtype=dtype))

  flat = [(path, build(path, variable)) for path, variable in nnx.to_flat_state(abstract)]
  state = nnx.from_flat_state(flat)
  if keep_fp8:
    report(_fp8_summary(kept, dequantised, state, cfg.param_dtype))
  return nnx.merge(graphdef, state)


def _fp8_leaf(reader, pieces: dict, variable, sharding, mesh, quant: Quantization, n_out: int,
              dtype) -> Fp8Weight:
  """One leaf as an Fp8Weight: its E4M3 values assembled like a dequantised leaf (sharded as
  the weight), its block scales (checked as on any load) replicated."""
  depth = len(next(iter(pieces)))
  entry, part = next(iter(pieces.values()))
  hf_scales = np.empty(_scale_shape(entry.shape, quant.block), np.float32)
  scale_shape = variable.shape[:depth] + entry.codec.blocks(hf_scales, quant.block)[part][0].shape
  values = lambda e, p: e.codec.decode(reader.get(e.name))[p]
  scales = lambda e, p: e.codec.blocks(_scales(reader, e.name + "_scale_inv", quant),
                                       quant.block)[p][0]
  q = jax.make_array_from_callback(variable.shape, sharding,
                                   _leaf_callback(pieces, variable.shape, _FP8[0], values),
                                   dtype=_FP8[0])
  replicated = (sharding if mesh is None else
                jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  scale = jax.make_array_from_callback(scale_shape, replicated,
                                       _leaf_callback(pieces, scale_shape, np.float32, scales),
                                       dtype=np.float32)
  return Fp8Weight(q, scale, n_out, block=quant.block[::-1], dtype=dtype)


# --- saving ----------------------------------------------------------------------------------------

def save_hf_checkpoint(model: DeepSeekModel, directory: str, *, expert_layout: str = "hub",
                       dtype: Optional[str] = None, max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Write ``model`` as an HF-format directory (config.json + safetensors shards + index).

  ``dtype`` casts the weights (default: as held); the score-correction bias stays float32.
  ``expert_layout``: 'hub' (per-expert tensors, as DeepSeek releases them and as transformers
  saves by default) or 'fused' (transformers v5's in-memory layout). The directory must not
  exist or must be empty: nothing is overwritten. Returns the weight file names.
  """
  cfg = model.config
  hf = to_hf_config(cfg, dtype=dtype)
  require_new_directory(directory)
  values = {path: variable[...] for path, variable in nnx.to_flat_state(nnx.state(model))}
  for path, value in values.items():
    if not value.is_fully_addressable:
      raise ValueError(f"{path} spans several processes; save from a single process")

  def piece(path, lead):
    return np.asarray(jax.device_get(values[path][lead] if lead else values[path]))

  def plan(entry: Entry) -> TensorPlan:
    out = (np.dtype(np.float32) if entry.float32 else
           jnp.dtype(dtype or values[entry.targets[0][0]].dtype))
    produce = lambda: entry.codec.encode(*[piece(p, lead) for p, lead in entry.targets]).astype(out)
    return TensorPlan(entry.name, entry.shape, out, produce)

  staging = os.path.abspath(directory).rstrip("/") + f".partial-{os.getpid()}"
  shutil.rmtree(staging, ignore_errors=True)
  try:
    names = write_checkpoint(staging, [plan(e) for e in weight_entries(cfg, expert_layout)],
                             max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
    with open(os.path.join(staging, "config.json"), "w") as f:
      json.dump(hf, f, indent=2)
  except OSError as e:  # nothing half-written stays behind; the error names where
    shutil.rmtree(staging, ignore_errors=True)
    raise OSError(e.errno, e.strerror or str(e), e.filename or directory) from e
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  if os.path.isdir(directory):
    os.rmdir(directory)  # empty, checked above
  os.rename(staging, directory)
  return names
