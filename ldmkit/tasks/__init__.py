"""Model tasks: one module each, and the registry that maps names to them (see registry.py)."""

from .control import CONTROL
from .generate import GENERATE
from .inpaint import INPAINT
from .registry import TASKS, Task, get_task, register, task_names, unregister
from .upscale import UPSCALE
from .video import VIDEO

__all__ = [
    "CONTROL",
    "GENERATE",
    "INPAINT",
    "TASKS",
    "UPSCALE",
    "VIDEO",
    "Task",
    "get_task",
    "register",
    "task_names",
    "unregister",
]
