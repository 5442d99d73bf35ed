"""batchnorm: batch normalization for PyTorch, done properly.

Drop-in ``BatchNorm1d/2d/3d`` with a fused residual add and activation, one statistics module,
one op boundary (``torch.library`` custom ops) and kernel backends behind it.
"""

from __future__ import annotations

from . import functional, kernels, stats
from .activations import parse_activation
from .nn import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .running import NonFiniteBatchWarning
from .tools import ConvertReport, convert_model

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "ConvertReport",
    "NonFiniteBatchWarning",
    "convert_model",
    "functional",
    "kernels",
    "parse_activation",
    "stats",
    "__version__",
]

# The variants, the tools, SyncBatchNorm and the memory mode: one block each (import, then
# ``__all__ +=``).
from .nn.frozen import (  # noqa: E402
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    freeze,
    unfreeze,
)
from .nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d  # noqa: E402
from .nn.masked import MaskedBatchNorm1d  # noqa: E402
from .nn.recurrent import BNLSTM, BNLSTMCell  # noqa: E402
from .nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d  # noqa: E402
from .nn.virtual import VirtualBatchNorm1d, VirtualBatchNorm2d  # noqa: E402

__all__ += [
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
    "MaskedBatchNorm1d", "BNLSTMCell", "BNLSTM", "VirtualBatchNorm1d", "VirtualBatchNorm2d",
    "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "freeze", "unfreeze",
]
from .tools import (  # noqa: E402
    ActivationMonitor,
    FoldReport,
    FuseReport,
    export_onnx,
    export_program,
    fold,
    fuse,
    recalibrate,
)

__all__ += ["ActivationMonitor", "FoldReport", "FuseReport", "export_onnx", "export_program",
            "fold", "fuse", "recalibrate"]
from .nn.sync import SyncBatchNorm, convert_sync_batchnorm  # noqa: E402

__all__ += ["SyncBatchNorm", "convert_sync_batchnorm"]
# in-place activated BN: the memory mode save="output"
from .tools import SaveReport, save_output  # noqa: E402

__all__ += ["SaveReport", "save_output"]
