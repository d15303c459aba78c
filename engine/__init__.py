"""sdgraph's generic engine: typed nodes, graph formats, validation, planning, cached execution, events.

It knows nothing of Stable Diffusion (and never imports torch); applications register node packs and pass
their own resources to the executor.
"""

from .cache import OutputCache
from .context import AroundNode, CancelToken, Interrupted, Resources, RunContext
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
from .plan import KeyHistory, Plan, Step, compile_plan
from .registry import LoadError, NodeRegistry, TypeInfo
from .spec import ANY, BOOLEAN, COMBO, FLOAT, INT, STRING, Input, NodeDef, NodeDefinitionError, Output, Result, node
from .validation import ValidationError, ValidationResult, validate

__all__ = [
    "ANY", "BOOLEAN", "COMBO", "FLOAT", "INT", "STRING", "AroundNode", "CancelToken", "Executor", "Graph",
    "GraphFormatError", "Input", "Interrupted", "KeyHistory", "Link", "LoadError", "NodeDef", "NodeDefinitionError",
    "NodeError", "NodeFailed", "NodeFinished", "NodeInstance", "NodeRegistry", "NodeStarted", "NodesCached",
    "Output", "OutputCache", "Plan", "Progress", "Resources", "Result", "RunContext", "RunFinished",
    "RunInterrupted", "RunReport", "RunStarted", "Step", "TypeInfo", "ValidationError", "ValidationResult",
    "apply_overrides", "compile_plan", "node", "read_graph_file", "to_api", "validate", "workflow_to_api",
]
