"""Other node packs in the test host: loaded the way ComfyUI loads custom nodes, and a stand-in pack
written by the test."""
import asyncio
import sys
import textwrap
import threading
from pathlib import Path

from .comfy_host import COMFYUI_PATH

CUSTOM_NODES = COMFYUI_PATH / "custom_nodes"
GGUF = "ComfyUI-GGUF"
LTXVIDEO = "ComfyUI-LTXVideo"


def module_name(folder: Path) -> str:
    """The name ComfyUI gives a custom node folder's module (``nodes.load_custom_node``)."""
    return str(folder).replace(".", "_x_")


def load_node_pack(name: str):
    """The node pack ``custom_nodes/<name>`` of the test host, loaded (once) as ComfyUI loads custom nodes;
    its top-level module, or None when the set-up did not install it."""
    import nodes

    folder = CUSTOM_NODES / name
    if not (folder / "__init__.py").is_file():
        return None
    if module_name(folder) not in sys.modules:
        box = {}
        # in a thread of its own: the caller may run an event loop (Playwright's sync API does)
        t = threading.Thread(target=lambda: box.update(ok=asyncio.run(nodes.load_custom_node(str(folder)))))
        t.start()
        t.join()
        if not box.get("ok"):
            raise RuntimeError(f"ComfyUI could not load {folder} (see the log)")
    return sys.modules[module_name(folder)]


def not_installed(name: str) -> str:
    """Why a test that needs the node pack ``name`` skips (with CI=true a skip fails the run)."""
    return (f"node pack {name} is not in the test host's custom_nodes (.ci/nodepacks.sh installs it from "
            "../shared/nodepacks)")


def submodule(pack, name: str):
    """A module of a loaded node pack (``pack``: its top-level module) by its name inside the pack."""
    return sys.modules[f"{pack.__name__}.{name}"]


STANDIN_INIT = '''\
"""A stand-in node pack for the tests. Its __init__ has a side effect, as many packs' have (server routes,
downloads): it leaves a file named after the process that ran it."""
import os

from .gone import StandinGuider, shift  # noqa: F401
from .patches import Scale  # noqa: F401

open(os.path.join(os.path.dirname(__file__), f"init_ran_in_{os.getpid()}"), "w").close()
NODE_CLASS_MAPPINGS = {}
'''

STANDIN_PATCHES = '''\
class Scale:
    """A post-CFG function: the denoised latent times ``factor``."""

    def __init__(self, factor):
        self.factor = factor

    def __call__(self, args):
        return args["denoised"] * self.factor
'''

STANDIN_GONE = '''\
import comfy.samplers


def shift(executor, *args, **kwargs):
    """An APPLY_MODEL wrapper: the model's output plus 0.05."""
    return executor(*args, **kwargs) + 0.05


class StandinGuider(comfy.samplers.CFGGuider):
    """A guider of this pack (ComfyUI's CFGGuider under another name)."""
'''


def write_standin_pack(name: str) -> Path:
    """``custom_nodes/<name>`` of the test host: ``__init__.py`` (a side effect), ``patches.py``
    (``Scale``) and ``gone.py`` (``shift``, ``StandinGuider``), which the test deletes once ComfyUI has
    loaded it, as a pack missing on a worker's machine."""
    folder = CUSTOM_NODES / name
    folder.mkdir(parents=True, exist_ok=True)
    for file, text in (("__init__.py", STANDIN_INIT), ("patches.py", STANDIN_PATCHES), ("gone.py", STANDIN_GONE)):
        (folder / file).write_text(textwrap.dedent(text))
    return folder
