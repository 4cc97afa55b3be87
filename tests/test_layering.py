"""Dependencies point down: no import cycles and no upward imports in deepseek_jax.

Layers, lowest first (a module may import its own package and anything below it):
  typed_fields, config               typed dataclass fields; ModelConfig
  quant                              number formats (FP8 quantisation and its GEMMs): jax only
  cli, ops                           leaves: command-line plumbing; low-level compute
  parallel                           mesh, partitioning, expert parallelism (never model/)
  model                              the layers and the decoder
  inference, interop, analytics      use the model (interop never imports train/)
  train                              the step, losses, data, checkpoints, trainer
  rl                                 post-training (reuses the train step with its own losses)
  convert                            the conversion CLI
pallas_kernels never imports deepseek_jax, and nothing imports experiments/.
Every import counts, including those inside functions.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RANK = {"typed_fields": 0, "config": 1, "quant": 2, "cli": 3, "ops": 3, "parallel": 4,
        "model": 5, "inference": 6, "interop": 6, "analytics": 6, "train": 7, "rl": 8,
        "convert": 8}


def _imports(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def _part(module: str):
  """'deepseek_jax.model.moe' -> 'model'; None outside deepseek_jax or for the package."""
  parts = module.split(".")
  return parts[1] if parts[0] == "deepseek_jax" and len(parts) > 1 else None


def _edges():
  edges = []
  for path in sorted((ROOT / "deepseek_jax").rglob("*.py")):
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if module == "deepseek_jax.__init__":
      continue  # the public API re-exports every layer
    for target in _imports(path):
      edges.append((module, target))
  return edges


def test_every_library_module_is_in_a_layer():
  for module, _ in _edges():
    assert _part(module) in RANK, f"{module}: add its package to RANK"


def test_imports_point_down():
  upward = [f"{m} -> {t}" for m, t in _edges()
            if _part(t) in RANK and RANK[_part(t)] > RANK[_part(m)]
            or (_part(t) in RANK and RANK[_part(t)] == RANK[_part(m)]
                and _part(t) != _part(m))]
  assert not upward, "upward or sideways imports:\n" + "\n".join(sorted(set(upward)))


@pytest.mark.parametrize("low, high", [("parallel", "model"), ("interop", "train"), ("convert", "train"),
                                       ("ops", "parallel"), ("ops", "model")])
def test_named_rules(low, high):
  assert not [(m, t) for m, t in _edges() if _part(m) == low and _part(t) == high]


def test_no_module_import_cycles():
  graph = {}
  modules = {m for m, _ in _edges()}
  for m, t in _edges():
    for candidate in (t, t.rsplit(".", 1)[0]):
      if candidate in modules and candidate != m:
        graph.setdefault(m, set()).add(candidate)
        break
  state = {}

  def visit(node, stack):
    state[node] = "open"
    for nxt in graph.get(node, ()):
      if state.get(nxt) == "open":
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
      if nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])


def test_pallas_kernels_and_experiments_stay_apart():
  for path in (ROOT / "pallas_kernels").rglob("*.py"):
    assert not any(i.startswith("deepseek_jax") for i in _imports(path)), path
  for path in list((ROOT / "deepseek_jax").rglob("*.py")) + list((ROOT / "pallas_kernels").rglob("*.py")):
    assert not any(i.split(".")[0] == "experiments" for i in _imports(path)), path
