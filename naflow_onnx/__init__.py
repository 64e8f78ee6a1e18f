"""naflow-onnx: NAFlow attention maps at every layer of any CNN exported to ONNX."""
from .errors import NAFlowError
from .flow import Analyzer, Flow, analyze

__version__ = "0.1.0"
__all__ = ["analyze", "Analyzer", "Flow", "NAFlowError", "__version__"]
