"""Sampling from the policy for the RLHF data loop: on-policy preference annotation and best-of-K selection."""
