"""The studies ``sweep.py`` runs: the review's first experiments and open questions (arXiv
2503.11486, "A Review of DeepSeek Models' Key Innovative Techniques"; ../shared/REFERENCE.md
§11), each a grid of ``--config.*`` overrides on experiments/configs/ablation.py, a table and a
plot. Results files (``docs/results/<study>.json``) hold, per point and seed, the training
curves (``train`` rows [step, ce, load entropy, load max/mean, training seconds, mtp ce]), the
held-out evaluations (``eval`` rows [step, loss]) and the last step's expert load.

Every plot shows the mean over seeds with the seeds' range (min to max) as a band or error bar.
"""

from __future__ import annotations

import ast
import dataclasses
import statistics
from typing import Callable

from deepseek_jax import analytics
from deepseek_jax.config import ModelConfig

M = "--config.model.overrides."
CONFIG = "experiments/configs/ablation.py"
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
          "tab:pink", "tab:gray", "tab:olive", "tab:cyan")


@dataclasses.dataclass(frozen=True)
class Study:
  name: str
  question: str
  points: dict[str, tuple[str, ...]]  # label -> --config.* overrides
  table: Callable[[dict], str]
  plot: Callable[[dict, str], None]
  # facts about a point for its table and plot: describe(ModelConfig, run ConfigDict) -> dict
  describe: Callable[..., dict] = lambda model, config: {}
  seeds: tuple[int, ...] = (0, 1)
  config: str = CONFIG  # a config file, with variants after ":"
  timed: bool = False  # its results include training time: runs must not share the CPU
  kind: str = "train"  # "train": experiments/train.py runs; "rl": experiments/rl.py runs
  # experiments/evaluate.py arguments run after training (its --output goes in the run's folder)
  evaluate: tuple[str, ...] = ()

  def config_file(self, full: bool) -> str:
    """The config file argument; ``full`` adds the accelerator-scale variant."""
    if not full:
      return self.config
    return self.config + (",full" if ":" in self.config else ":full")


# --- helpers ---------------------------------------------------------------------------------

def final_eval(run: dict) -> float:
  return run["eval"][-1][1]


def over_seeds(results: dict, point: str, value: Callable[[dict], float]) -> tuple:
  """(mean, min, max) of ``value(run)`` over the point's seeds."""
  values = [value(run) for run in results["runs"][point].values()]
  return statistics.mean(values), min(values), max(values)


def fmt(stat: tuple, digits: int = 4) -> str:
  mean, low, high = stat
  return f"{mean:.{digits}f} ({low:.{digits}f} to {high:.{digits}f})"


def curve(results: dict, point: str, column: int, table: str = "train", x_column: int = 0):
  """(x, mean, min, max) of one column over the seeds, at the x values every seed has; x is
  averaged over the seeds when it is not the step (e.g. training seconds)."""
  runs = list(results["runs"][point].values())
  steps = sorted(set.intersection(*({row[0] for row in run[table]} for run in runs)))
  by_step = [{row[0]: row for row in run[table]} for run in runs]
  xs, mean, low, high = [], [], [], []
  for s in steps:
    values = [rows[s][column] for rows in by_step]
    if any(v is None for v in values):
      continue
    xs.append(statistics.mean(rows[s][x_column] for rows in by_step))
    mean.append(statistics.mean(values))
    low.append(min(values))
    high.append(max(values))
  return xs, mean, low, high


def band(ax, results, point, column, color, table="train", x_column=0, label=None,
         x_scale=1.0):
  xs, mean, low, high = curve(results, point, column, table, x_column)
  xs = [x * x_scale for x in xs]
  ax.plot(xs, mean, color=color, label=label or point, lw=1.5)
  ax.fill_between(xs, low, high, color=color, alpha=0.2, lw=0)


def new_figure(n_cols: int, n_rows: int = 1, width: float = 5.0, height: float = 4.0):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt.subplots(n_rows, n_cols, figsize=(width * n_cols, height * n_rows), squeeze=False)


def save(fig, results: dict, png: str) -> None:
  import textwrap
  seeds = len(results["seeds"])
  width = int(fig.get_figwidth() * 13)  # characters that fit at fontsize 10
  fig.suptitle(f"{textwrap.fill(results['question'], width)}\n(toy scale: {results['config']}; "
               f"mean of {seeds} seeds, band / bars = seed min to max)", fontsize=10)
  fig.tight_layout()
  fig.savefig(png, dpi=90)
  import matplotlib.pyplot as plt
  plt.close(fig)


def markdown(header: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _params(model: ModelConfig) -> dict:
  counts = analytics.param_counts_formula(model)
  return {"params_total": counts.total, "params_activated": counts.activated}


# --- study 1: latent width d_c ---------------------------------------------------------------

def _kv_describe(model: ModelConfig, config) -> dict:
  kind = "latent" if model.attention_kind == "mla" else "expanded"
  return {"attention": model.attention_kind, "kv_lora_rank": model.kv_lora_rank,
          "kv_bytes_per_token": analytics.kv_cache_bytes_per_token(model, kind),
          **_params(model)}


def _latent_width_table(results: dict) -> str:
  rows = []
  for point, info in results["point_info"].items():
    rows.append([point, info["attention"],
                 info["kv_lora_rank"] if info["attention"] == "mla" else "—",
                 f"{info['kv_bytes_per_token']:,}", f"{info['params_total'] / 1e6:.2f}M",
                 fmt(over_seeds(results, point, final_eval))])
  return markdown(["point", "attention", "d_c", "KV cache B/token (bf16, all layers)",
                   "params", "held-out loss, mean (min to max)"], rows)


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
  """The (cost, loss, label) points no other point beats on both cost and loss, by cost."""
  front, best = [], float("inf")
  for cost, loss, label in sorted(points):
    if loss < best:
      front.append((cost, loss, label))
      best = loss
  return front


def _latent_width_plot(results: dict, png: str) -> None:
  fig, ((ax, ax_steps),) = new_figure(2)
  dots = []
  for i, (point, info) in enumerate(results["point_info"].items()):
    mean, low, high = over_seeds(results, point, final_eval)
    x = info["kv_bytes_per_token"]
    ax.errorbar([x], [mean], yerr=[[mean - low], [high - mean]], fmt="o", capsize=4,
                color=COLORS[i], label=point)
    dots.append((x, mean, point))
    band(ax_steps, results, point, 1, COLORS[i], table="eval")
  front = pareto_front(dots)  # drawn as a staircase: the best loss reachable at each cache size
  xs, ys = [], []
  for (cost, loss, _), nxt in zip(front, [f[0] for f in front[1:]] + [max(d[0] for d in dots)]):
    xs += [cost, nxt]
    ys += [loss, loss]
  ax.plot(xs, ys, "k--", lw=1, label="Pareto frontier")
  ax.set_xscale("log")
  ax.set_xlabel("KV cache per token, all layers (bytes, bf16; log scale)")
  ax.set_ylabel("held-out loss (nats/token)")
  ax.set_title("final held-out loss vs cache size")
  ax.legend(fontsize=8)
  ax_steps.set_yscale("log")
  ax_steps.set_xlabel("training step")
  ax_steps.set_ylabel("held-out loss (nats/token, log scale)")
  ax_steps.set_title("held-out loss during training")
  ax_steps.legend(fontsize=8)
  save(fig, results, png)


LATENT_WIDTH = Study(
    name="latent_width",
    question="Study 1 (review exp. 1): MLA's latent width d_c vs held-out loss and KV-cache size, "
             "with MHA and GQA baselines of equal head dims",
    points={
        **{f"mla_dc{d}": (f"{M}kv_lora_rank={d}",) for d in (32, 64, 128, 256)},  # d_h = 32
        "mha": (f"{M}attention_kind=mha",),
        "gqa_kv2": (f"{M}attention_kind=gqa", f"{M}n_kv_heads=2"),
    },
    table=_latent_width_table, plot=_latent_width_plot, describe=_kv_describe)


# --- study 2: decoupled RoPE ------------------------------------------------------------------

def _rope_describe(model: ModelConfig, config) -> dict:
  mla = model.attention_kind == "mla"
  return {"attention": model.attention_kind,
          "decoupled_rope": model.decoupled_rope if mla else None, "kv_lora_rank": model.kv_lora_rank if mla else None, "q_lora_rank": model.q_lora_rank,
          "kv_heads": model.kv_heads,
          "kv_bytes_per_token": analytics.kv_cache_bytes_per_token(
              model, "latent" if mla else "expanded"), **_params(model)}


def _rope_kind(info: dict) -> str:
  if info["attention"] != "mla":
    return f"{info['attention'].upper()} ({info['kv_heads']} KV heads)"
  return "MLA, " + ("decoupled RoPE (shared k_R)" if info["decoupled_rope"] else
                    "RoPE on up-projected keys")


def position_mean(run: dict, curve: str, lo: int, hi: int) -> float:
  """Mean loss over positions [lo, hi) of one run's ``positions`` curve (bucketed means).
  Raises ValueError unless lo and hi are bucket edges."""
  c = run["positions"]["curves"][curve]
  b = c["bucket"]
  if lo % b or hi % b:
    raise ValueError(f"positions [{lo}, {hi}) do not fall on the {b}-position buckets")
  return statistics.mean(c["loss"][lo // b:hi // b])


def _rope_measures(t: int) -> list[tuple[str, str, object, object]]:
  """(column, curve, lo, hi) of the table; lo = "first" / "later": the in-range loss of the
  windows' first document / of the documents after it (the reference for positions >= t)."""
  return [(f"0–{t - 1}", f"L{4 * t}", 0, t),
          (f"0–{t - 1}, first document", f"L{4 * t}", "first", None),
          (f"0–{t - 1}, later documents", f"L{4 * t}", "later", None),
          (f"{t}–{2 * t - 1} (2x; {2 * t}-token windows)", f"L{2 * t}", t, 2 * t),
          (f"{2 * t}–{4 * t - 1} (4x; {4 * t}-token windows)", f"L{4 * t}", 2 * t, 4 * t),
          (f"YaRN s = 4: 0–{t - 1}", f"L{4 * t}_yarn", 0, t),
          (f"YaRN s = 2: {t}–{2 * t - 1}", f"L{2 * t}_yarn", t, 2 * t),
          (f"YaRN s = 4: {2 * t}–{4 * t - 1}", f"L{4 * t}_yarn", 2 * t, 4 * t)]


def _measure(run: dict, curve: str, lo, hi) -> float:
  if lo in ("first", "later"):
    key = "in_range_first_document" if lo == "first" else "in_range_later_documents"
    return run["positions"]["curves"][curve][key]
  return position_mean(run, curve, lo, hi)


def _measure_cell(results: dict, point: str, measure) -> str:
  """mean (min to max) over the seeds; "—" when a run has no such tokens (e.g. no later
  document starts inside a short training length)."""
  values = [_measure(run, *measure[1:]) for run in results["runs"][point].values()]
  if any(v is None for v in values):
    return "—"
  return fmt((statistics.mean(values), min(values), max(values)), 3)


def _train_len(results: dict) -> int:
  return next(iter(next(iter(results["runs"].values())).values()))["positions"]["train_len"]


def _rope_table(results: dict) -> str:
  t = _train_len(results)
  measures = _rope_measures(t)
  rows = []
  for point, info in results["point_info"].items():
    rows.append([point, _rope_kind(info), info["kv_lora_rank"] or "—",
                 f"{info['params_total']:,}", info["kv_bytes_per_token"],
                 fmt(over_seeds(results, point, final_eval), 3),
                 *(_measure_cell(results, point, m) for m in measures)])
  table = markdown(["point", "attention", "d_c", "params", "KV cache B/token (bf16, all layers)",
                    "held-out loss (training rows)",
                    *(f"loss at {m[0]}" if i == 0 else m[0] for i, m in enumerate(measures))],
                   rows)
  return table + _rope_paired_table(results, measures)


ROPE_PAIRS = (("mla_decoupled_dc32", "mla_coupled_dc32"),
              ("mla_decoupled_dc101", "mla_coupled_dc91"), ("mla_decoupled_dc32", "mha"))


def _rope_paired_table(results: dict, measures: list) -> str:
  """Differences a - b seed by seed (same seed: same data order and initial key) for the pairs
  of ROPE_PAIRS that were run, over the seeds both have; "" if none."""
  rows, seeds = [], None
  for a, b in ROPE_PAIRS:
    if a not in results["runs"] or b not in results["runs"]:
      continue
    seeds = [s for s in results["runs"][a] if s in results["runs"][b]]
    row = [f"{a} − {b}"]
    for _, curve, lo, hi in measures:
      at = lambda point, seed: _measure(results["runs"][point][seed], curve, lo, hi)  # noqa
      row.append(" / ".join("—" if at(a, seed) is None or at(b, seed) is None
                            else f"{at(a, seed) - at(b, seed):+.2f}" for seed in seeds))
    rows.append(row)
  if not rows:
    return ""
  return (f"\n\nPaired by seed (a − b for seeds {' / '.join(seeds)}; positive: b has the lower "
          "loss):\n\n" + markdown(["pair", *(m[0] for m in measures)], rows))


def _rope_plot(results: dict, png: str) -> None:
  fig, ((ax_train, ax_plain), (ax_yarn2, ax_yarn4)) = new_figure(2, 2, width=6.5, height=4.3)
  points = list(results["point_info"])
  for i, point in enumerate(points):
    color = COLORS[i % len(COLORS)]
    band(ax_train, results, point, 1, color, table="eval")
    runs = results["runs"][point]
    first = next(iter(runs.values()))["positions"]
    t, bucket = first["train_len"], first["curves"][f"L{2 * first['train_len']}"]["bucket"]
    for ax, curve in ((ax_plain, f"L{4 * t}"), (ax_yarn2, f"L{2 * t}_yarn"),
                      (ax_yarn4, f"L{4 * t}_yarn")):
      view = {"runs": {point: {seed: {"pos": [
          [k * c["bucket"] + c["bucket"] / 2, v] for k, v in enumerate(c["loss"])]}
          for seed, r in runs.items() for c in [r["positions"]["curves"][curve]]}}}
      band(ax, view, point, 1, color, table="pos")
  ax_train.set(xlabel="training step", ylabel="held-out loss (nats/token, log scale)",
               yscale="log", title=f"training ({t}-token rows, positions restart per document)")
  titles = {ax_plain: (4 * t, f"windows of {4 * t} tokens, plain RoPE"),
            ax_yarn2: (2 * t, f"windows of {2 * t} tokens, YaRN s = 2 (no fine-tuning)"),
            ax_yarn4: (4 * t, f"windows of {4 * t} tokens, YaRN s = 4 (no fine-tuning)")}
  top = max(ax.get_ylim()[1] for ax in titles)
  for (ax, (length, title)), curve in zip(titles.items(),
                                         (f"L{4 * t}", f"L{2 * t}_yarn", f"L{4 * t}_yarn")):
    for k in (1, 2):
      if k * t < length:
        ax.axvline(k * t, color="k", ls=":", lw=1)
    later = [_measure(r, curve, "later", None) for p in points
             for r in results["runs"][p].values()]
    if None not in later:
      ax.axhline(statistics.mean(later), color="gray", ls="--", lw=1,
                 label=f"later documents before {t} (all points)")
    ax.set(xlabel="position in the window (tokens; dotted: 1x, 2x the training length)",
           ylabel=f"held-out loss (nats/token, {bucket}-position means)", title=title,
           ylim=(0, top))
  for ax in (ax_train, ax_plain):
    ax.legend(fontsize=7)
  save(fig, results, png)


def _rope_points() -> dict[str, tuple[str, ...]]:
  coupled = f"{M}decoupled_rope=False"
  return {
      # d_c = d_h = 32 (the preset): the two MLA forms have exactly equal parameters here
      # (W_KR, d x d_R, has as many weights as W_UK's extra rotary rows, d_c x n_h d_R).
      "mla_decoupled_dc32": (),
      "mla_coupled_dc32": (coupled,),
      # matched to MHA's parameters (1.851M) by each form's own knob, the latent width d_c
      "mla_decoupled_dc101": (f"{M}kv_lora_rank=101",),
      "mla_coupled_dc91": (coupled, f"{M}kv_lora_rank=91"),
      "mha": (f"{M}attention_kind=mha",),
      # GQA's K/V has half MHA's weights; the difference goes into the query compression
      "gqa_kv2": (f"{M}attention_kind=gqa", f"{M}n_kv_heads=2", f"{M}q_lora_rank=128"),
  }


DECOUPLED_ROPE = Study(
    name="decoupled_rope",
    question="Study 2 (review open question 1): MLA with decoupled RoPE vs RoPE on the "
             "up-projected keys vs MHA and GQA at matched parameters, and loss by position at "
             "2x and 4x the training length with and without YaRN",
    points=_rope_points(), table=_rope_table, plot=_rope_plot, describe=_rope_describe,
    evaluate=("--lengths=2x,4x", "--yarn"), seeds=(0, 1, 2))


# --- study 3: load balancing -----------------------------------------------------------------

def _balance_describe(model: ModelConfig, config) -> dict:
  return {"router_bias": model.router_bias, "alpha": model.expert_balance_coef,
          "form": model.balance_loss_form, "experts": model.n_routed_experts}


def _gamma(results: dict, point: str) -> str:
  for override in results["points"][point]:
    if "router_bias_rate" in override:
      pieces = ast.literal_eval(override.split("=", 1)[1])  # ((start step, gamma), ...)
      return ", ".join(str(gamma) for _, gamma in pieces)
  return "—"


def _last(run: dict, column: int) -> float:
  return run["train"][-1][column]


def _load_balance_table(results: dict) -> str:
  rows = []
  for point, info in results["point_info"].items():
    rows.append([point, _gamma(results, point) if info["router_bias"] else "—",
                 info["alpha"] or "—", info["form"] if info["alpha"] else "—",
                 fmt(over_seeds(results, point, final_eval)),
                 fmt(over_seeds(results, point, lambda r: _last(r, 2)), 3),
                 fmt(over_seeds(results, point, lambda r: _last(r, 3)), 2)])
  return markdown(["point", "bias γ", "aux α", "loss form", "held-out loss",
                   "load entropy / log E, last step", "max/mean load (worst layer), last step"],
                  rows)


def _load_balance_plot(results: dict, png: str) -> None:
  import matplotlib.pyplot as plt
  points = list(results["point_info"])
  fig = plt.figure(figsize=(17, 10), layout="constrained")
  grid = fig.add_gridspec(2, max(len(points), 3), height_ratios=(1.4, 1))
  n_top = grid.ncols // 3
  ax_ent = fig.add_subplot(grid[0, :n_top])
  ax_max = fig.add_subplot(grid[0, n_top:2 * n_top])
  ax_loss = fig.add_subplot(grid[0, 2 * n_top:])
  for i, point in enumerate(points):
    band(ax_ent, results, point, 2, COLORS[i % len(COLORS)])
    band(ax_max, results, point, 3, COLORS[i % len(COLORS)])
    mean, low, high = over_seeds(results, point, final_eval)
    ax_loss.errorbar([i], [mean], yerr=[[mean - low], [high - mean]], fmt="o", capsize=4,
                     color=COLORS[i % len(COLORS)])
  ax_ent.set(xlabel="training step", ylabel="expert-load entropy / log E (1 = uniform)",
             title="utilisation entropy (mean over layers)")
  ax_max.set(xlabel="training step", ylabel="max / mean expert load (worst layer)",
             title="most loaded expert (1 = uniform)")
  ax_ent.legend(fontsize=7)
  ax_loss.set_xticks(range(len(points)), points, rotation=40, ha="right", fontsize=7)
  ax_loss.set(ylabel="held-out loss (nats/token)", title="final held-out loss")
  for i, point in enumerate(points):
    ax = fig.add_subplot(grid[1, i])
    load = next(iter(results["runs"][point].values()))["final_load"]  # first seed
    if load:
      rows = [[v / (sum(layer) / len(layer)) for v in layer] for layer in load]
      image = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=0, vmax=3)
      ax.set_yticks(range(len(rows)), range(len(rows)) if i == 0 else [])
    ax.set_title(point, fontsize=8)
    ax.set_xlabel("expert", fontsize=7)
    ax.set_ylabel("MoE layer" if i == 0 else "", fontsize=7)
    ax.tick_params(labelsize=6)
  if any(next(iter(results["runs"][p].values()))["final_load"] for p in points):
    fig.colorbar(image, ax=fig.axes[3:], fraction=0.02, label="load / mean, last step (first seed)")
  seeds = len(results["seeds"])
  fig.suptitle(f"{results['question']}\n(toy scale: {results['config']}; mean of {seeds} seeds, "
               "band / bars = seed min to max; heat maps: first seed)", fontsize=10)
  fig.savefig(png, dpi=70)
  plt.close(fig)


_NO_BIAS = f"{M}router_bias=False"
LOAD_BALANCE = Study(
    name="load_balance",
    question="Study 3 (review exp. 3, open question 2): auxiliary-loss-free bias (γ), the "
             "expert-level loss (α), none, and the loss's form f·P vs P only vs f only",
    points={
        "none": (_NO_BIAS, f"{M}expert_balance_coef=0.0"),  # = bias with γ = 0
        **{f"bias_g{g}": (f"{M}expert_balance_coef=0.0", f"--config.train.router_bias_rate="
                          f"((0, {g}),)") for g in ("0.001", "0.01", "0.1")},
        **{f"aux_a{a}": (_NO_BIAS, f"{M}expert_balance_coef={a}") for a in ("0.001", "0.01", "0.1")},
        **{f"aux_{form}_a0.01": (_NO_BIAS, f"{M}expert_balance_coef=0.01",
                                 f"{M}balance_loss_form={form}") for form in ("p_only", "f_only")},
    },
    table=_load_balance_table, plot=_load_balance_plot, describe=_balance_describe)


# --- study 4: MTP's cost ---------------------------------------------------------------------

def _mtp_describe(model: ModelConfig, config) -> dict:
  flops = analytics.train_flops_per_token(model, config.train.seq_len)
  return {"mtp_depth": model.n_mtp_modules, "train_flops_per_token": flops, **_params(model)}


def _seconds_per_step(run: dict) -> float:
  rows = run["train"]
  return (rows[-1][4] - rows[0][4]) / (rows[-1][0] - rows[0][0])


def _loss_at_seconds(run: dict, seconds: float) -> float:
  """Held-out loss of the last evaluation reached within ``seconds`` of training."""
  per_step = _seconds_per_step(run)
  reached = [loss for step, loss in run["eval"] if step * per_step <= seconds * 1.0001]
  return reached[-1] if reached else float("nan")


def _mtp_table(results: dict) -> str:
  base = results["runs"].get("D0")
  # the D0 run's training time (same seed): what does each depth reach in that wall-clock?
  budget = {seed: r["eval"][-1][0] * _seconds_per_step(r) for seed, r in (base or {}).items()}
  rows = []
  for point, info in results["point_info"].items():
    row = [point, info["mtp_depth"], f"{info['train_flops_per_token'] / 1e6:.1f}",
           fmt(over_seeds(results, point, _seconds_per_step), 3),
           fmt(over_seeds(results, point, final_eval))]
    if budget:
      within = [_loss_at_seconds(r, budget[seed]) for seed, r in results["runs"][point].items()]
      row.append(fmt((statistics.mean(within), min(within), max(within))))
    rows.append(row)
  header = ["point", "D", "train MFLOP/token", "s/step", "held-out loss, final"]
  if budget:
    header.append(f"held-out loss within D0's training time (same seed, "
                  f"~{statistics.mean(budget.values()):.0f} s)")
  return markdown(header, rows)


def _mtp_plot(results: dict, png: str) -> None:
  fig, ((ax_step, ax_time, ax_flops),) = new_figure(3)
  for i, (point, info) in enumerate(results["point_info"].items()):
    tokens_per_step = info["batch_size"] * info["seq_len"]
    band(ax_step, results, point, 1, COLORS[i], table="eval")
    runs = list(results["runs"][point].values())
    per_step = statistics.mean(_seconds_per_step(r) for r in runs)
    band(ax_time, results, point, 1, COLORS[i], table="eval", x_scale=per_step)
    band(ax_flops, results, point, 1, COLORS[i], table="eval",
         x_scale=tokens_per_step * info["train_flops_per_token"] / 1e12)
  ax_step.set(xlabel="training step", title="sample efficiency")
  ax_time.set(xlabel="training seconds (CPU; compilation and evaluation excluded)",
              title="time efficiency")
  ax_flops.set(xlabel="training compute (TFLOP, analytics.train_flops_per_token)",
               title="compute efficiency")
  for ax in (ax_step, ax_time, ax_flops):
    ax.set_yscale("log")
    ax.set_ylabel("held-out loss, main head (nats/token, log scale)")
    ax.legend(title="MTP depth", fontsize=8)
  save(fig, results, png)


MTP_COST = Study(
    name="mtp_cost",
    question="Study 4 (review open question 3): MTP depth D vs held-out loss per step, per "
             "second and per FLOP",
    points={f"D{d}": (f"{M}n_mtp_modules={d}",) for d in (0, 1, 2)},
    table=_mtp_table, plot=_mtp_plot, describe=_mtp_describe, timed=True)


# --- study 5: GRPO vs PPO --------------------------------------------------------------------

def _rl_describe(model: ModelConfig, config) -> dict:
  return {"algorithm": config.rl.algorithm, "group_size": config.rl.group_size,
          "prompts_per_step": config.rl.prompts_per_step, "init_from": config.init_from,
          **_params(model)}


def _mean_reward(run: dict, last: int = 10) -> float:
  rows = run["train"][-last:]
  return statistics.mean(row[1] for row in rows)


def _moving_average(values: list[float], window: int = 10) -> list[float]:
  return [statistics.mean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def _mib(run: dict, key: str = "update_peak") -> float:
  return (run["memory"] or {}).get(key, float("nan")) / 2 ** 20


def _rl_table(results: dict) -> str:
  rows = []
  for point, info in results["point_info"].items():
    runs = results["runs"][point].values()
    start = statistics.mean(r["eval"][0][1] for r in runs)
    rows.append([point, info["algorithm"].upper(), info["group_size"],
                 f"{statistics.mean(r['train'][-1][2] for r in runs) / 1e3:.0f}k",
                 fmt(over_seeds(results, point, lambda r: _mean_reward(r, 10)), 3),
                 f"{start:.3f} → " + fmt(over_seeds(results, point, lambda r: r["eval"][-1][1]), 3),
                 fmt(over_seeds(results, point, lambda r: r["train"][-1][3] / r["train"][-1][0]), 2),
                 f"{statistics.mean(_mib(r) for r in runs):.0f}"])
  return markdown(["point", "algorithm", "samples per prompt", "rollout tokens", "reward, last "
                   "10 steps", "held-out accuracy (greedy), start → end", "s/step (rollout + "
                   "update)", "update peak MiB (compiled)"], rows)


def _rl_plot(results: dict, png: str) -> None:
  fig, ((ax_reward, ax_tokens), (ax_eval, ax_memory)) = new_figure(2, 2, width=6.5, height=4.2)
  points = list(results["point_info"])
  for i, point in enumerate(points):
    color = COLORS[i]
    runs = list(results["runs"][point].values())
    smoothed = [dict(r, train=[[row[0], avg, row[2]] for row, avg in
                               zip(r["train"], _moving_average([row[1] for row in r["train"]]))])
                for r in runs]
    view = {"runs": {point: dict(enumerate(smoothed))}}
    band(ax_reward, view, point, 1, color)
    band(ax_tokens, view, point, 1, color, x_column=2, x_scale=1e-3)
    band(ax_eval, results, point, 1, color, table="eval")
    ax_memory.bar([i], [statistics.mean(_mib(r) for r in runs)], color=color)
  ax_reward.set(xlabel="RL step", ylabel="training reward (accuracy, 10-step mean)",
                title="reward per step")
  ax_tokens.set(xlabel="rollout tokens sampled (thousands)", ylabel="training reward "
                "(accuracy, 10-step mean)", title="reward per rollout token")
  ax_eval.set(xlabel="RL step", ylabel="held-out accuracy (greedy, 51 prompts)",
              title="held-out accuracy")
  ax_memory.set_xticks(range(len(points)), points)
  ax_memory.set(ylabel="MiB (XLA memory analysis)", title="peak device memory of one update")
  for ax in (ax_reward, ax_tokens, ax_eval):
    ax.legend(fontsize=8)
  save(fig, results, png)


GRPO_VS_PPO = Study(
    name="grpo_vs_ppo",
    question="Study 5 (review exp. 2): GRPO with G = 4 and 8 samples per prompt vs PPO, same "
             "base model, prompts and rule reward (R1-Zero arithmetic)",
    config="experiments/configs/r1_zero.py:study", kind="rl",
    points={
        "grpo_g4": ("--config.rl.group_size=4",),
        "grpo_g8": ("--config.rl.group_size=8",),
        "ppo": ("--config.rl.algorithm=ppo", "--config.rl.group_size=8"),
    },
    table=_rl_table, plot=_rl_plot, describe=_rl_describe)


STUDIES = {s.name: s for s in (LATENT_WIDTH, DECOUPLED_ROPE, LOAD_BALANCE, MTP_COST,
                                   GRPO_VS_PPO)}

