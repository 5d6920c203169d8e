"""torch_ar: gradients by Activation Relaxation for any nn.Module.

```python
ar = torch_ar.ARBackward(net)
loss = criterion(ar(x), y)
loss.backward()  # net's .grad filled by activation relaxation
```
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from torch_ar import (
    _C,  # noqa: F401  (registers torch.ops.torch_ar.*)
    alignment,
    metrics,
)
from torch_ar.ar_backward import ARBackward, RelaxationStats
from torch_ar.config import RelaxConfig
from torch_ar.diagnostics import SelftestReport, selftest
from torch_ar.errors import NonFiniteValueError, RelaxationDivergedError, UnsupportedGraphError
from torch_ar.ops import SupportedOp, release_cuda_graph_memory, supported_ops
from torch_ar.variants import VARIANTS

__all__ = [
    "VARIANTS",
    "ARBackward",
    "NonFiniteValueError",
    "RelaxConfig",
    "RelaxationDivergedError",
    "RelaxationStats",
    "SelftestReport",
    "SupportedOp",
    "alignment",
    "metrics",
    "release_cuda_graph_memory",
    "selftest",
    "supported_ops",
    "UnsupportedGraphError",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The experiment harness needs the `experiments` extra and costs an import
    # of torchvision: loaded on first use, so `torch_ar.experiments.X` works
    # after `import torch_ar` alone.
    if name == "experiments":
        import importlib

        return importlib.import_module("torch_ar.experiments")
    raise AttributeError(f"module 'torch_ar' has no attribute {name!r}")
