"""sdgraph's generic engine: typed nodes, graph formats, validation, planning, cached execution, events.

It knows nothing of Stable Diffusion (and never imports torch); applications register node packs and pass
their own resources to the executor.
"""

from .cache import OutputCache
from .context import CancelToken, Interrupted, RunContext
from .events import (
    NodeFailed,
    NodeFinished,
    NodesCached,
    NodeStarted,
    Progress,
    RunFinished,
    RunInterrupted,
    RunStarted,
)
from .executor import Executor, NodeError, RunReport
from .formats import GraphFormatError, apply_overrides, read_graph_file, to_api, workflow_to_api
from .graph import Graph, Link, NodeInstance
from .registry import LoadError, NodeRegistry, TypeInfo
from .spec import ANY, BOOLEAN, COMBO, FLOAT, INT, STRING, Input, NodeDef, NodeDefinitionError, Output, Result, node
from .validation import ValidationError, ValidationResult, validate

__all__ = [
    "ANY", "BOOLEAN", "COMBO", "FLOAT", "INT", "STRING", "CancelToken", "Executor", "Graph", "GraphFormatError",
    "Input", "Interrupted", "Link", "LoadError", "NodeDef", "NodeDefinitionError", "NodeError", "NodeFailed",
    "NodeFinished", "NodeInstance", "NodeRegistry", "NodeStarted", "NodesCached", "Output", "OutputCache",
    "Progress", "Result", "RunContext", "RunFinished", "RunInterrupted", "RunReport", "RunStarted", "TypeInfo",
    "ValidationError", "ValidationResult", "apply_overrides", "node", "read_graph_file", "to_api", "validate",
    "workflow_to_api",
]
