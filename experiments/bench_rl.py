r"""RL throughput and memory: rollout and update tokens/s of the GRPO step, and the peak memory
of the GRPO update against the PPO update from the compiled programs' memory analysis.

    python experiments/bench_rl.py --config=experiments/configs/r1_zero.py
    python experiments/bench_rl.py --config=experiments/configs/r1_zero.py \
        --config.rl.group_size=16 --config.train.seq_len=16

The model is the config's (the `small` preset by default) with random weights: throughput does
not depend on the weights, and a random policy rarely stops early, so every row samples the whole
budget. Timed: median over --steps after --warmup steps of (a) the rollout (generate with the
sampling log-probs; tokens/s = sampled tokens / s) and (b) the update (pi_old and reference
log-prob forwards plus mu train steps; tokens/s = rows x seq_len x mu / s). Memory: bytes of
each compiled program (arguments, outputs, temporaries; the state is donated, so outputs alias
arguments) and the peak of the update phase = the resident states not passed to a program +
the largest program's arguments + temporaries. GRPO keeps the policy (+ Adam) and the
reference; PPO adds the value model and its Adam moments and runs a second step.
"""

from __future__ import annotations

import statistics
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

from deepseek_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "RL config file", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps (compilation)")
flags.mark_flags_as_required(["config"])


def _setup(config, algorithm: str, workdir: str):
  from deepseek_jax.rl import config as rl_config
  from deepseek_jax.rl import loop
  from deepseek_jax.train.optimizer import make_optimizer
  from deepseek_jax.train.trainer import start_setup
  with config.unlocked():
    config.rl.algorithm = algorithm
    config.init_from = ""
  setup = start_setup(config, schema=rl_config.default_config(), free_form=("rl.rewards",))
  setup.tx = make_optimizer(rl_config.optimizer_config(config))
  task = loop.Task(config, setup.tokenizer, setup.model_cfg.max_seq_len)
  run = loop.Run(setup, workdir, task)
  graphdef, value_graphdef, state, shardings, _ = run.start(None)
  learner = run.learner(graphdef, value_graphdef, shardings)
  return setup, run, graphdef, state, learner


def _measure(config, algorithm: str) -> dict:
  import jax
  from deepseek_jax.rl import loop
  from deepseek_jax.rl.rollout import to_batch
  from deepseek_jax.rl.memory import update_memory
  c = config
  with tempfile.TemporaryDirectory() as workdir:
    setup, run, graphdef, state, learner = _setup(config, algorithm, workdir)
    rows = c.rl.prompts_per_step * c.rl.group_size
    rollout_times, update_times, sampled = [], [], []
    batch = None
    for step in range(1, _WARMUP.value + _STEPS.value + 1):
      t0 = time.perf_counter()
      model = loop.sampling_model(setup, graphdef, state.policy)
      ro, rewards, metrics = loop.sample_step(run, model, step)
      t1 = time.perf_counter()
      batch = learner.prepare(state, to_batch(ro, c.train.seq_len, run.task.tokenizer.pad_id),
                              rewards)
      state, _ = learner.update(state, batch)
      jax.block_until_ready(state)
      t2 = time.perf_counter()
      if step > _WARMUP.value:
        rollout_times.append(t1 - t0)
        update_times.append(t2 - t1)
        sampled.append(metrics["sampled_tokens"])
    memory = update_memory(learner, state, batch)
    out = {"algorithm": algorithm, "rows": rows, "seq_len": c.train.seq_len,
           "rollout_s": statistics.median(rollout_times),
           "rollout_tokens_per_s": statistics.median(sampled) / statistics.median(rollout_times),
           "update_s": statistics.median(update_times),
           "update_tokens_per_s": rows * c.train.seq_len * c.rl.iterations
           / statistics.median(update_times),
           **{f"{k}_bytes": v for k, v in memory.items()}}
    run.ckpt.manager.close()
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax
  from deepseek_jax.train.metrics import host_cpu_name
  results = [cli.run_cli(_measure, _CONFIG.value.copy_and_resolve_references(), a)
             for a in ("grpo", "ppo")]
  mib = 2 ** 20
  device = jax.devices()[0]
  where = host_cpu_name() if device.platform == "cpu" else device.device_kind
  print(f"\n{results[0]['rows']} rows x {results[0]['seq_len']} tokens, {where}, "
        f"jax {jax.__version__}")
  print("| | rollout tok/s | update tok/s | policy+Adam MiB | reference MiB | value+Adam MiB | "
        "policy step temp MiB | value step temp MiB | update peak MiB |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in results:
    print(f"| {r['algorithm'].upper()} | {r['rollout_tokens_per_s']:,.0f} | "
          f"{r['update_tokens_per_s']:,.0f} | {r['policy_state_bytes'] / mib:.1f} | "
          f"{r['reference_bytes'] / mib:.1f} | {r.get('value_state_bytes', 0) / mib:.1f} | "
          f"{r['policy_step_temp_bytes'] / mib:.1f} | "
          f"{r.get('value_step_temp_bytes', 0) / mib:.1f} | "
          f"{r['update_peak_bytes'] / mib:.1f} |")
  grpo, ppo = results
  print(f"PPO's update peak is {ppo['update_peak_bytes'] / grpo['update_peak_bytes']:.2f}x "
        f"GRPO's ({(ppo['update_peak_bytes'] - grpo['update_peak_bytes']) / mib:.1f} MiB more: "
        "the value model, its Adam moments and its step)")


if __name__ == "__main__":
  cli.use_huge_pages()  # restarts once, with malloc on transparent huge pages
  app.run(main, flags_parser=cli.parse_flags)
