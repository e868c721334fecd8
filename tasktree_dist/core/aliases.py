"""Package attributes that are live views of a module global, for code that patches the package.

tinytasktree is one module, so its users and tests patch module attributes (`tinytasktree.json_repair = None`,
`tinytasktree._GLOBAL_HOOK_AFTER_SPAWNED_TASK_FINISH.clear()`). Here those globals live in the modules that use
them; a live alias makes reading the package attribute read the global and assigning it rebind the global, so
the patch reaches the code (a plain re-export would only rebind the package's copy of the name).
"""

from __future__ import annotations

import sys
import types
from typing import Any


class LiveAlias:
    """A data descriptor on a module's class: `package.name` is `module.attr`, get and set."""

    def __init__(self, module: types.ModuleType, attr: str) -> None:
        self.module, self.attr = module, attr

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        return getattr(self.module, self.attr)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(self.module, self.attr, value)


def install_live_aliases(package: str, aliases: dict[str, tuple[types.ModuleType, str]]) -> None:
    """Give the module `package` the attributes `aliases` (name -> (module, global name)) as live aliases."""
    module = sys.modules[package]
    namespace = {name: LiveAlias(source, attr) for name, (source, attr) in aliases.items()}
    module.__class__ = type("LiveAliasModule", (types.ModuleType,), namespace)
