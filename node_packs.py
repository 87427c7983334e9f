"""Other node packs' code in the workers, under the names ComfyUI gave it.

ComfyUI imports a custom node pack as a module named by its folder's path (``nodes.load_custom_node``:
``/…/custom_nodes/ComfyUI-LTXVideo``, dots of the path written ``_x_``; its submodules
``/…/custom_nodes/ComfyUI-LTXVideo.stg``), so whatever a pack puts in a MODEL or a guider (a wrapper, a
block patch, the guider's class) pickles as a reference to a module of that name, which no other process
can import by it. ``roots`` lists those modules in ComfyUI's process (name -> the folder or file ComfyUI
loaded it from); a pickle carries the ones it refers to (``model_transfer.dumps``), and in a worker
``PathNamedModules`` imports them under the same names from the same paths (on other nodes of a
cluster: the same install).

A pack's top-level module is made without running its ``__init__`` (node registration, server routes
that need ComfyUI's server, every node's imports), as the worker makes this pack's own: a submodule runs
only its own code and what it imports. Only when that is not enough (something defined in the ``__init__``
itself, or set up there for the pack's modules) does it run (``complete``), as ComfyUI runs it.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys


def is_path_named(module: str) -> bool:
    """Whether ``module`` (a dotted name) belongs to a custom node ComfyUI imported under its path."""
    return os.path.isabs(module.split(".", 1)[0])


def roots(names=None) -> dict[str, str]:
    """Path-named top-level modules of this process: name -> the folder (a package) or file it was
    loaded from; only those of ``names`` (module names, any depth) when given."""
    wanted = None if names is None else {n.split(".", 1)[0] for n in names if is_path_named(n)}
    out = {}
    for name, module in list(sys.modules.items()):
        if "." in name or not os.path.isabs(name) or (wanted is not None and name not in wanted):
            continue
        path = getattr(module, "__path__", None)
        location = list(path)[0] if path else getattr(module, "__file__", None)
        if location:
            out[name] = location
    return out


def pack_name(module: str) -> str:
    """The node pack a module comes from, as its folder is named (``ComfyUI-LTXVideo``); for other
    modules, their top-level package (``comfy``)."""
    root = module.split(".", 1)[0]
    if not os.path.isabs(root):
        return root
    return os.path.basename(root).replace("_x_", ".")  # ComfyUI wrote the path's dots as _x_


class _Deferred(importlib.abc.Loader):
    """A package's module without running its ``__init__`` (``complete`` runs it)."""

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        pass


class PathNamedModules(importlib.abc.MetaPathFinder):
    """In a worker: custom node modules under the path names ComfyUI gave them (``roots`` of the
    ComfyUI process, added with ``add``)."""

    def __init__(self):
        self.roots: dict[str, str] = {}
        self.deferred: set[str] = set()

    def add(self, roots: dict[str, str]) -> None:
        self.roots.update(roots)

    def find_spec(self, name, path=None, target=None):
        location = self.roots.get(name)
        if location is None:
            return None
        if os.path.isdir(location):
            self.deferred.add(name)
            return importlib.util.spec_from_file_location(name, os.path.join(location, "__init__.py"),
                                                          loader=_Deferred(), submodule_search_locations=[location])
        return importlib.util.spec_from_file_location(name, location)

    def complete(self, name: str) -> bool:
        """Run a top-level package's ``__init__`` that was deferred; whether it ran (its errors raise)."""
        module = sys.modules.get(name)
        if name not in self.deferred or module is None:
            return False
        self.deferred.discard(name)
        importlib.machinery.SourceFileLoader(name, module.__file__).exec_module(module)
        return True


_FINDER: PathNamedModules | None = None


def finder() -> PathNamedModules:
    """This process's ``PathNamedModules``, installed on first use."""
    global _FINDER
    if _FINDER is None:
        _FINDER = PathNamedModules()
        sys.meta_path.append(_FINDER)
    return _FINDER


def complete(module: str) -> bool:
    """See ``PathNamedModules.complete`` (False where no finder was installed)."""
    return _FINDER is not None and _FINDER.complete(module)
