"""Meta-training STAR in JAX: a task distribution, antithetic PES (or ES) over truncated unrolls, an outer AdamW on
the MLP weights, checkpoints to resume from, and the noisy-quadratic stability check. Run
``python -m nero_optax.metatrain --help``."""

from .nqm import nqm_check
from .pes import Hyper, Particles, init_particles, init_theta, pes_step, unroll
from .tasks import FAMILIES, SMOKE_FAMILIES, CharTransformer, Cnn, Mlp, families, load_dataset

__all__ = [
    "FAMILIES",
    "SMOKE_FAMILIES",
    "CharTransformer",
    "Cnn",
    "Hyper",
    "Mlp",
    "Particles",
    "families",
    "init_particles",
    "init_theta",
    "load_dataset",
    "nqm_check",
    "pes_step",
    "unroll",
]
