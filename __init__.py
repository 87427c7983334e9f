"""ComfyUI-LTXAV-Parallel: long LTX-2 audio-video generation on several GPUs.

Nodes are registered only when this folder is loaded by ComfyUI (as a custom node); the pure
modules (ffn_chunking, ...) import without it.
"""
try:
    import comfy.patcher_extension  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    pass
else:
    from comfy_api.latest import ComfyExtension, io

    from .nodes_ltx_ffn_chunker import NODES as _FFN_NODES
    from .nodes_parallel_sampler import NODES as _SAMPLER_NODES
    from .nodes_video import NODES as _VIDEO_NODES

    class LTXAVParallelExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return [*_FFN_NODES, *_SAMPLER_NODES, *_VIDEO_NODES]

    async def comfy_entrypoint() -> LTXAVParallelExtension:
        from .driver import install_signal_handlers

        install_signal_handlers()  # ComfyUI loads custom nodes in its main thread: the one signals go to
        return LTXAVParallelExtension()
