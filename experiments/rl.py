r"""Reinforcement learning from rule rewards (GRPO, its variants, PPO): the R1-Zero recipe.

    python experiments/rl.py --config=experiments/configs/r1_zero.py --workdir=/tmp/ds-r1zero
    python experiments/rl.py --config=experiments/configs/r1_zero.py:ppo --workdir=/tmp/ds-ppo

Any field can be overridden with --config.a.b=value (deepseek_jax/rl/config.py lists them;
e.g. --config.rl.algorithm=ppo, --config.rl.loss_aggregation=token_mean). Rerunning with the
same --workdir resumes from its newest checkpoint that verifies (--step=N: from step N;
--step=0: from config.init_from again, newer steps moved aside). SIGTERM or Ctrl-C saves the
current step and exits with code 75, so a scheduler that restarts failed jobs resumes it.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from deepseek_jax import cli
from deepseek_jax.rl import loop
from deepseek_jax.train.trainer import PREEMPTED_EXIT_CODE

_CONFIG = config_flags.DEFINE_config_file("config", None, "RL config file[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and metrics go", required=True)
_STEP = flags.DEFINE_integer("step", None, "resume from this step (0: from config.init_from; "
                             "default: the newest checkpoint that verifies)")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  result = cli.run_cli(loop.run, _CONFIG.value, _WORKDIR.value, step=_STEP.value)
  if result.get("preempted_at"):
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  cli.use_huge_pages()  # restarts once, with malloc on transparent huge pages
  app.run(main, flags_parser=cli.parse_flags)
