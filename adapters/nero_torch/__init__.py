"""PyTorch adapter for nero-core: the core rules as ``torch.optim`` optimizers.

- :class:`Nero`: the neuronal rotator, a ``torch.optim.Optimizer``.
- :func:`param_groups`: Nero parameter groups with the right neuron axis for each module type.
- :class:`AGD`: automatic gradient descent; :class:`Star`: the STAR learned optimizer.
"""

from ._groups import param_groups
from ._optimizer import Nero
from .agd import AGD
from .star import Star

__all__ = ["AGD", "Nero", "Star", "param_groups"]
