"""Post-training from rule rewards: rollout, rewards, advantages, the GRPO/PPO losses (each a
``train.loss.Loss`` for the one shared train step), the value model and the RL loop."""
