"""Data made by sampling from a model: rejection sampling, on-policy preference annotation, Ghost
Attention dialogs and safety context distillation (paper sections 3.2, 3.3 and 4.2.4)."""
