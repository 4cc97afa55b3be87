r"""The review's studies (arXiv 2503.11486; experiments/ablations/studies.py), one command each:
a grid of config overrides x seeds, each point an ordinary training run, then one results file,
a Markdown table and a plot.

    python experiments/ablations/sweep.py --study=load_balance
    python experiments/ablations/sweep.py --study=latent_width --seeds=0,1,2 --parallel=2
    python experiments/ablations/sweep.py --study=mtp_cost --full --workdir=/data/studies
    python experiments/ablations/sweep.py --list

Every point runs ``experiments/train.py --config=<the study's config> --config.seed=<seed>
<the point's overrides> <--set overrides>`` in ``<workdir>/<study>/<point>/seed<N>`` (its log in
``train.log`` there), then, for a study with an evaluation (e.g. loss by position on long
windows), ``experiments/evaluate.py`` with the same arguments writes ``evaluation.json`` there.
A finished run (``sweep_run.json`` says complete) is skipped, though its evaluation is redone
when missing or made with other arguments; an unfinished one resumes from its checkpoint, and a
folder holding a run of other settings stops the sweep instead of being overwritten. ``--parallel=N`` runs N points at once (on 2 cores, 1 is fastest
per run; 2 overlaps compilation; a study that measures time, mtp_cost, refuses it). ``--full``
uses the study's accelerator-scale config. The workdir is a local (or mounted) folder. Ctrl-C:
the runs under way save a checkpoint and stop, the rest do not start; rerun to resume.

Before any run starts, every point's config is built and checked as the trainer checks it before
compiling (``train.trainer.build_setup``: fields, values, mesh, tokenizer, data): an override
naming a field that does not exist, a bad value or an empty grid stops the sweep with one
``error:`` line naming the point.

Then the runs' metrics.jsonl are collected into ``<results>/<study>.json`` (the curves the plots
need, and per-point facts such as KV-cache bytes and FLOPs from ``deepseek_jax.analytics``), the
table into ``<results>/<study>.md`` and the plot into ``<results>/<study>.png``.
``--plot_only`` redraws from an existing results file. A results file made with another grid
(other points, seeds or ``--set``) is not replaced unless ``--overwrite_results`` is given.
"""

from __future__ import annotations

import ast
import concurrent.futures
import functools
import json
import math
import os
import pathlib
import subprocess
import sys

from absl import app, flags

from deepseek_jax.cli import RunError

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import studies as studies_lib  # noqa: E402  (this folder, not a package)

_STUDY = flags.DEFINE_string("study", None, "which study: " + ", ".join(studies_lib.STUDIES))
_SEEDS = flags.DEFINE_list("seeds", None, "seeds (default: the study's, at least 2)")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/ds-studies", "runs go in <workdir>/<study>/")
_RESULTS = flags.DEFINE_string("results", "docs/results", "where <study>.json/.md/.png go")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "runs at once")
_FULL = flags.DEFINE_bool("full", False, "the accelerator-scale config (config variant full)")
_SET = flags.DEFINE_multi_string("set", [], "extra override for every run, e.g. train.steps=100")
_POINTS = flags.DEFINE_list("points", None, "only these points of the grid (default: all)")
_PLOT_ONLY = flags.DEFINE_bool("plot_only", False, "only redraw from <results>/<study>.json")
_LIST = flags.DEFINE_bool("list", False, "list the studies and their grids, then exit")
_OVERWRITE = flags.DEFINE_bool("overwrite_results", False,
                               "replace a results file made with another grid")

RUN_FILE = "sweep_run.json"
EVAL_FILE = "evaluation.json"  # a study's evaluation after training (Study.evaluate)


def run_overrides(study: studies_lib.Study, point: str, seed: int, extra=()) -> list[str]:
  """The --config.* arguments of one run (the point's, the seed, then the user's --set)."""
  return [*study.points[point], f"--config.seed={seed}", *(f"--config.{s}" for s in extra)]


def build_config(config_file: str, overrides: list[str]):
  """The ConfigDict ``experiments/train.py --config=config_file *overrides`` would run. Raises
  ValueError naming the first override that does not apply."""
  from ml_collections import config_flags
  for n in range(len(overrides) + 1):  # grow the list until it fails: name the culprit
    values = flags.FlagValues()
    argv = ["sweep", f"--config={config_file}", *overrides[:n]]
    try:  # sys_argv: which --config.* fields to define as flags
      config_flags.DEFINE_config_file("config", config_file, flag_values=values, lock_config=True,
                                      sys_argv=argv)
      values(argv)
    except Exception as e:  # noqa: BLE001 (ml_collections raises several kinds)
      if n == 0:
        raise ValueError(f"config file {config_file}: {e}") from None
      detail = str(e) or type(e).__name__
      for _ in range(2):  # ml_collections nests repr()s of its KeyError message
        try:
          detail = str(ast.literal_eval(detail))
        except (ValueError, SyntaxError):
          break
      detail = detail.replace("\n", " ")
      raise ValueError(f"override {overrides[n - 1]!r} does not apply to {config_file}: "
                       f"{detail}") from None
  return values.config


def check_study(study: studies_lib.Study, seeds: list[int], extra=(), full: bool = False,
                points=None) -> dict:
  """Build and validate every run's config before anything runs. Returns {point: facts}: the
  study's ``describe`` of the point plus its batch_size and seq_len. Raises ValueError naming
  the study and point for an empty grid, no seeds, a repeated seed, an empty or unknown point
  list, an override that names no field, or a value the trainer would reject."""
  if not study.points:
    raise ValueError(f"study {study.name}: the grid is empty (no points)")
  if not seeds:
    raise ValueError(f"study {study.name}: no seeds; give e.g. --seeds=0,1")
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"study {study.name}: a seed is repeated in {seeds}")
  if points is not None and not points:
    raise ValueError(f"study {study.name}: --points is empty; leave it out for every point")
  unknown = sorted(set(points or ()) - set(study.points))
  if unknown:
    raise ValueError(f"study {study.name}: unknown point(s) {unknown}; its points: "
                     f"{', '.join(study.points)}")
  facts = {}
  for point in points or study.points:
    try:
      config = build_config(study.config_file(full), run_overrides(study, point, seeds[0], extra))
      model = _check_run_config(study, config)
    except ValueError as e:
      raise ValueError(f"study {study.name}, point {point!r}: {e}") from None
    facts[point] = {**study.describe(model, config),
                    "batch_size": config.train.batch_size, "seq_len": config.train.seq_len}
  return facts


def _check_run_config(study: studies_lib.Study, config):
  """The trainer's (or the RL loop's) checks before compiling; returns the ModelConfig."""
  from deepseek_jax.train.trainer import build_setup
  if study.kind != "rl":
    return build_setup(config).model_cfg
  from deepseek_jax.rl import config as rl_config
  if config.init_from and not os.path.exists(config.init_from):
    raise ValueError(f"config.init_from={config.init_from} does not exist: pretrain the base "
                     "model first (python experiments/train.py --config=experiments/configs/"
                     f"small.py --workdir={config.init_from})")
  return build_setup(config, schema=rl_config.default_config(),
                     free_form=("rl.rewards",)).model_cfg


def run_dir(workdir: str, study: str, point: str, seed: int) -> str:
  return os.path.join(workdir, study, point, f"seed{seed}")


def run_args(study: studies_lib.Study, point: str, seed: int, workdir: str, extra=(),
             full: bool = False) -> tuple[str, list[str]]:
  """(the run's folder, its train.py arguments besides --workdir)."""
  return (run_dir(workdir, study.name, point, seed),
          [f"--config={study.config_file(full)}", *run_overrides(study, point, seed, extra)])


def run_state(folder: str, args: list[str]) -> str:
  """"new", "unfinished" or "complete"; raises FileExistsError when ``folder`` holds a run made
  with other arguments (it is never overwritten)."""
  marker = os.path.join(folder, RUN_FILE)
  if not os.path.exists(marker):
    if os.path.exists(folder) and os.listdir(folder):
      raise FileExistsError(f"{folder} is not empty and holds no sweep run; use another "
                            "--workdir")
    return "new"
  with open(marker) as f:
    previous = json.load(f)
  if previous["args"] != args:
    differ = sorted(set(previous["args"]) ^ set(args))
    raise FileExistsError(f"{folder} holds a run with other settings (differing: {differ}); use "
                          "another --workdir, or delete that folder to rerun it")
  return "complete" if previous.get("complete") else "unfinished"


def run_point(study: studies_lib.Study, point: str, seed: int, workdir: str, extra=(),
              full: bool = False) -> str:
  """Train one point (or skip it when complete); returns "ran", "skipped", or "evaluated" (a
  complete run whose study evaluation was missing or made with other arguments). Raises
  FileExistsError when the folder holds a run of other settings, cli.RunError when the run
  fails (with its last error line and log)."""
  folder, args = run_args(study, point, seed, workdir, extra, full)
  marker = os.path.join(folder, RUN_FILE)
  log = os.path.join(folder, "train.log")
  what = f"{study.name}/{point}/seed{seed}"
  record = {"args": args, "evaluate": list(study.evaluate)}
  if run_state(folder, args) == "complete":
    with open(marker) as f:
      previous = json.load(f)
    if not study.evaluate or (previous.get("evaluate") == record["evaluate"]
                              and os.path.exists(os.path.join(folder, EVAL_FILE))):
      return "skipped"
    _evaluate_run(study, folder, args, log, what)  # trained; its evaluation missing or changed
    with open(marker, "w") as f:
      json.dump({**record, "complete": True}, f)
    return "evaluated"
  os.makedirs(folder, exist_ok=True)
  with open(marker, "w") as f:
    json.dump({**record, "complete": False}, f)
  script = "rl.py" if study.kind == "rl" else "train.py"
  _run_logged([sys.executable, str(REPO / "experiments" / script), f"--workdir={folder}", *args],
              log, what)
  if study.evaluate:
    _evaluate_run(study, folder, args, log, what)
  with open(marker, "w") as f:
    json.dump({**record, "complete": True}, f)
  return "ran"


def _evaluate_run(study: studies_lib.Study, folder: str, args: list[str], log: str,
                  what: str) -> None:
  """The study's evaluation of a trained run's last checkpoint, into <folder>/EVAL_FILE."""
  _run_logged([sys.executable, str(REPO / "experiments" / "evaluate.py"), f"--workdir={folder}",
               *args, *study.evaluate, f"--output={os.path.join(folder, EVAL_FILE)}",
               "--overwrite"], log, f"{what} (evaluation)")


def _run_logged(command: list[str], log: str, what: str) -> None:
  """Run ``command`` with its output appended to ``log``; raises cli.RunError naming ``what``
  and the log's last ``error:`` line when it fails."""
  start = os.path.getsize(log) if os.path.exists(log) else 0
  with open(log, "a") as out:
    code = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
  if code == 75:  # the trainer's exit code for a preemption or Ctrl-C (checkpoint saved)
    raise RunError(f"{what} stopped early (preempted or interrupted; its checkpoint is kept): "
                   f"rerun the sweep to resume it; log: {log}")
  if code:
    with open(log) as f:
      f.seek(start)  # this attempt's lines only
      errors = [line.strip() for line in f if line.startswith("error:")]
    raise RunError(f"{what} failed (exit {code}): {errors[-1] if errors else 'see the log'}; "
                   f"log: {log}")


def read_rl_run(folder: str) -> dict:
  """One RL run's curves from its metrics.jsonl: ``train`` rows [step, reward, rollout tokens
  so far, seconds of RL so far (rollout + update)], ``eval`` rows [step, held-out greedy
  accuracy, training-prompt accuracy], ``memory`` (bytes, ``rl.memory.update_memory``; None
  unless the run recorded it). Raises FileNotFoundError naming the file."""
  records = _records(folder)
  train, evals, memory, tokens, seconds = [], [], None, 0, 0.0
  for r in records:
    if "reward" in r:
      tokens += r["sampled_tokens"]
      seconds += r.get("rollout_s", 0.0) + r.get("update_s", 0.0)
      train.append([r["step"], r["reward"], tokens, round(seconds, 3)])
    if "eval_accuracy" in r:
      evals.append([r["step"], r["eval_accuracy"], r.get("train_accuracy")])
    if "memory_update_peak_bytes" in r:
      memory = {k[len("memory_"):-len("_bytes")]: v for k, v in r.items()
                if k.startswith("memory_")}
  if not evals:
    raise FileNotFoundError(f"{folder}/metrics.jsonl has no eval_accuracy records")
  return {"train": train, "eval": evals, "memory": memory}


def _records(folder: str) -> list[dict]:
  path = os.path.join(folder, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; the run has not been made")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_run(folder: str, evaluated: bool = False) -> dict:
  """One run's curves from its metrics.jsonl: ``train`` rows [step, ce, load entropy, load
  max/mean, seconds of training so far (compilation, evaluation and saves excluded), mtp ce],
  ``eval`` rows [step, held-out loss], ``final_load`` [MoE layers][E] of the last logged step;
  with ``evaluated``, ``positions`` (``read_positions``) from the study's evaluation. Raises
  FileNotFoundError naming the file."""
  path = os.path.join(folder, "metrics.jsonl")
  records = _records(folder)
  train, evals, final_load, seconds, last = [], [], None, 0.0, None
  for r in records:
    if "eval_loss" in r:
      evals.append([r["step"], r["eval_loss"]])
    elif "ce" in r:
      if "step_time" in r and last is not None:
        seconds += r["step_time"] * (r["step"] - last)
      last = r["step"]
      train.append([r["step"], r["ce"], r.get("moe_load_entropy"),
                    r.get("moe_load_max_over_mean"), round(seconds, 3), r.get("mtp_ce")])
      final_load = r.get("moe_load", final_load)
  if not evals:
    raise FileNotFoundError(f"{path} has no held-out evaluations (eval_loss records)")
  run = {"train": train, "eval": evals, "final_load": final_load}
  if evaluated:
    run["positions"] = read_positions(os.path.join(folder, EVAL_FILE))
  return run


def read_positions(path: str, bucket: int = 16) -> dict:
  """The curves of ``experiments/evaluate.py --lengths`` (``trainer.position_loss``), each
  loss curve averaged over buckets of gcd(``bucket``, train_len) positions (``loss``
  [ceil(L / bucket)]; the results file stays small, and multiples of train_len stay bucket
  edges). Raises FileNotFoundError naming the file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; the run's evaluation has not been made "
                            "(rerun the sweep)")
  with open(path) as f:
    result = json.load(f)
  bucket = math.gcd(bucket, result["train_len"])
  curves = {}
  for name, c in result["curves"].items():
    loss = c["loss"]
    curves[name] = {"length": c["length"], "yarn_factor": c["yarn_factor"],
                    "windows": c["windows"], "bucket": bucket,
                    "in_range_first_document": c.get("in_range_first_document"),
                    "in_range_later_documents": c.get("in_range_later_documents"),
                    "loss": [round(sum(loss[i:i + bucket]) / len(loss[i:i + bucket]), 5)
                             for i in range(0, len(loss), bucket)]}
  return {"train_len": result["train_len"], "step": result["step"], "curves": curves}


def collect(study: studies_lib.Study, seeds: list[int], workdir: str, facts: dict,
            command: str, full: bool, extra=()) -> dict:
  """The results file's content: the grid, per-point facts and every run's curves."""
  from deepseek_jax.train.metrics import host_cpu_name
  import jax
  if study.kind == "rl":
    read = read_rl_run
  else:
    read = functools.partial(read_run, evaluated=bool(study.evaluate))
  runs = {point: {str(seed): read(run_dir(workdir, study.name, point, seed))
                  for seed in seeds} for point in facts}
  return {"study": study.name, "question": study.question, "command": command,
          "config": study.config_file(full), "seeds": seeds,
          "hardware": f"{host_cpu_name()}, {os.cpu_count()} cores, jax {jax.__version__}",
          "set": list(extra), "points": {p: list(study.points[p]) for p in facts},
          "point_info": facts, "runs": runs}


def write_outputs(study: studies_lib.Study, results: dict, folder: str) -> list[str]:
  """<folder>/<study>.md (the table) and .png (the plot); returns their paths."""
  os.makedirs(folder, exist_ok=True)
  md = os.path.join(folder, f"{study.name}.md")
  with open(md, "w") as f:
    f.write(study.table(results) + "\n")
  png = os.path.join(folder, f"{study.name}.png")
  study.plot(results, png)
  return [md, png]


def main(argv):
  from deepseek_jax import cli
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _LIST.value:
    for s in studies_lib.STUDIES.values():
      print(f"{s.name}: {s.question}\n  config {s.config_file(False)} | points: "
            + "; ".join(f"{p} {' '.join(o) or '(base)'}" for p, o in s.points.items())
            + (f"\n  then experiments/evaluate.py {' '.join(s.evaluate)}" if s.evaluate else ""))
    return
  cli.run_cli(_sweep)


def check_results_file(path: str, study: studies_lib.Study, points: list[str],
                       seeds: list[int], extra=()) -> None:
  """Raises FileExistsError when ``path`` holds results of another grid (other points, seeds
  or --set): a partial or modified sweep must not replace a study's results."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  ours = {"points": sorted(points), "seeds": sorted(seeds), "set": list(extra)}
  theirs = {"points": sorted(old.get("points", {})), "seeds": sorted(old.get("seeds", [])),
            "set": old.get("set", [])}
  differ = [k for k in ours if ours[k] != theirs[k]]
  if differ:
    raise FileExistsError(
        f"{path} holds results of another grid (its {', '.join(differ)}: "
        f"{', '.join(str(theirs[k]) for k in differ)}); give another --results folder, or "
        "--overwrite_results to replace them")


def _sweep():
  if _STUDY.value not in studies_lib.STUDIES:
    raise ValueError(f"--study must be one of {', '.join(studies_lib.STUDIES)}, "
                     f"got {_STUDY.value!r}")
  study = studies_lib.STUDIES[_STUDY.value]
  results_file = os.path.join(_RESULTS.value, f"{study.name}.json")
  if _PLOT_ONLY.value:
    if not os.path.exists(results_file):
      raise FileNotFoundError(f"{results_file} does not exist; run the study first")
    with open(results_file) as f:
      results = json.load(f)
  else:
    if _SEEDS.value is None:
      seeds = list(study.seeds)
    else:
      try:
        seeds = [int(seed) for seed in _SEEDS.value]
      except ValueError:
        raise ValueError(f"--seeds must be integers, got {_SEEDS.value}") from None
    if study.timed and _PARALLEL.value > 1:
      raise ValueError(f"study {study.name} measures training time: runs sharing the CPU would "
                       "distort it; use --parallel=1")
    facts = check_study(study, seeds, _SET.value, _FULL.value, _POINTS.value)
    if not _OVERWRITE.value:
      check_results_file(results_file, study, list(facts), seeds, _SET.value)
    jobs = [(p, seed) for p in facts for seed in seeds]
    for p, seed in jobs:  # a folder of other settings stops the sweep before anything runs
      run_state(*run_args(study, p, seed, _WORKDIR.value, _SET.value, _FULL.value))
    print(f"study {study.name}: {len(facts)} points x {len(seeds)} seeds = {len(jobs)} runs "
          f"in {os.path.join(_WORKDIR.value, study.name)}", flush=True)
    _run_all(study, jobs)
    command = " ".join(["python experiments/ablations/sweep.py", *sys.argv[1:]])
    results = collect(study, seeds, _WORKDIR.value, facts, command, _FULL.value, _SET.value)
    os.makedirs(_RESULTS.value, exist_ok=True)
    with open(results_file, "w") as f:
      json.dump(results, f)
  for path in [results_file, *write_outputs(study, results, _RESULTS.value)]:
    print(f"wrote {path}")
  print(study.table(results))


def _run_all(study: studies_lib.Study, jobs: list[tuple[str, int]]) -> None:
  """Run the jobs, ``--parallel`` at a time. Ctrl-C: the runs under way get the signal too (same
  process group), save a checkpoint and stop; the queued ones never start; exit code 130."""
  failures = []
  pool = concurrent.futures.ThreadPoolExecutor(max(_PARALLEL.value, 1))
  futures = {pool.submit(run_point, study, p, seed, _WORKDIR.value, _SET.value, _FULL.value):
             (p, seed) for p, seed in jobs}
  try:
    for future in concurrent.futures.as_completed(futures):
      p, seed = futures[future]
      try:
        print(f"  {p} seed {seed}: {future.result()}", flush=True)
      except (RunError, FileExistsError) as e:
        failures.append(str(e))
        print(f"  {p} seed {seed}: FAILED", flush=True)
  except KeyboardInterrupt:
    pool.shutdown(wait=True, cancel_futures=True)  # the running children save and stop
    print("interrupted (Ctrl-C): the runs under way saved a checkpoint and stopped, the others "
          "did not start; rerun the same command to resume", file=sys.stderr, flush=True)
    sys.exit(130)
  pool.shutdown()
  if failures:
    raise RunError(f"{len(failures)} of {len(jobs)} runs failed; first: {failures[0]}")


if __name__ == "__main__":
  from deepseek_jax.cli import use_huge_pages
  use_huge_pages()  # restarts once, with malloc on transparent huge pages
  app.run(main)
