"""Every public class of the library says what it is (a NamedTuple's generated "X(a, b)" does
not count)."""

import importlib
import inspect
import pkgutil

import deepseek_jax


def test_every_public_class_has_a_docstring():
  missing = []
  for info in pkgutil.walk_packages(deepseek_jax.__path__, "deepseek_jax."):
    module = importlib.import_module(info.name)
    for name, obj in vars(module).items():
      if name.startswith("_") or not inspect.isclass(obj) or obj.__module__ != info.name:
        continue
      doc = obj.__dict__.get("__doc__") or ""
      if not doc.strip() or doc.startswith(f"{name}("):
        missing.append(f"{info.name}.{name}")
  assert not missing, f"public classes without a docstring: {missing}"
