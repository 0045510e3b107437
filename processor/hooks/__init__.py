"""WHMCS-style hooks: operator functions around every step of a cancellation.

    from processor.hooks import add_hook

    @add_hook("PreModuleTerminate", priority=10)
    def keep_paying_customers(params):
        if params["client"]["balance"] > 0:
            return {"abortcmd": True, "reason": "outstanding balance"}

The points are declared in `processor.hooks.points`; docs/hooks.md describes each.
"""

from processor.hooks.loader import ENTRY_POINT_GROUP, HookLoadError, add_hook, load_hooks
from processor.hooks.points import CANCELLATION_TASK, MODULE_PARAMS, MODULE_POINTS, POINTS, HookPoint
from processor.hooks.registry import HookDefinitionError, HookFailed, HookImpl, HookRegistry

__all__ = [
    "CANCELLATION_TASK",
    "ENTRY_POINT_GROUP",
    "MODULE_PARAMS",
    "MODULE_POINTS",
    "POINTS",
    "HookDefinitionError",
    "HookFailed",
    "HookImpl",
    "HookLoadError",
    "HookPoint",
    "HookRegistry",
    "add_hook",
    "load_hooks",
]
