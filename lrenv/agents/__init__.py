"""PPO training of learning-rate agents (stable-baselines3)."""
