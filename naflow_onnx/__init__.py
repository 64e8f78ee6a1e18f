"""naflow-onnx: NAFlow attention maps at every layer of any CNN exported to ONNX.

The public API is ``analyze``, ``Analyzer``, ``Flow`` and ``NAFlowError``. They are imported on
first use, so that ``naflow --help`` and Ctrl-C during start-up stay quick and clean.
"""
from .errors import NAFlowError

__version__ = "0.1.0"
__all__ = ["analyze", "Analyzer", "Flow", "NAFlowError", "__version__"]


def __getattr__(name):
    if name in ("analyze", "Analyzer", "Flow"):
        from . import flow
        return getattr(flow, name)
    raise AttributeError(f"module 'naflow_onnx' has no attribute '{name}'")
