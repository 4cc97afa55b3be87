r"""Held-out loss and perplexity of a checkpoint (the latest in --workdir by default), or with
--lengths the held-out loss by position on windows longer than training, with and without YaRN
(length extrapolation; deepseek_jax/train/extrapolation.py).

    python experiments/evaluate.py --config=experiments/configs/small.py --workdir=/tmp/ds-small
    python experiments/evaluate.py --config=experiments/configs/small.py --workdir=/tmp/ds-small \
        --step=300 --batches=50
    python experiments/evaluate.py --config=experiments/configs/small.py --workdir=/tmp/ds-small \
        --lengths=2x,4x,8x --output=/tmp/ds-small/position_loss.json

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
_LENGTHS = flags.DEFINE_list("lengths", None, "window lengths, in tokens or as multiples of "
                             "train.seq_len (e.g. 256,512 or 2x,4x): loss by position instead of "
                             "the mean held-out loss")
_YARN = flags.DEFINE_bool("yarn", True, "with --lengths: also evaluate lengths past "
                          "train.seq_len under YaRN (s = length / train.seq_len)")
_WINDOWS = flags.DEFINE_integer("windows", None, "with --lengths: at most this many windows "
                                "per length (default: all the held-out documents fill)")
_OUTPUT = flags.DEFINE_string("output", None, "with --lengths: write the curves to this JSON file")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing --output file")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  cli.run_cli(_evaluate)


def _evaluate():
  if _LENGTHS.value is None:
    given = [f"--{f.name}" for f in (_YARN, _WINDOWS, _OUTPUT, _OVERWRITE) if f.present]
    if given:
      raise ValueError(f"{', '.join(given)}: only used with --lengths (loss by position); "
                       "add e.g. --lengths=2x,4x or drop them")
    return trainer.evaluate(_CONFIG.value, _WORKDIR.value, step=_STEP.value,
                            max_batches=_BATCHES.value)
  if _BATCHES.present:
    raise ValueError("--batches is for the mean held-out loss; with --lengths, cap the windows "
                     "with --windows=N")
  return trainer.position_loss(_CONFIG.value, _WORKDIR.value, _LENGTHS.value, yarn=_YARN.value,
                               step=_STEP.value, max_windows=_WINDOWS.value,
                               output=_OUTPUT.value, overwrite=_OVERWRITE.value)


if __name__ == "__main__":
  cli.use_huge_pages()  # restarts once, with malloc on transparent huge pages
  app.run(main, flags_parser=cli.parse_flags)
