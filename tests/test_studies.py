"""The sweep runner and the studies (experiments/ablations/sweep.py, studies.py): bad grids fail
before any run, a small real sweep runs, skips what is complete and refuses to overwrite, and
every study's table and plot come out of made-up results without training."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SWEEP = REPO / "experiments" / "ablations" / "sweep.py"
sys.path.insert(0, str(SWEEP.parent))
import studies  # noqa: E402
import sweep  # noqa: E402

TINY = ["--set=model.preset=tiny", "--set=model.overrides.vocab_size=264", "--set=train.steps=4", "--set=train.eval_every=2",
        "--set=train.eval_batches=1", "--set=train.batch_size=2", "--set=train.seq_len=32",
        "--set=train.log_every=1", "--set=checkpoint.every=4", "--set=sample.max_new_tokens=2"]


def _sweep(*args, timeout=600):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per run
  return subprocess.run([sys.executable, str(SWEEP), *args], capture_output=True, text=True,
                        timeout=timeout, cwd=REPO, env=env)


def test_an_override_naming_no_field_fails_before_any_run(tmp_path):
  proc = _sweep("--study=mtp_cost", f"--workdir={tmp_path}", f"--results={tmp_path}/r",
                "--set=model.overrides.kv_lora_rnk=3")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      "error: study mtp_cost, point 'D0': override '--config.model.overrides.kv_lora_rnk=3' does "
      "not apply to experiments/configs/ablation.py: 'kv_lora_rnk' Did you mean \"kv_lora_rank\" "
      "instead of \"kv_lora_rnk\"?"]
  assert not (tmp_path / "mtp_cost").exists()


def test_a_bad_value_an_unknown_point_and_an_empty_grid_fail_before_any_run(tmp_path):
  proc = _sweep("--study=mtp_cost", f"--workdir={tmp_path}", "--set=model.preset=tiny")
  assert proc.stderr.strip() == (  # the trainer's own check, before any run
      "error: study mtp_cost, point 'D0': config.data.tokenizer has 261 ids but the model's "
      "vocab_size is 128; raise config.model.overrides.vocab_size")
  proc = _sweep("--study=load_balance", f"--workdir={tmp_path}", "--set=train.steps=0")
  assert proc.stderr.strip() == ("error: study load_balance, point 'none': config.train.steps: "
                                 "must be positive, got 0")
  proc = _sweep("--study=mtp_cost", f"--workdir={tmp_path}", "--points=D0,D9")
  assert proc.stderr.strip() == ("error: study mtp_cost: unknown point(s) ['D9']; its points: "
                                 "D0, D1, D2")
  assert not list(tmp_path.iterdir())
  for flag, message in [("--seeds=", "no seeds"), ("--points=", "--points is empty"),
                        ("--seeds=1,1", "a seed is repeated in [1, 1]")]:
    proc = _sweep("--study=mtp_cost", f"--workdir={tmp_path}", flag)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
  proc = _sweep("--study=mtp_cost", f"--workdir={tmp_path}", "--parallel=2")
  assert "measures training time" in proc.stderr
  assert not list(tmp_path.iterdir())
  empty = studies.Study(name="empty", question="?", points={}, table=str, plot=print)
  with pytest.raises(ValueError, match="study empty: the grid is empty"):
    sweep.check_study(empty, [0, 1])
  with pytest.raises(ValueError, match="no seeds"):
    sweep.check_study(studies.MTP_COST, [])


def test_a_small_sweep_runs_collects_skips_and_refuses_to_overwrite(tmp_path):
  args = ["--study=mtp_cost", "--points=D0,D1", "--seeds=0,1", f"--workdir={tmp_path}/runs",
          f"--results={tmp_path}/results", *TINY]
  proc = _sweep(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2 points x 2 seeds = 4 runs" in proc.stdout
  assert proc.stdout.count(": ran") == 4
  results = json.loads((tmp_path / "results" / "mtp_cost.json").read_text())
  assert set(results["runs"]) == {"D0", "D1"} and set(results["runs"]["D1"]) == {"0", "1"}
  run = results["runs"]["D1"]["0"]
  assert [row[0] for row in run["eval"]][-1] == 4 and run["train"][-1][5] is not None  # mtp ce
  assert results["point_info"]["D1"]["train_flops_per_token"] > \
      results["point_info"]["D0"]["train_flops_per_token"]
  assert (tmp_path / "results" / "mtp_cost.png").stat().st_size > 10_000
  table = (tmp_path / "results" / "mtp_cost.md").read_text()
  assert table.count("\n| D") == 2
  # Again: everything is complete, nothing reruns; the table is rebuilt from the same runs.
  again = _sweep(*args)
  assert again.returncode == 0 and again.stdout.count(": skipped") == 4
  # A partial sweep into the same results folder: refused before anything runs.
  partial = _sweep(*[a for a in args if a != "--seeds=0,1"], "--seeds=0")
  assert partial.returncode == 1 and partial.stderr.strip() == (
      f"error: {tmp_path}/results/mtp_cost.json holds results of another grid (its seeds: "
      "[0, 1]); give another --results folder, or --overwrite_results to replace them")
  # The same folders with other settings: refused, nothing overwritten.
  other = _sweep(*args[:-1], "--set=sample.max_new_tokens=3", "--overwrite_results")
  assert other.returncode == 1 and other.stderr.strip() == (
      f"error: {tmp_path}/runs/mtp_cost/D0/seed0 holds a run with other settings (differing: "
      "['--config.sample.max_new_tokens=2', '--config.sample.max_new_tokens=3']); use another "
      "--workdir, or delete that folder to rerun it")
  assert "ran" not in other.stdout


def _made_up_results(study, finals: dict, seeds=(0, 1)) -> dict:
  """Results as sweep.collect writes them, with final held-out losses ``finals`` per point
  (seed s adds 0.01 s) and smooth curves."""
  facts = sweep.check_study(study, list(seeds))
  runs = {}
  for point, final in finals.items():
    runs[point] = {}
    for seed in seeds:
      loss = final + 0.01 * seed
      train = [[s, 3.0 - s / 200, 0.9 + s / 5000, 2.0 - s / 400, s * 0.1 * (1 + 0.5 * ("D" in
               point and point != "D0")), 3.1 if point != "D0" else None] for s in range(10, 310, 10)]
      evals = [[s, loss + (300 - s) / 300] for s in range(50, 350, 50)]
      load = [[1.0 + (e % 3) for e in range(16)] for _ in range(3)]
      runs[point][str(seed)] = {"train": train, "eval": evals, "final_load": load}
  return {"study": study.name, "question": study.question, "command": "test",
          "config": study.config_file(False), "seeds": list(seeds), "hardware": "test",
          "set": [], "points": {p: list(study.points[p]) for p in finals},
          "point_info": {p: facts[p] for p in finals}, "runs": runs}


@pytest.mark.parametrize("study, finals", [
    (studies.LATENT_WIDTH, {"mla_dc32": 2.0, "mla_dc64": 1.9, "mla_dc128": 1.95, "mha": 1.8,
                            "gqa_kv2": 1.85}),
    (studies.LOAD_BALANCE, {p: 2.0 + 0.01 * i for i, p in enumerate(studies.LOAD_BALANCE.points)}),
    (studies.MTP_COST, {"D0": 2.0, "D1": 1.9, "D2": 1.95}),
], ids=lambda v: getattr(v, "name", ""))
def test_each_studys_table_and_plot_from_made_up_results(tmp_path, study, finals):
  results = _made_up_results(study, finals)
  paths = sweep.write_outputs(study, results, str(tmp_path))
  assert pathlib.Path(paths[1]).stat().st_size > 20_000
  table = pathlib.Path(paths[0]).read_text()
  for point, final in finals.items():
    row = next(line for line in table.splitlines() if line.startswith(f"| {point} |"))
    # mean of the seeds' final losses, then their range
    assert f"{final + 0.005:.4f} ({final:.4f} to {final + 0.01:.4f})" in row


def test_the_grpo_vs_ppo_table_and_plot_from_made_up_results(tmp_path):
  study = studies.GRPO_VS_PPO
  facts = sweep.check_study(study, [0, 1], extra=["init_from="])  # no pretrained model needed
  runs = {}
  for i, point in enumerate(study.points):
    runs[point] = {}
    for seed in (0, 1):
      train = [[s, 0.1002 + 0.001 * s + 0.01 * i, 300 * s, 0.5 * s] for s in range(1, 151)]
      evals = [[s, 0.02 + 0.001 * s + 0.01 * seed, 0.05] for s in range(0, 175, 25)]
      memory = {"update_peak": (100 + 50 * i) * 2 ** 20, "policy_state": 1}
      runs[point][str(seed)] = {"train": train, "eval": evals, "memory": memory}
  results = {"study": study.name, "question": study.question, "command": "test",
             "config": study.config, "seeds": [0, 1], "hardware": "test", "set": [],
             "points": {p: list(study.points[p]) for p in study.points}, "point_info": facts,
             "runs": runs}
  paths = sweep.write_outputs(study, results, str(tmp_path))
  assert pathlib.Path(paths[1]).stat().st_size > 20_000
  table = pathlib.Path(paths[0]).read_text()
  # grpo_g8 (i = 1): reward over the last 10 steps = 0.1 + 0.001 * mean(141..150) + 0.01
  row = next(line for line in table.splitlines() if line.startswith("| grpo_g8 |"))
  assert "| GRPO | 8 | 45k |" in row and "0.256 (0.256 to 0.256)" in row
  assert "0.025 → 0.175 (0.170 to 0.180)" in row and row.endswith("| 150 |")


def test_the_pareto_frontier_keeps_only_undominated_points():
  points = [(384, 2.0, "a"), (640, 1.9, "b"), (1152, 1.95, "c"), (2560, 1.8, "d"),
            (1280, 1.85, "e")]
  assert [p[2] for p in studies.pareto_front(points)] == ["a", "b", "e", "d"]


def test_the_decoupled_rope_points_are_matched_on_parameters():
  facts = sweep.check_study(studies.DECOUPLED_ROPE, [0])
  params = {p: f["params_total"] for p, f in facts.items()}
  # equal d_c = d_h: decoupled and coupled MLA have exactly the same parameters
  assert params["mla_decoupled_dc32"] == params["mla_coupled_dc32"]
  assert facts["mla_coupled_dc32"]["decoupled_rope"] is False
  # the others within 0.05% of MHA's count, each d_c the closest integer to it
  mha = params["mha"]
  for point in ("mla_decoupled_dc101", "mla_coupled_dc91", "gqa_kv2"):
    assert abs(params[point] - mha) / mha < 5e-4, (point, params[point], mha)
  from deepseek_jax import analytics
  from deepseek_jax.config import ModelConfig
  for point, d_c, decoupled in (("mla_decoupled_dc101", 101, True),
                                ("mla_coupled_dc91", 91, False)):
    assert facts[point]["kv_lora_rank"] == d_c
    for other in (d_c - 1, d_c + 1):
      count = analytics.param_counts_formula(ModelConfig.preset(
          "ablation", kv_lora_rank=other, decoupled_rope=decoupled)).total
      assert abs(count - mha) > abs(params[point] - mha), (point, other)
  assert studies.DECOUPLED_ROPE.evaluate == ("--lengths=2x,4x", "--yarn")


def test_the_decoupled_rope_table_and_plot_from_made_up_results(tmp_path):
  study = studies.DECOUPLED_ROPE
  results = _made_up_results(study, {p: 2.0 for p in study.points})
  for i, point in enumerate(study.points):
    for seed, run in results["runs"][point].items():
      # bucket k (16 positions) of each curve: 1 + k / 10 (+ 1 under YaRN, + 0.1 per point,
      # + 0.02 per seed)
      curves = {name: {"length": n, "yarn_factor": s, "windows": 9, "bucket": 16,
                       "loss": [1 + k / 10 + (s > 1) + 0.1 * i + 0.02 * int(seed)
                                for k in range(n // 16)],
                       "in_range_first_document": 0.5 + 0.1 * i + 0.02 * int(seed),
                       "in_range_later_documents": 0.9 + 0.1 * i + 0.02 * int(seed)}
                for name, n, s in (("L256", 256, 1.0), ("L512", 512, 1.0),
                                   ("L256_yarn", 256, 2.0), ("L512_yarn", 512, 4.0))}
      run["positions"] = {"train_len": 128, "step": 300, "curves": curves}
  paths = sweep.write_outputs(study, results, str(tmp_path))
  assert pathlib.Path(paths[1]).stat().st_size > 20_000
  table = pathlib.Path(paths[0]).read_text()
  assert ("| loss at 0–127 | 0–127, first document | 0–127, later documents | 128–255 (2x; 256-token "
          "windows) | 256–511 (4x; 512-token windows) | YaRN s = 4: 0–127 | YaRN s = 2: 128–255 "
          "| YaRN s = 4: 256–511 |") in table
  row = next(line for line in table.splitlines() if line.startswith("| mha |"))
  # mha is point 4 (+0.4): buckets 0-7 average 1.35, 8-15 2.15, 16-31 3.35; YaRN adds 1; the
  # seeds' mean adds 0.01 and they span +-0.01
  cells = [c.strip() for c in row.split("|")[7:-1]]
  assert cells == [f"{m:.3f} ({m - 0.01:.3f} to {m + 0.01:.3f})"
                   for m in (1.76, 0.91, 1.31, 2.56, 3.76, 2.76, 3.56, 4.76)], cells
  # paired by seed: point 0 - point 4 = -0.4 in every column and seed
  assert "Paired by seed (a − b for seeds 0 / 1;" in table
  paired = next(line for line in table.splitlines()
                if line.startswith("| mla_decoupled_dc32 − mha |"))
  assert paired.count("-0.40 / -0.40") == 8
  assert "| MHA (4 KV heads) | — | 1,850,752 | 2560 |" in row


def test_a_small_sweep_with_an_evaluation_after_training(tmp_path):
  points = "mla_decoupled_dc32,mla_coupled_dc32"
  args = ["--study=decoupled_rope", f"--points={points}", "--seeds=0",
          f"--workdir={tmp_path}/runs", f"--results={tmp_path}/results", *TINY, "--set=model.overrides.yarn_factor=1.0"]
  proc = _sweep(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count(": ran") == 2
  run_dir = tmp_path / "runs" / "decoupled_rope" / "mla_coupled_dc32" / "seed0"
  full = json.loads((run_dir / sweep.EVAL_FILE).read_text())
  assert sorted(full["curves"]) == ["L128", "L128_yarn", "L64", "L64_yarn"]  # 2x, 4x of 32
  assert full["curves"]["L128_yarn"]["yarn_factor"] == 4.0
  results = json.loads((tmp_path / "results" / "decoupled_rope.json").read_text())
  positions = results["runs"]["mla_coupled_dc32"]["0"]["positions"]
  assert positions["train_len"] == 32 and len(positions["curves"]["L128"]["loss"]) == 8
  np.testing.assert_allclose(positions["curves"]["L128"]["loss"][2],
                             np.mean(full["curves"]["L128"]["loss"][32:48]), atol=1e-5)
  assert "| mla_coupled_dc32 | MLA, RoPE on up-projected keys |" in \
      (tmp_path / "results" / "decoupled_rope.md").read_text()
  # a complete run whose evaluation went missing: only the evaluation is redone
  (run_dir / sweep.EVAL_FILE).unlink()
  again = _sweep(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "mla_coupled_dc32 seed 0: evaluated" in again.stdout
  assert "mla_decoupled_dc32 seed 0: skipped" in again.stdout
  assert json.loads((run_dir / sweep.EVAL_FILE).read_text())["curves"].keys() == full["curves"].keys()
