"""optax adapter for nero-core: Nero as an ``optax.GradientTransformation`` over any pytree.

    import optax, nero_optax
    opt = nero_optax.nero(learning_rate=0.01)           # Flax/Haiku kernels: neurons on the last axis
    state = opt.init(params)                            # shapes and dtypes only; ShapeDtypeStruct leaves work
    updates, state = opt.update(grads, state, params)   # Nero needs params: last in an optax.chain
    params = optax.apply_updates(params, updates)
"""

from ._axes import flax_neuron_axis
from ._checkpoint import restore_state
from ._transform import NeroState, nero
from .agd import AGDState, agd, agd_init
from .star import star

__all__ = ["AGDState", "NeroState", "agd", "agd_init", "flax_neuron_axis", "nero", "restore_state", "star"]
