"""``python -m naflow_onnx.ops``: print README's "Supported ops" table from the registry."""
from . import supported_ops_table

print(supported_ops_table())
