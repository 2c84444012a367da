"""Reusable RLHF parts: PPO math (`core`), rollout/scoring helpers (`rollout`) and our PPO
trainer (`ppo`). Import from the submodules, e.g. `from alignline.rl.ppo import PPOTrainer`."""
