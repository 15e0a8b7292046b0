"""optax adapter for nero-core: Nero as an ``optax.GradientTransformation`` over any pytree.

    import optax, nero_optax
    opt = nero_optax.nero(learning_rate=0.01)           # Flax/Haiku kernels: neurons on the last axis
    state = opt.init(params)                            # shapes and dtypes only; ShapeDtypeStruct leaves work
    updates, state = opt.update(grads, state, params)   # Nero needs params: last in an optax.chain
    params = optax.apply_updates(params, updates)
    nero_optax.describe(params)                         # what Nero does with each leaf, and why
"""

from nero_core._audit import ConfigWarning

from ._axes import flax_neuron_axis
from ._checkpoint import restore_state
from ._describe import describe
from ._transform import NeroState, nero
from .agd import AGDState, agd, agd_init
from .star import star

__all__ = [
    "AGDState", "ConfigWarning", "NeroState", "agd", "agd_init", "describe", "flax_neuron_axis", "nero", "restore_state",
    "star",
]
