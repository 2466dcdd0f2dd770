"""Sampling from the policy for RLHF data (paper section 3.2): the responses that reward models
score and that later stages train on.

``rejection`` is rejection-sampling fine-tuning (paper section 3.2.3): K samples per prompt from
the latest policy, scored by the reward models, the best kept by R_c, pooled across iterations,
with the temperature re-tuned for every new policy (Fig 7, Fig 8).
"""
