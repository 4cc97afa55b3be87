r"""Held-out loss and perplexity of a checkpoint (the latest in --workdir by default).

    python experiments/evaluate.py --config=experiments/configs/small.py --workdir=/tmp/ds-small
    python experiments/evaluate.py --config=experiments/configs/small.py --workdir=/tmp/ds-small \
        --step=300 --batches=50

Pass the same --config (and overrides) the run was trained with (for an RL workdir, its RL
config, e.g. experiments/configs/r1_zero.py); a different model is refused.
"""

from absl import app, flags
from ml_collections import config_flags

from deepseek_jax import cli
from deepseek_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the training run's workdir", required=True)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (0 included; default: the newest that verifies)")
_BATCHES = flags.DEFINE_integer("batches", None, "held-out batches (default: train.eval_batches)")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  cli.run_cli(trainer.evaluate, _CONFIG.value, _WORKDIR.value, step=_STEP.value,
                  max_batches=_BATCHES.value)


if __name__ == "__main__":
  cli.use_huge_pages()  # restarts once, with malloc on transparent huge pages
  app.run(main, flags_parser=cli.parse_flags)
