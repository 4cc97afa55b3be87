"""Writes colab/study_<name>.ipynb for each study of experiments/ablations/studies.py: the
question, what the committed results show, and cells that load docs/results/<name>.json and
redraw the table and the plot without training. Rerun it after a study's results change:

    python colab/make_study_notebooks.py
"""

import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent

# name -> (title, the question in a few sentences)
STUDY_TEXT = {
    "grpo_vs_ppo": ("Study 5: GRPO vs PPO",
     "GRPO (DeepSeekMath, used for R1) drops PPO's value model and estimates each sample's "
     "advantage from a group of G samples of the same prompt. The review (arXiv 2503.11486, "
     "experiment 2) asks for both on the same base model, prompts and reward: sample efficiency, "
     "memory and final reward, with G = 4 and 8 (it expects G < 4 to make the group "
     "normalisation noisy). Here: R1-Zero on the embedded arithmetic task from the small "
     "pretrained model, 150 steps of 16 prompts; the memory is XLA's analysis of each compiled "
     "update."),
    "latent_width": ("Study 1: MLA's latent width d_c",
     "MLA caches one latent vector c_KV of width d_c per token instead of every head's keys and "
     "values (DeepSeek-V2 §2.1). How small can d_c be before quality suffers? The review (arXiv "
     "2503.11486, experiment 1) asks for a sweep of d_c against validation loss and KV-cache "
     "size. Here d_c runs from d_h (32) to 8 d_h, beside MHA and GQA with the same head "
     "dimensions; the left plot puts each run at its KV-cache bytes per token and draws the "
     "Pareto frontier."),
    "decoupled_rope": ("Study 2: decoupled RoPE and long context",
     "MLA caches a compressed latent c_KV and absorbs the key up-projection into the query; RoPE "
     "on "
     "the up-projected keys would block that, so DeepSeek-V2 (§2.1.3) carries position in a "
     "separate "
     "rotary key k_R shared by all heads (decoupled RoPE). The review (arXiv 2503.11486, open "
     "question 1) asks whether that is what makes MLA work, and whether it fails to carry "
     "position at "
     "long contexts. The points: MLA with decoupled RoPE and MLA with RoPE on the up-projected "
     "keys "
     "(decoupled_rope=False; no absorption), at equal d_c and at MHA's parameter count, beside MHA "
     "and GQA. After training on 128-token rows, each model reads 256- and 512-token windows of "
     "held-out text (documents joined by newlines), and the loss is drawn by position, plain and "
     "with YaRN applied at evaluation (s = 2 and 4, no fine-tuning). The second table pairs the "
     "runs seed by seed."),
    "load_balance": ("Study 3: load balancing (γ, α, and the loss's form)",
     "DeepSeek-V3 balances its experts with a bias on the routing scores, updated by γ after "
     "each step (no auxiliary loss), where V2 used an auxiliary loss α Σ f_i P_i. The review "
     "(experiment 3 and open question 2) asks how γ and α trade balance against quality, and "
     "whether f_i is needed in the loss at all: `balance_loss_form` switches between f·P "
     "(standard), P only (f replaced by E·P, no top-k information) and f only (the loads, with a "
     "straight-through gradient into the chosen experts' scores). The plots show the "
     "expert-utilisation entropy and the most loaded expert over training, the final held-out "
     "loss, and each point's final load per layer and expert."),
    "mtp_cost": ("Study 4: what MTP costs",
     "Multi-token prediction (DeepSeek-V3 §2.2) adds D sequential modules that predict tokens "
     "further ahead; V3 reports better sample efficiency but not the training time those modules "
     "take (the review's open question 3). The same runs are drawn against steps, training "
     "seconds and training FLOPs, so sample efficiency and time efficiency can be compared on "
     "one page."),
}
# name -> what the committed results show (Markdown bullets)
FINDINGS = {
    "grpo_vs_ppo": (
        "- **G = 4 vs G = 8.** Same reward per step and the same held-out accuracy, so G = 4 "
        "learns about twice as fast per rollout token.\n- **PPO vs GRPO.** PPO learns more "
        "slowly per step: final reward 0.105 against 0.146, held-out 0.118 against 0.186.\n- "
        "**Cost of PPO.** Its steps take 1.6x as long at the same 8 samples per prompt, and its "
        "update needs 1.23x GRPO's memory (the value model, its Adam moments and its step).\n- "
        "**Caveat.** PPO's settings are untuned defaults."),
    "latent_width": (
        "- **Cache size vs loss.** The smallest latent, d_c = d_h = 32, matches MHA's held-out "
        "loss with 1/6.7 of its cache, and is the whole Pareto frontier.\n- **Wider latents "
        "learn slower.** d_c = 128 and 256 are far behind after 300 steps, in both seeds. Their "
        "curves are still falling steeply, so this is about learning speed in a short run, not "
        "capacity: whether a wide latent ever pays off needs runs that converge."),
    "decoupled_rope": (
        "- **Inside the trained length** decoupled and coupled RoPE are the same: the first "
        "document's loss differs by -0.08 to +0.01, seed by seed, at equal d_c.\n"
        "- **Past it, compare with the later documents.** Tokens past 128 lie in a window's "
        "later documents, which already read at 1.8-2.6 nats inside the trained length (the "
        "model never trained with an earlier document in its span). Against that reference, "
        "2x adds -0.3 to +1.0 and 4x adds 0.6 to 2.2: position breaks at 4x. YaRN at evaluation "
        "(no fine-tuning) takes back 0.3-1.2 nats there and costs about 1 nat inside the "
        "trained length.\n"
        "- **Decoupled RoPE is behind coupled RoPE and MHA past the training length, pair by "
        "pair:** in 9 of 12 seed-by-seed comparisons at d_c = 32 (all for seeds 0 and 1), 11 "
        "of 12 at matched parameters, 11 of 12 against MHA; most under YaRN (up to +0.9). One "
        "16-wide rotary key shared by all heads carries position less well than per-head "
        "rotary keys, the direction the review worried about.\n"
        "- **Not shown:** 128K contexts after YaRN fine-tuning, as V2 and V3 train."),
    "load_balance": (
        "- **Imbalance.** Without balancing, the busiest expert of the worst layer gets ~7x the "
        "mean load.\n- **γ and α.** γ = 0.01 and α >= 0.01 balance within ~100 steps (entropy "
        "0.99). γ = 0.1 overshoots and oscillates; γ = 0.001 is too slow for 300 steps.\n- **The "
        "loss's form.** P only does not balance (entropy 0.76, max/mean 5.7); f only balances as "
        "well as f·P. Here the load term f carries the pressure.\n- **Held-out loss.** No point "
        "differs beyond the seed spread (±0.02 to 0.04)."),
    "mtp_cost": (
        "- **Cost per step.** Each MTP module costs +27% s/step at D = 1 and +56% at D = 2 (+34% "
        "and +68% FLOPs: a transformer block plus the full-vocabulary head).\n- **Equal "
        "wall-clock.** At D = 0's training time, the MTP runs are far behind.\n- **Sample "
        "efficiency.** The gain per step at the end is inside the seed spread (±0.03). V3's "
        "claim concerns deep models and long runs, where one module is a small share of the "
        "step."),
}
CAVEAT = (
    "**Toy scale.** These runs are minutes on a 2-core CPU (the `ablation` preset, ~1.7M "
    "parameters, 300 steps of 8 x 128 tokens of the embedded corpus): they show how to ask the "
    "question and what the switches do, not what happens at the papers' scale. `python "
    "experiments/ablations/sweep.py --study={name} --full` runs the same grid at the `small` "
    "preset and 5,000 steps on an accelerator.")
RL_CAVEAT = (
    "**Toy scale.** The 18M-parameter `small` model on single-digit arithmetic, 2 seeds, 150 RL "
    "steps on a 2-core CPU: how to ask the question and what the switches do, not what happens "
    "at R1's scale. `python experiments/ablations/sweep.py --study=grpo_vs_ppo --full` runs "
    "R1-Zero's 32 prompts x 16 samples for 1,000 steps on an accelerator.")


def cell(kind: str, text: str) -> dict:
  c = {"cell_type": kind, "metadata": {}, "source": text.splitlines(keepends=True)}
  if kind == "code":
    c.update(execution_count=None, outputs=[])
  return c


def notebook(name: str, title: str, question: str) -> dict:
  caveat = RL_CAVEAT if name == "grpo_vs_ppo" else CAVEAT.format(name=name)
  results = json.loads((HERE.parent / "docs" / "results" / f"{name}.json").read_text())
  seeds = len(results["seeds"])
  cells = [
      cell("markdown", f"# {title}\n\n{question}\n\n{caveat}\n\n"
           f"**What the committed results show** ({seeds} seeds; the band is the seeds' range):"
           f"\n\n{FINDINGS[name]}\n\n"
           f"This notebook loads the committed results (`docs/results/{name}.json`) and redraws "
           "the table and the plot without training. To rerun the study: `python "
           f"experiments/ablations/sweep.py --study={name}`.\n\nOn Colab, first run three "
           "cells: `!git clone <this repository>`, `%cd deepseek-jax`, "
           "`!pip install -e .[plots]`."),
      cell("code", "import json, pathlib, sys\n\n"
           "# The repository: this folder or one above it (on Colab, after the clone above).\n"
           "ROOT = next(p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]\n"
           "            if (p / 'experiments' / 'ablations' / 'studies.py').exists())\n"
           "sys.path.insert(0, str(ROOT / 'experiments' / 'ablations'))\n"
           "import studies\n\n"
           f"study = studies.STUDIES['{name}']\n"
           f"results = json.loads((ROOT / 'docs' / 'results' / '{name}.json').read_text())\n"
           "print(results['question'])\n"
           "print('command:', results['command'])\n"
           "print('hardware:', results['hardware'], '| seeds:', results['seeds'])"),
      cell("code", "print(study.table(results))"),
      cell("code", "import tempfile\n"
           "png = str(pathlib.Path(tempfile.mkdtemp()) / f'{study.name}.png')\n"
           "study.plot(results, png)\n"
           "try:\n    from IPython.display import Image, display\n    display(Image(png))\n"
           "except ImportError:\n    print('plot written to', png)"),
  ]
  for i, c in enumerate(cells):
    c["id"] = f"{name}-{i}"
  return {"cells": cells, "metadata": {"kernelspec": {"display_name": "Python 3",
                                                      "language": "python", "name": "python3"},
                                       "language_info": {"name": "python"}},
          "nbformat": 4, "nbformat_minor": 5}


if __name__ == "__main__":
  for name, (title, question) in STUDY_TEXT.items():
    with open(HERE / f"study_{name}.ipynb", "w", encoding="utf-8") as f:
      json.dump(notebook(name, title, question), f, indent=1, ensure_ascii=False)
    print("wrote", f"colab/study_{name}.ipynb")
