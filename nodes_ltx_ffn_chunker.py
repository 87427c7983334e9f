"""The LTX FFN Chunker node: MODEL in, MODEL out, with sequence-chunked block feed-forwards."""
from __future__ import annotations

from comfy.ldm.lightricks.model import LTXBaseModel
from comfy_api.latest import io

from . import ffn_chunking, memory_plan
from .errors import user_facing
from .ffn_chunking import apply_ffn_chunking

CATEGORY = "LTXAV Multi-GPU"


def require_ltx(model, node: str, input_name: str = "model"):
    """Return the model's LTX diffusion model, or raise a message naming the node and the input."""
    dm = model.get_model_object("diffusion_model")
    if not isinstance(dm, LTXBaseModel):
        raise ValueError(
            f"{node}: input '{input_name}' is a {type(dm).__name__} model, not an LTX-2 model. "
            "Load an LTX-2 checkpoint (LTXAV audio-video, or LTXV video) with 'Load Diffusion Model' "
            "or 'Load Checkpoint' and connect that MODEL.")
    return dm


class LTXFFNChunker(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTXFFNChunker",
            display_name="LTX FFN Chunker",
            category=CATEGORY,
            description=("Runs the feed-forward of every LTX-2 block (video and audio) over slices of the token "
                         "sequence, so its 4x-wide activations never exist for the whole video at once. "
                         "Same output; much lower peak memory on long videos."),
            search_aliases=["ffn chunk", "feed forward chunking", "ltx memory", "ltxav"],
            inputs=[
                io.Model.Input("model", tooltip="An LTX-2 (LTXAV or LTXV) model. Connect after LoRA loaders or before: "
                               "both work. The MODEL that goes in is not changed. Costs nothing: the output is a "
                               "clone that shares its weights."),
                io.Boolean.Input("auto", default=True, label_on="auto", label_off="fixed",
                                 tooltip=("auto: choose the chunk count at run time from the sequence length and free "
                                          f"device memory (at most {memory_plan.FFN_MAX_TOKENS_PER_CHUNK} tokens per "
                                          "chunk, and a chunk's activations within 1/"
                                          f"{round(1 / memory_plan.FFN_FREE_MEMORY_SHARE)} of free memory; no "
                                          "chunking for short clips). The FFN's peak memory falls by the chunk count "
                                          "(16 chunks: 1/16) at no measurable speed cost on GPU (0.99x the time at "
                                          "16 chunks). fixed: use num_chunks.")),
                io.Int.Input("num_chunks", default=16, min=1, max=ffn_chunking.MAX_CHUNKS,
                             tooltip=("Chunks when auto is off; 1 = off. More chunks = lower FFN peak memory "
                                      "(the FFN's 4x activations shrink by this factor); very many small chunks "
                                      "run slower on GPU, and with weight offloading each chunk re-reads the "
                                      "FFN weights.")),
            ],
            outputs=[io.Model.Output(tooltip="The same model, with chunked feed-forwards.")],
        )

    @classmethod
    @user_facing(("LTX FFN Chunker",))
    def execute(cls, model, auto: bool, num_chunks: int) -> io.NodeOutput:
        require_ltx(model, "LTX FFN Chunker")
        if not 1 <= num_chunks <= ffn_chunking.MAX_CHUNKS:
            raise ValueError(f"LTX FFN Chunker: input 'num_chunks' is {num_chunks}; "
                             f"use 1 (off) to {ffn_chunking.MAX_CHUNKS}.")
        return io.NodeOutput(apply_ffn_chunking(model, ffn_chunking.ChunkSettings(num_chunks, bool(auto))))


NODES = [LTXFFNChunker]
