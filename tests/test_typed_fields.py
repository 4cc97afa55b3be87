"""typed_fields: one reading of a dataclass's annotations checks its values and types its
command-line overrides (``X | None``, ``Optional[X]``, ``tuple[X, ...]``, ``Literal[...]``)."""

from __future__ import annotations  # annotations are strings: get_type_hints must resolve them

import dataclasses
from typing import Literal, Optional

import pytest
from absl import flags
from ml_collections import config_flags

from deepseek_jax import typed_fields
from deepseek_jax.train.config import typed_placeholders


@dataclasses.dataclass(frozen=True)
class Example:
  """One field of each supported kind (a test-only stand-in for ModelConfig)."""

  count: int | None = None
  ratio: Optional[float] = None
  sizes: tuple[int, ...] = (1, 2)
  weights: tuple[float, ...] = (0.5,)
  mode: Literal["a", "b"] = "a"
  flag: bool = False
  label: str = "x"

  def __post_init__(self):
    typed_fields.check(self)


def test_annotations_are_read_into_field_types():
  kinds = typed_fields.field_types(Example)
  assert list(kinds) == [f.name for f in dataclasses.fields(Example)]
  assert kinds["count"] == typed_fields.FieldType(int, optional=True)
  assert kinds["ratio"] == typed_fields.FieldType(float, optional=True)
  assert kinds["sizes"] == typed_fields.FieldType(tuple, element=int)
  assert kinds["weights"] == typed_fields.FieldType(tuple, element=float)
  assert kinds["mode"] == typed_fields.FieldType(str, choices=("a", "b"))
  assert {n: k.flag_type for n, k in kinds.items()} == dict(
      count=int, ratio=float, sizes=tuple, weights=tuple, mode=str, flag=bool, label=str)


@pytest.mark.parametrize("values", [
    dict(),
    dict(count=3, ratio=0.25, sizes=(4,), weights=(1.0, 2.5), mode="b", flag=True, label="y"),
    dict(count=None, ratio=None, sizes=()),
    dict(ratio=2),  # an int is a float
    dict(weights=(1, 2.5)),  # also inside a tuple
])
def test_good_values_pass(values):
  assert dataclasses.asdict(Example(**values)).items() >= values.items()


@pytest.mark.parametrize("values, message", [
    (dict(count="3"), "Example.count: must be int or None, got '3' (str)"),
    (dict(count=True), "Example.count: must be int or None, got True (bool)"),  # no bool as int
    (dict(count=1.5), "Example.count: must be int or None, got 1.5 (float)"),
    (dict(ratio="x"), "Example.ratio: must be float or None, got 'x' (str)"),
    (dict(ratio=False), "Example.ratio: must be float or None, got False (bool)"),
    (dict(sizes=[1, 2]), "Example.sizes: must be tuple[int, ...], got [1, 2] (list)"),
    (dict(sizes=None), "Example.sizes: must be tuple[int, ...], got None (NoneType)"),
    (dict(sizes=(1, "2")),
     "Example.sizes: must be tuple[int, ...], got (1, '2'): element 1 is str"),
    (dict(sizes=(1, True)),
     "Example.sizes: must be tuple[int, ...], got (1, True): element 1 is bool"),
    (dict(weights=(0.5, "a")),
     "Example.weights: must be tuple[float, ...], got (0.5, 'a'): element 1 is str"),
    (dict(mode="c"), "Example.mode: must be one of ('a', 'b'), got 'c'"),
    (dict(mode=None), "Example.mode: must be one of ('a', 'b'), got None (NoneType)"),
    (dict(flag=1), "Example.flag: must be bool, got 1 (int)"),
    (dict(label=3), "Example.label: must be str, got 3 (int)"),
])
def test_bad_values_raise_one_line_naming_the_field(values, message):
  with pytest.raises(ValueError) as error:
    Example(**values)
  assert str(error.value) == message


def test_an_optional_literal_admits_none_and_lists_its_choices():
  kind = typed_fields.parse_annotation("C", "f", Optional[Literal[1, 2]])
  assert kind == typed_fields.FieldType(int, choices=(1, 2), optional=True)
  assert kind.problem(None) is None and kind.problem(2) is None
  assert kind.problem(True) == "must be one of (1, 2) or None, got True (bool)"  # True == 1
  assert kind.problem(3) == "must be one of (1, 2) or None, got 3"


@pytest.mark.parametrize("hint", [dict[str, int], int | str, tuple[int, int], tuple,
                                  tuple[list, ...], Literal["a", 1], list[int]])
def test_unsupported_annotations_raise_type_error_naming_the_field(hint):
  with pytest.raises(TypeError, match=r"^C\.f: annotation .* is not supported"):
    typed_fields.parse_annotation("C", "f", hint)


def _parse(config, *args):
  argv = ["prog", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_dict("config", config, flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_fields_become_typed_command_line_overrides():
  c = _parse(typed_placeholders(Example, exclude=("label",)), "--config.count=3",
             "--config.ratio=2", "--config.sizes=4,5", "--config.weights=(0.5, 1.5)",
             "--config.mode=b", "--config.flag=true")
  assert "label" not in c
  parsed = c.to_dict()
  assert parsed == dict(count=3, ratio=2.0, sizes=(4, 5), weights=(0.5, 1.5), mode="b", flag=True)
  assert type(parsed["ratio"]) is float
  assert Example(**parsed).sizes == (4, 5)
  assert _parse(typed_placeholders(Example), "--config.sizes=7",
                "--config.sizes=8").sizes == (7, 8)  # a repeated flag builds a tuple too
  untouched = _parse(typed_placeholders(Example)).to_dict()
  assert untouched == dict.fromkeys(typed_fields.field_types(Example))  # None: keep the default


def test_a_bad_command_line_value_fails_at_parsing_or_when_the_class_is_built():
  with pytest.raises(flags.IllegalFlagValueError, match="seven"):
    _parse(typed_placeholders(Example), "--config.count=seven")
  c = _parse(typed_placeholders(Example), "--config.mode=c", "--config.sizes=1,x")
  with pytest.raises(ValueError, match=r"^Example\.sizes: must be tuple\[int, \.\.\.\]"):
    Example(**{k: v for k, v in c.items() if v is not None})
  with pytest.raises(ValueError, match=r"^Example\.mode: must be one of \('a', 'b'\), got 'c'$"):
    Example(mode=c.mode)
