"""The Colab notebooks run top to bottom (their code cells, in order, in one namespace)."""

import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "colab").glob("*.ipynb"))


def test_there_are_notebooks():
  assert NOTEBOOKS


# What each notebook must print (a notebook without an entry fails: add one).
EXPECTED = {
    "quickstart.ipynb": "max |absorbed - expanded|",
    # the study notebooks redraw the committed results: the table's header and one row per point
    "study_latent_width.ipynb": "| mla_dc32 | mla |",
    "study_decoupled_rope.ipynb": "| mla_decoupled_dc101 − mla_coupled_dc91 |",
    "study_load_balance.ipynb": "| aux_f_only_a0.01 |",
    "study_mtp_cost.ipynb": "| D2 | 2 |",
    "study_grpo_vs_ppo.ipynb": "| ppo | PPO | 8 |",
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_cells_run(path, capsys, monkeypatch):
  monkeypatch.chdir(path.parents[1])  # as on Colab after the clone: inside the repository
  cells = json.loads(path.read_text())["cells"]
  namespace: dict = {}
  for cell in cells:
    if cell["cell_type"] == "code":
      exec(compile("".join(cell["source"]), f"{path.name}", "exec"), namespace)
  assert EXPECTED[path.name] in capsys.readouterr().out
