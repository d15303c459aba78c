"""The application's side of running models: device memory and the model manager.

`engine/` is generic and never looks inside the resources it hands to nodes; what it needs from them is the
node hook (`engine.context.Resources`). This package holds what is specific to torch and devices: the
`ModelManager` (one owner of device memory, `models.py`) and the device-memory port with its real torch
implementation and out-of-memory detection (`memory.py`). Importing it does not import torch.
"""

from .memory import DeviceMemory, TorchMemory, format_bytes, is_out_of_memory, parse_bytes
from .models import ModelHandle, ModelManager, OutOfMemory, handles_in

__all__ = ["DeviceMemory", "ModelHandle", "ModelManager", "OutOfMemory", "TorchMemory", "format_bytes",
           "handles_in", "is_out_of_memory", "parse_bytes"]
