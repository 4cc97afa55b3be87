"""Rejection sampling for the R1 pipeline's third stage (DeepSeek-R1 §2.3.3).

From the reasoning-RL checkpoint, sample N completions per prompt; keep a completion only when
every required rule-reward component reaches its threshold (correct, well formatted, language
consistent), drop duplicates of one prompt (after whitespace normalisation), keep at most
``per_prompt`` per prompt, and turn what is kept into SFT records ``{"prompt", "response",
"kind"}``. ``accept`` is pure (records and completion texts in, records and statistics out),
so it is tested with a stub policy's known outputs; the pipeline feeds it ``rollout`` output.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Mapping, Optional, Sequence

from deepseek_jax.rl.rewards import WeightedReward


@dataclasses.dataclass
class Acceptance:
  """Counts per prompt kind (``record["kind"]``, "" when absent): completions ``sampled``,
  ``passed`` the thresholds, ``kept`` after de-duplication and the cap; ``prompts_with_one``:
  prompts with at least one kept completion out of ``prompts``; ``components``: the fraction
  of all completions that reach each threshold on its own (which requirement fails most)."""

  sampled: dict
  passed: dict
  kept: dict
  prompts: dict
  prompts_with_one: dict
  components: dict = dataclasses.field(default_factory=dict)

  def rate(self, kind: str) -> float:
    """Fraction of ``kind``'s completions that passed the thresholds."""
    return self.passed[kind] / max(self.sampled[kind], 1)

  def table(self) -> str:
    lines = ["| kind | sampled | passed | acceptance | kept | prompts with one kept |",
             "|---|---|---|---|---|---|"]
    for kind in sorted(self.sampled):
      lines.append(f"| {kind or '-'} | {self.sampled[kind]} | {self.passed[kind]} | "
                   f"{self.rate(kind):.1%} | {self.kept[kind]} | "
                   f"{self.prompts_with_one[kind]}/{self.prompts[kind]} |")
    return "\n".join(lines)


def accept(records: Sequence[dict], completions: Sequence[str], reward: WeightedReward,
           thresholds: Mapping[str, float], *, per_prompt: int = 4,
           usable: Optional[Sequence[bool]] = None):
  """The completions worth fine-tuning on. ``records[i]`` is the prompt record of
  ``completions[i]`` (each record repeated N times, as a rollout lays them out, or any
  order); a completion passes when ``reward``'s component c is >= ``thresholds[c]`` for every
  named c; an empty completion, or one whose ``usable[i]`` is False (e.g. it sampled ids the
  tokenizer cannot write as text), never passes. Returns (SFT records ``{"prompt",
  "response", "kind"}`` in input order, Acceptance).
  Raises ValueError when a threshold names a component ``reward`` does not compute."""
  unknown = sorted(set(thresholds) - set(reward.components))
  if unknown:
    raise ValueError(f"rejection thresholds name {unknown}, which the reward does not compute; "
                     f"its components are {sorted(reward.components)}")
  _, parts = reward(records, completions)
  n = max(len(completions), 1)
  components = {c: sum(float(v) >= t for v in parts[c]) / n for c, t in thresholds.items()}
  stats = Acceptance(*(defaultdict(int) for _ in range(5)), components=components)
  seen: dict = defaultdict(set)
  kept = []
  for i, (record, text) in enumerate(zip(records, completions)):
    kind, prompt = record.get("kind", ""), record["prompt"]
    if prompt not in seen:
      seen[prompt] = set()
      stats.prompts[kind] += 1
    stats.sampled[kind] += 1
    if (not text.strip() or (usable is not None and not usable[i])
        or not all(parts[c][i] >= t for c, t in thresholds.items())):
      continue
    stats.passed[kind] += 1
    key = " ".join(text.split())
    if key in seen[prompt] or len(seen[prompt]) >= per_prompt:
      continue
    if not seen[prompt]:
      stats.prompts_with_one[kind] += 1
    seen[prompt].add(key)
    stats.kept[kind] += 1
    kept.append({"prompt": prompt, "response": text.strip(), "kind": kind})
  return kept, stats
