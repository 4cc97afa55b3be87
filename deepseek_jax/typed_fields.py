"""Typed dataclass fields: one reading of each annotation drives the value checks of a frozen
config and the types of its command-line overrides.

How it works
------------
``field_types(cls)`` resolves a dataclass's annotations with ``typing.get_type_hints`` (so
``from __future__ import annotations`` and ``X | None`` both work) into one ``FieldType`` per
field. ``check(obj)`` then tests every value against its ``FieldType`` and raises one
``ValueError`` line naming the field; ``FieldType.flag_type`` is the plain Python type a
command-line placeholder (``ml_collections.config_dict.placeholder``) parses the value as.

Supported annotations (anything else raises ``TypeError`` naming the field when the class is
read, so a new field cannot slip through unchecked):

  int, float, bool, str    a bool is not an int; an int is accepted as a float
  tuple[X, ...]            X one of the four above; the value must be a tuple (not a list)
  Literal[a, b, ...]       literals of one type (str, int or bool); the value must be one of
                           them; on the command line it parses as that type
  X | None, Optional[X]    any of the above, or None
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal, Optional

_SCALARS = (int, float, bool, str)
_LITERAL_TYPES = (str, int, bool)


@dataclasses.dataclass(frozen=True)
class FieldType:
  """What one dataclass field may hold.

  base: int, float, bool, str or tuple. element: the element type of a tuple field (else None).
  choices: the allowed values of a Literal field (else None). optional: None is allowed too.
  """

  base: type
  element: Optional[type] = None
  choices: Optional[tuple] = None
  optional: bool = False

  @property
  def flag_type(self) -> type:
    """The type a command-line override parses as (a Literal parses as its literals' type)."""
    return self.base

  def describe(self) -> str:
    """The allowed values in words: 'int', 'tuple[float, ...]', "one of ('a', 'b') or None"."""
    if self.choices is not None:
      text = f"one of {self.choices}"
    elif self.element is not None:
      text = f"tuple[{self.element.__name__}, ...]"
    else:
      text = self.base.__name__
    return f"{text} or None" if self.optional else text

  def problem(self, value: Any) -> Optional[str]:
    """None if ``value`` fits, else a one-line reason (no field name) for an error message."""
    if value is None and self.optional:
      return None
    got = f"got {value!r} ({type(value).__name__})"
    if not _is_instance(value, self.base):
      return f"must be {self.describe()}, {got}"
    if self.choices is not None and value not in self.choices:
      return f"must be {self.describe()}, got {value!r}"
    if self.element is not None:
      for i, item in enumerate(value):
        if not _is_instance(item, self.element):
          return f"must be {self.describe()}, got {value!r}: element {i} is {type(item).__name__}"
    return None


def _is_instance(value: Any, kind: type) -> bool:
  """isinstance without Python's quirks for configs: a bool is no int, an int is a float."""
  if kind is bool:
    return isinstance(value, bool)
  if isinstance(value, bool):
    return False
  if kind is float:
    return isinstance(value, (int, float))
  return isinstance(value, kind)


def _unsupported(owner: str, name: str, hint: Any, why: str = "") -> TypeError:
  return TypeError(f"{owner}.{name}: annotation {hint!r} is not supported{why}; use int, float, "
                   "bool, str, tuple[X, ...], Literal[...] or X | None")


def parse_annotation(owner: str, name: str, hint: Any) -> FieldType:
  """The FieldType of one resolved annotation; TypeError (naming owner.name) if unsupported."""
  optional = False
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    rest = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(rest) != 1:
      raise _unsupported(owner, name, hint, " (a union of several types)")
    hint, optional = rest[0], True
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if hint in _SCALARS:
    return FieldType(hint, optional=optional)
  if origin is tuple:
    if len(args) != 2 or args[1] is not Ellipsis or args[0] not in _SCALARS:
      raise _unsupported(owner, name, hint, " (tuples must be tuple[X, ...] of int/float/bool/str)")
    return FieldType(tuple, element=args[0], optional=optional)
  if origin is Literal:
    choices = tuple(a for a in args if a is not None)
    kinds = {type(a) for a in choices}
    if len(kinds) != 1 or kinds.pop() not in _LITERAL_TYPES:
      raise _unsupported(owner, name, hint, " (literals must all be str, all int or all bool)")
    return FieldType(type(choices[0]), choices=choices, optional=optional or None in args)
  raise _unsupported(owner, name, hint)


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, FieldType]:
  """{field name: FieldType} for every field of dataclass ``cls``, in declaration order.

  Raises TypeError naming ``cls.field`` for an annotation outside the supported set.
  """
  hints = typing.get_type_hints(cls)
  return {f.name: parse_annotation(cls.__name__, f.name, hints[f.name])
          for f in dataclasses.fields(cls)}


def check(obj: Any) -> None:
  """Raise ValueError('<Class>.<field>: must be ..., got ...') for the first field of dataclass
  instance ``obj`` whose value does not fit its annotation."""
  owner = type(obj).__name__
  for name, kind in field_types(type(obj)).items():
    problem = kind.problem(getattr(obj, name))
    if problem is not None:
      raise ValueError(f"{owner}.{name}: {problem}")
