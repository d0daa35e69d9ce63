"""jaxopd: JAX/Flax pretraining and on-policy distillation."""

__version__ = "0.1.0"
