"""The modules ComfyUI node packs import (`folder_paths`, `comfy.utils`, `server`, `comfy_api.latest`, ...),
provided by sdgraph while packs load and while their nodes run.

`environment.PackEnvironment` owns them: a finder placed at the END of `sys.meta_path` answers only for names no
other finder resolves, so a real, importable ComfyUI always wins and nothing is shadowed; the finder is present
only while packs load and while a pack node runs (`PackEnvironment.active`). ComfyUI's model internals
(`comfy.sd`, `comfy.ldm.*`, `comfy.model_patcher`, ...) are not faked: their modules import as placeholders
whose every use raises `ComfyInternalsMissing`, and the nodes whose code uses them are refused with a per-node
reason (`unavailable.py`). This package never imports torch itself; the shims that need it import it when a pack
imports them.
"""

from .environment import PackEnvironment
from .unavailable import ComfyInternalsMissing

__all__ = ["ComfyInternalsMissing", "PackEnvironment"]
