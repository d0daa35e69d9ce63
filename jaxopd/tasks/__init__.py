"""Tasks with a programmatic checker, used as prompt sets for distillation and RL (jaxopd/distill.py)."""
