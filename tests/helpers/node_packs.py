"""Node packs users run beside this one, as the set-up installs them into the test host's custom_nodes
(.ci/setup_env.sh unpacks ../shared/nodepacks/<pack>-<commit>.tar.xz there): their folders, and
ComfyUI's own loader importing one into this process."""
import asyncio
import threading

from .comfy_host import COMFYUI_PATH

LTXVIDEO = COMFYUI_PATH / "custom_nodes" / "ComfyUI-LTXVideo"


def missing(path) -> str | None:
    """Why the node pack at ``path`` cannot be used (None when it can)."""
    if not (path / "__init__.py").is_file():
        return (f"node pack NOT INSTALLED at {path}: tests that need it SKIPPED (.ci/setup_env.sh unpacks it from "
                "../shared/nodepacks/ into the host's custom_nodes)")
    return None


def load(path) -> dict:
    """Load the node pack with ComfyUI's own loader (``nodes.load_custom_node``: the module is named by the
    folder's path, as in ComfyUI) once; ComfyUI's NODE_CLASS_MAPPINGS, which then hold its nodes."""
    import nodes

    if str(path) not in nodes.LOADED_MODULE_DIRS.values():
        box = {}
        # in a thread of its own: the caller may run an event loop (Playwright's sync API does)
        t = threading.Thread(target=lambda: box.update(ok=asyncio.run(nodes.load_custom_node(str(path)))))
        t.start()
        t.join()
        assert box.get("ok"), f"ComfyUI could not load the node pack at {path} (see the log)"
    return nodes.NODE_CLASS_MAPPINGS
