r"""Train a DeepSeek-style model: the README's main command.

    python experiments/train.py --config=experiments/configs/small.py --workdir=/tmp/ds-small
    python experiments/train.py --config=experiments/configs/small.py:runlocal \
        --config.train.steps=50 --workdir=/tmp/ds-quick

Any config field can be overridden with --config.a.b=value; unknown fields and bad values fail
before anything is compiled. Rerunning with the same --workdir resumes from its newest
checkpoint that verifies (--step=N: from step N; --step=0: from the initialisation; newer
steps are moved aside, not deleted). SIGTERM or Ctrl-C saves the current step and exits with
code 75 (trainer.PREEMPTED_EXIT_CODE), so a scheduler that restarts failed jobs resumes it.
"""

import sys


from absl import app, flags
from ml_collections import config_flags

from deepseek_jax import cli
from deepseek_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and metrics go", required=True)
_STEP = flags.DEFINE_integer("step", None, "resume from this step (0: from the initialisation; "
                             "default: the newest checkpoint that verifies)")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  result = cli.run_cli(trainer.train, _CONFIG.value, _WORKDIR.value, step=_STEP.value)
  if result.get("preempted_at"):
    sys.exit(trainer.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  cli.use_huge_pages()  # restarts once, with malloc on transparent huge pages
  app.run(main, flags_parser=cli.parse_flags)
