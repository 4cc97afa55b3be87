"""Reading and writing the safetensors format with numpy alone: memory-mapped, tensor by tensor.

A safetensors file is an 8-byte little-endian header length N, a JSON header of N bytes mapping
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data
that follows), then the raw little-endian bytes. A sharded checkpoint adds
``model.safetensors.index.json`` whose ``weight_map`` names the file holding each tensor.

Reading maps each file into memory (``np.memmap``) and hands out views: nothing is read from
disk until a tensor's bytes are touched, so a loader holds at most the tensor it is working on.
Writing plans every shard from the tensors' shapes first, then writes each tensor as it is
produced: one tensor in host memory at a time, whatever the checkpoint's size.
bfloat16 and the float8 formats come from ``ml_dtypes`` (a JAX dependency); torch is not needed.
``F8_E8M0`` (``ml_dtypes.float8_e8m0fnu``: one exponent byte, 2^(byte - 127), 0xFF = NaN) holds
the power-of-two block scales of later DeepSeek FP8 releases; it is read and written like the rest.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}


class CheckpointError(ValueError):
  """A checkpoint on disk is incomplete, malformed or does not fit the model."""


class TensorInfo(NamedTuple):
  """Where one tensor lives: its file, dtype, shape and byte range in the data section."""

  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int  # byte offsets into the file's data section
  end: int


def read_header(path: str) -> tuple[dict[str, TensorInfo], int]:
  """Tensor table of one file and the byte offset where its data section starts."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    if 8 + n > size:
      raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({size} B); "
                            "the file is truncated or not safetensors")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
  header.pop("__metadata__", None)
  data_size, table = size - 8 - n, {}
  for name, entry in header.items():
    code = entry.get("dtype")
    if code not in DTYPES:
      raise CheckpointError(f"{path}: tensor {name!r} has dtype {code!r}; supported: {sorted(DTYPES)}")
    dtype, shape = DTYPES[code], tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    if end - begin != dtype.itemsize * int(np.prod(shape)) or end > data_size:
      raise CheckpointError(f"{path}: tensor {name!r} ({code} {list(shape)}) has byte range "
                            f"[{begin}, {end}) that does not fit its shape or the file")
    table[name] = TensorInfo(path, dtype, shape, begin, end)
  return table, 8 + n


class CheckpointReader:
  """All tensors of an HF-format directory, located and validated before any data is read.

  ``get(name)`` returns a read-only memory-mapped view: bytes come off disk only when used.
  """

  def __init__(self, directory: str):
    self.directory = directory
    if not os.path.isdir(directory):
      raise CheckpointError(f"checkpoint directory {directory} does not exist")
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f).get("weight_map", {})
      files = sorted(set(weight_map.values()))
      missing = [name for name in files if not os.path.exists(os.path.join(directory, name))]
      if missing:
        held = sum(1 for v in weight_map.values() if v in missing)
        raise CheckpointError(
            f"{directory}: missing shard file(s) {missing[:3]}{' ...' if len(missing) > 3 else ''} "
            f"listed in {INDEX_FILE} ({held} tensors); download the complete checkpoint")
    else:
      weight_map = None
      files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
      if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files and no {INDEX_FILE}")
    self.tensors: dict[str, TensorInfo] = {}
    self._data_start: dict[str, int] = {}
    for name in files:
      path = os.path.join(directory, name)
      table, start = read_header(path)
      self._data_start[path] = start
      for key, info in table.items():
        if weight_map is not None and weight_map.get(key) != name:
          continue  # the index is authoritative about where a tensor lives
        if key in self.tensors:
          raise CheckpointError(f"{directory}: tensor {key!r} appears in two files "
                                f"({os.path.basename(self.tensors[key].file)}, {name})")
        self.tensors[key] = info
    if weight_map is not None:
      absent = sorted(set(weight_map) - set(self.tensors))
      if absent:
        raise CheckpointError(f"{directory}: {INDEX_FILE} lists {absent[:3]} but their shard files "
                              "do not contain them; the download is corrupt")
    self._maps: dict[str, np.memmap] = {}

  def __contains__(self, name: str) -> bool:
    return name in self.tensors

  def keys(self) -> list[str]:
    return list(self.tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.tensors[name].shape

  def get(self, name: str) -> np.ndarray:
    info = self.tensors[name]
    if info.file not in self._maps:
      self._maps[info.file] = np.memmap(info.file, np.uint8, mode="r")
    start = self._data_start[info.file]
    raw = self._maps[info.file][start + info.begin:start + info.end]
    return raw.view(info.dtype).reshape(info.shape)


class TensorPlan(NamedTuple):
  """One tensor to write: name, shape, dtype and a function producing it when its turn comes."""

  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  produce: Callable[[], np.ndarray]  # called once, when the tensor is written


def _header_bytes(plans: Sequence[TensorPlan], metadata: Optional[dict]) -> bytes:
  header, offset = {}, 0
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  for p in plans:
    nbytes = p.dtype.itemsize * int(np.prod(p.shape))
    header[p.name] = {"dtype": _CODES[p.dtype], "shape": list(p.shape),
                      "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  return raw + b" " * (-len(raw) % 8)  # data starts 8-byte aligned


def _write_file(path: str, plans: Sequence[TensorPlan], metadata: Optional[dict]) -> None:
  header = _header_bytes(plans, metadata)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(header)))
    f.write(header)
    for p in plans:
      value = np.asarray(p.produce())
      if value.shape != p.shape or value.dtype != p.dtype:
        raise ValueError(f"tensor {p.name}: produced {value.dtype}{list(value.shape)}, "
                         f"planned {p.dtype}{list(p.shape)}")
      f.write(np.ascontiguousarray(value).tobytes())


def write_checkpoint(directory: str, plans: Iterable[TensorPlan], *,
                     max_shard_bytes: int = 5 * 2**30, metadata: Optional[dict] = None) -> list[str]:
  """Write tensors in order into ``model-0000i-of-0000n.safetensors`` shards of at most
  ``max_shard_bytes`` (a single ``model.safetensors`` if they fit) plus the index.
  Files are written under temporary names and renamed once complete. Returns the file names."""
  plans = list(plans)
  shards: list[list[TensorPlan]] = [[]]
  size = 0
  for p in plans:
    nbytes = p.dtype.itemsize * int(np.prod(p.shape))
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(p)
    size += nbytes
  n = len(shards)
  names = ([SINGLE_FILE] if n == 1 else
           [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
  os.makedirs(directory, exist_ok=True)
  for name, shard in zip(names, shards):
    tmp = os.path.join(directory, name + ".partial")
    _write_file(tmp, shard, metadata)
    os.replace(tmp, os.path.join(directory, name))
  if n > 1:
    total = sum(p.dtype.itemsize * int(np.prod(p.shape)) for p in plans)
    index = {"metadata": {"total_size": total},
             "weight_map": {p.name: name for name, shard in zip(names, shards) for p in shard}}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
  return names
