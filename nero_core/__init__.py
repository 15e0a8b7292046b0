"""nero-core: architecture-aware optimisers written once against the Python Array API standard.

Each optimiser is a pair of pure functions::

    opt = nero_core.nero(lr=0.01)
    state = opt.init(params)                          # reads shapes and dtypes only
    params, state = opt.update(grads, state, params)  # returns the new parameters and state

``params`` and ``grads`` are sequences of arrays from any array-API library (NumPy, CuPy, PyTorch, JAX, ...).
"""

from ._agd import AGDState, agd, agd_init, weight_axes
from ._base import Optimizer
from ._nero import NeroState, balanced, nero
from ._neurons import neuron_axes
from ._star import StarState, load_star_config, load_star_params, star

__version__ = "0.1.0"

__all__ = [
    "AGDState",
    "NeroState",
    "Optimizer",
    "StarState",
    "__version__",
    "agd",
    "agd_init",
    "balanced",
    "load_star_config",
    "load_star_params",
    "nero",
    "neuron_axes",
    "star",
    "weight_axes",
]
