"""PyTorch adapter for nero-core: the core rules as ``torch.optim`` optimizers.

- :class:`Nero`: the neuronal rotator, a ``torch.optim.Optimizer``.
- :func:`param_groups`: Nero parameter groups with the right neuron axis for each module type.
- :func:`describe`: what Nero does with each parameter (role, neuron axis, neuron count, fan-in, and why).
- :class:`AGD`: automatic gradient descent; :class:`Star`: the STAR learned optimizer.
- :class:`ConfigWarning`: the warning for a parameter role that looks like a mistake.
"""

from nero_core._audit import ConfigWarning

from ._describe import describe
from ._groups import param_groups
from ._optimizer import Nero
from .agd import AGD
from .star import Star

__all__ = ["AGD", "ConfigWarning", "Nero", "Star", "describe", "param_groups"]
