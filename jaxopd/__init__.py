"""jaxopd: JAX/Flax pretraining and on-policy distillation."""

__version__ = "0.1.0"


def load_hf(*args, **kwargs):
    """`jaxopd.hf.load_hf`, imported on first use so `import jaxopd` stays light."""
    from jaxopd.hf import load_hf as _load_hf

    return _load_hf(*args, **kwargs)


def save_hf(*args, **kwargs):
    """`jaxopd.hf.save_hf`, imported on first use so `import jaxopd` stays light."""
    from jaxopd.hf import save_hf as _save_hf

    return _save_hf(*args, **kwargs)
