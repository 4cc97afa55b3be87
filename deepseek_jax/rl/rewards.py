"""Rule rewards (DeepSeek-R1 §2.2.2, §2.3.2): plain functions of (record, completion) -> float.

    R1-Zero:  r = accuracy + format          R1 reasoning RL:  r = accuracy + format + language

A record is the dataset row the prompt came from (a dict; ``record["answer"]`` holds the
reference answer); a completion is the decoded text the policy produced after the prompt.
Every reward here is a pure Python function, so new ones compose without a framework:
``WeightedReward({"acc": (accuracy_reward, 1.0), "fmt": (format_reward, 0.5)})`` scores a batch
and returns the weighted total plus each component (unweighted) for the metrics. ``combine``
builds the same from a config mapping of ``REWARDS`` names to weights.

R1's template: the completion reasons inside ``<think>...</think>`` and then answers inside
``<answer>...</answer>``; nothing follows ``</answer>`` (see ``format_reward``).
"""

from __future__ import annotations

import functools
import math
import numbers
import re
import unicodedata
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

RewardFn = Callable[[dict, str], float]

_ANSWER = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_INTEGER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)\.?")
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


class RewardError(ValueError):
  """A reward component raised or returned a non-finite / non-number value; the one-line
  message names the component, the batch index and the record (chained from the cause)."""


def _short(record: Any, limit: int = 200) -> str:
  text = " ".join(repr(record).split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def extract_answer(completion: str, marker: Optional[str] = None) -> Optional[str]:
  """The final answer of ``completion`` (str), stripped, or None when it has none.

  The text inside the LAST complete ``<answer>...</answer>`` pair (nested tags: the innermost
  pair, so ``<answer>a <answer>b</answer></answer>`` gives "b"); failing that, if ``marker``
  is given (e.g. "####" for GSM8K, "A:"), the text after the last marker up to the end of its
  line. An empty answer is None.
  """
  found = _ANSWER.findall(completion)
  if found:
    answer = found[-1].strip()
  elif marker and marker in completion:
    answer = completion.rsplit(marker, 1)[1].strip().split("\n", 1)[0].strip()
  else:
    return None
  return answer or None


def _as_integer(text: str) -> Optional[int]:
  """'+1,234.' -> 1234; None unless ``text`` is an integer (sign, separators, trailing dot)."""
  text = text.strip()
  if not _INTEGER.fullmatch(text):
    return None
  return int(text.rstrip(".").replace(",", ""))


def _is_edge_junk(ch: str) -> bool:
  return ch.isspace() or unicodedata.category(ch).startswith("P")


def normalize_text(text: str) -> str:
  """Casefold, collapse whitespace and strip surrounding punctuation and quotes (any Unicode
  "P*" category: '"Paris."' -> 'paris'); the text comparison of ``accuracy_reward``."""
  text = " ".join(text.casefold().split())
  start, end = 0, len(text)
  while start < end and _is_edge_junk(text[start]):
    start += 1
  while end > start and _is_edge_junk(text[end - 1]):
    end -= 1
  return text[start:end]


def answers_match(predicted: str, reference: Any) -> bool:
  """True when ``predicted`` (str) equals ``reference`` (str or number): as integers when both
  parse as integers (``_as_integer``), else as ``normalize_text`` strings."""
  if isinstance(reference, float) and reference.is_integer():
    reference = int(reference)  # 42.0 from a JSON file means 42
  reference = str(reference)
  p, r = _as_integer(predicted), _as_integer(reference)
  if p is not None and r is not None:
    return p == r
  return normalize_text(predicted) == normalize_text(reference)


def accuracy_reward(record: dict, completion: str, *, answer_key: str = "answer",
                    marker: Optional[str] = None, first_line: bool = False) -> float:
  """1.0 if ``extract_answer(completion, marker)`` matches ``record[answer_key]``
  (``answers_match``), else 0.0; no answer is 0.0 (R1 §2.2.2, accuracy rewards).
  ``first_line``: a completion with no ``<answer>`` tags (nor the marker) answers with its
  first line, for prompts the model completes directly (``"3 + 4 ="`` -> ``" 7\n"``).

  Raises ValueError when the record has no ``answer_key`` or its value is not a str or number.
  """
  if not isinstance(record, Mapping) or answer_key not in record:
    raise ValueError(f"accuracy_reward: record has no {answer_key!r} field (set answer_key= to "
                     f"the field holding the reference answer): {_short(record)}")
  reference = record[answer_key]
  if isinstance(reference, bool) or not isinstance(reference, (str, numbers.Number)):
    raise ValueError(f"accuracy_reward: record[{answer_key!r}] must be a str or a number, got "
                     f"{type(reference).__name__}: {_short(record)}")
  answer = extract_answer(completion, marker)
  if answer is None and first_line and "<answer>" not in completion:
    answer = completion.strip().split("\n", 1)[0].strip() or None
  return float(answer is not None and answers_match(answer, reference))


def format_reward(record: dict, completion: str, *, eos: Optional[str] = None) -> float:
  """1.0 iff ``completion`` is ``<think>...</think>`` then ``<answer>...</answer>`` (R1 §2.2.2,
  format rewards), else 0.0. ``record`` is unused.

  Each of the four tags appears exactly once, in that order; only whitespace may come before
  ``<think>``, between ``</think>`` and ``<answer>`` and after ``</answer>``. R1's template ends
  at ``</answer>``, so other trailing text fails, except one ``eos`` string (e.g.
  "<|end_of_sentence|>", default none) optionally followed by whitespace. The tag contents are
  not judged (empty ones pass): correctness is ``accuracy_reward``'s job.
  """
  del record
  if any(completion.count(tag) != 1 for tag in _TAGS):
    return 0.0
  text = completion.rstrip()
  if eos and text.endswith(eos):
    text = text[:-len(eos)].rstrip()
  pattern = r"\s*<think>.*</think>\s*<answer>.*</answer>"
  return float(re.fullmatch(pattern, text, re.DOTALL) is not None)


_SCRIPTS = {  # Unicode character-name prefixes of each script's letters
    "latin": ("LATIN", "FULLWIDTH LATIN"),
    "cjk": ("CJK", "HIRAGANA", "KATAKANA", "HALFWIDTH KATAKANA", "HANGUL", "HALFWIDTH HANGUL"),
    "cyrillic": ("CYRILLIC",),
    "arabic": ("ARABIC",),
}


@functools.lru_cache(maxsize=65536)
def _in_script(ch: str, script: str) -> bool:
  return unicodedata.name(ch, "").startswith(_SCRIPTS[script])


def language_consistency_reward(record: dict, completion: str, *, script: str = "latin") -> float:
  """Fraction in [0, 1] of the letters (``str.isalpha``) of the think part that belong to
  ``script`` (R1 §2.3.2: "the proportion of target language words in the CoT"; we count
  letters, which needs no tokenizer and works for unspaced scripts). ``record`` is unused.

  The think part is the text of the first ``<think>...</think>`` pair; none -> 0.0. A think
  part with no letters (empty, or only digits and symbols) -> 1.0: nothing in it is in the wrong
  language, and its length is not this reward's business. Scripts: "latin", "cjk" (Han,
  Hiragana, Katakana, Hangul), "cyrillic", "arabic", by Unicode character name. Raises
  ValueError for another script.
  """
  del record
  if script not in _SCRIPTS:
    raise ValueError(f"language_consistency_reward: unknown script {script!r}; choose one of "
                     f"{sorted(_SCRIPTS)}")
  match = _THINK.search(completion)
  if match is None:
    return 0.0
  letters = [ch for ch in match.group(1) if ch.isalpha()]
  if not letters:
    return 1.0
  return sum(_in_script(ch, script) for ch in letters) / len(letters)


def overlong_penalty(lengths, max_length: int, buffer: int, penalty: float = 1.0) -> np.ndarray:
  """DAPO's soft overlong punishment (arXiv 2503.14476 §3.4, eq. 13), float32 [N]:

      0                                   |o| <= L_max - L_cache
      ((L_max - L_cache) - |o|) / L_cache  L_max - L_cache < |o| <= L_max   (0 to -1)
      -1                                   |o| > L_max

  times ``penalty``, added to the rule reward. ``lengths`` [N] completion tokens, L_max =
  ``max_length`` (the generation budget), L_cache = ``buffer`` (0: no shaping, all zeros).
  Raises ValueError for a buffer outside [0, max_length]."""
  if not 0 <= buffer <= max_length:
    raise ValueError(f"overlong buffer must be in [0, max_new_tokens={max_length}], got {buffer}")
  lengths = np.asarray(lengths, np.float64)
  if buffer == 0:
    return np.zeros(lengths.shape, np.float32)
  start = max_length - buffer
  shaped = np.where(lengths <= start, 0.0, (start - lengths) / buffer)
  return (penalty * np.where(lengths > max_length, -1.0, shaped)).astype(np.float32)


REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "language": language_consistency_reward,
}


class WeightedReward:
  """r_i = sum_c w_c * f_c(records[i], completions[i]) over named components c.

  ``components``: name -> (reward function (record, completion) -> float, weight). Weights are
  finite numbers; an empty mapping is refused (ValueError). A component that raises, or returns
  a non-number or a non-finite value, becomes a ``RewardError`` (never a silent 0).
  """

  def __init__(self, components: Mapping[str, tuple[RewardFn, float]]):
    if not components:
      raise ValueError("WeightedReward: no components; give at least one name -> (fn, weight)")
    for name, entry in components.items():
      if not (isinstance(entry, tuple) and len(entry) == 2 and callable(entry[0])):
        raise ValueError(f"WeightedReward: component {name!r} must be (reward_fn, weight), got "
                         f"{_short(entry)}")
      weight = entry[1]
      if (isinstance(weight, bool) or not isinstance(weight, numbers.Real)
          or not math.isfinite(weight)):
        raise ValueError(f"WeightedReward: component {name!r} has weight {weight!r}; use a "
                         f"finite number")
    self.components = {name: (fn, float(w)) for name, (fn, w) in components.items()}

  def __call__(self, records: Sequence[dict], completions: Sequence[str],
               labels: Optional[Sequence[str]] = None):
    """Scores records[i] with completions[i] (GRPO: each record repeated G times, so index
    b * G + g is completion g of prompt b, as ``advantages.group_advantages`` reads it).
    ``labels[i]`` names record i in error messages (default "record i"), e.g. its line in
    the dataset.

    Returns (total [N] float32, {name: [N] float32 unweighted values}). Raises ValueError when
    the lengths differ and ``RewardError`` for a failing component.
    """
    if len(records) != len(completions):
      raise ValueError(f"WeightedReward: {len(records)} records but {len(completions)} "
                       f"completions; pass one record per completion")
    total = np.zeros(len(records), np.float64)
    parts = {}
    for name, (fn, weight) in self.components.items():
      values = np.array([self._score(name, fn, labels[i] if labels else f"record {i}",
                                     record, completion)
                         for i, (record, completion) in enumerate(zip(records, completions))],
                        np.float64).reshape(len(records))
      total += weight * values
      parts[name] = values.astype(np.float32)
    return total.astype(np.float32), parts

  @staticmethod
  def _score(name: str, fn: RewardFn, label: str, record: dict, completion: str) -> float:
    try:
      value = fn(record, completion)
    except Exception as e:
      cause = " ".join(f"{type(e).__name__}: {e}".split())
      raise RewardError(f"reward {name!r} failed on {label} ({cause}); record: "
                        f"{_short(record)}") from e
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)
        or not math.isfinite(value)):
      raise RewardError(f"reward {name!r} returned {value!r} on {label}; a reward must be a "
                        f"finite number; record: {_short(record)}")
    return float(value)


def combine(weights: Mapping[str, Any], registry: Mapping[str, RewardFn] = REWARDS
            ) -> WeightedReward:
  """A ``WeightedReward`` from a config: ``{"accuracy": 1.0, "format": 1.0, "language":
  {"weight": 0.1, "script": "cjk"}}`` (a number is the weight; a mapping gives the weight and
  keyword arguments of the ``registry`` function). Raises ValueError for an unknown name (the
  choices are listed) or a mapping without "weight".
  """
  components = {}
  for name, spec in weights.items():
    if name not in registry:
      raise ValueError(f"combine: unknown reward {name!r}; choose from {sorted(registry)}")
    if isinstance(spec, Mapping):
      kwargs = dict(spec)
      if "weight" not in kwargs:
        raise ValueError(f"combine: reward {name!r} needs a 'weight' entry, got {dict(spec)}")
      weight = kwargs.pop("weight")
      components[name] = (functools.partial(registry[name], **kwargs), weight)
    else:
      components[name] = (registry[name], spec)
  return WeightedReward(components)
