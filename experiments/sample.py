r"""Generate from a checkpoint (the latest in --workdir by default).

    python experiments/sample.py --config=experiments/configs/small.py --workdir=/tmp/ds-small \
        --prompt="Mia lives in" --prompt="Q: How old is Leo?\nA:" \
        --config.sample.temperature=0.7 --config.sample.max_new_tokens=64
"""

from absl import app, flags
from ml_collections import config_flags

from deepseek_jax import cli
from deepseek_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the training run's workdir", required=True)
_PROMPTS = flags.DEFINE_multi_string("prompt", None, "prompt(s); default: config.sample.prompts")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (0 included; default: the newest that verifies)")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  # "\n" and "\t" typed on a command line become a newline and a tab.
  prompts = ([p.replace("\\n", "\n").replace("\\t", "\t") for p in _PROMPTS.value]
             if _PROMPTS.value else None)
  cli.run_cli(trainer.sample, _CONFIG.value, _WORKDIR.value, prompts=prompts, step=_STEP.value)


if __name__ == "__main__":
  cli.use_huge_pages()  # restarts once, with malloc on transparent huge pages
  app.run(main, flags_parser=cli.parse_flags)
