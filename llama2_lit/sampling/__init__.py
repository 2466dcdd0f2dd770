"""Data made by sampling from a model: on-policy preference annotation, best-of-K selection, rejection
sampling, Ghost Attention dialogs and safety context distillation (paper sections 3.2, 3.3 and 4.2.4)."""
