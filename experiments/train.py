r"""Train a DeepSeek-style model: the README's main command.

    python experiments/train.py --config=experiments/configs/small.py --workdir=/tmp/ds-small
    python experiments/train.py --config=experiments/configs/small.py:runlocal \
        --config.train.steps=50 --workdir=/tmp/ds-quick

Any config field can be overridden with --config.a.b=value; unknown fields and bad values fail
before anything is compiled. Rerunning with the same --workdir resumes from its latest
checkpoint (SIGTERM saves one first).
"""

from absl import app, flags
from ml_collections import config_flags

from deepseek_jax import cli
from deepseek_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and metrics go", required=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.run_cli(trainer.train, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
