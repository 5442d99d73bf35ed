"""Tools around batch normalization: convert, fold, recalibrate, monitor, export."""

from .convert import ConvertReport, convert_model, register_conversion
from .export import export_onnx, export_program, onnx_translations
from .fold import FoldedEpilogue, FoldReport, fold, is_batch_norm
from .fuse import FuseReport, fuse
from .monitor import ActivationMonitor
from .recalibrate import recalibrate
from .save_output import SaveReport, save_output

__all__ = [
    "ActivationMonitor",
    "ConvertReport",
    "FoldReport",
    "FoldedEpilogue",
    "FuseReport",
    "convert_model",
    "export_onnx",
    "export_program",
    "fold",
    "fuse",
    "is_batch_norm",
    "onnx_translations",
    "recalibrate",
    "register_conversion",
    "SaveReport",
    "save_output",
]
