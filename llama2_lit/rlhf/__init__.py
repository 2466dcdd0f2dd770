"""The math of RLHF (paper section 3.2) as plain functions on tensors: reward-model losses, reward combination, PPO."""
