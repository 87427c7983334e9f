"""LTXAV Save Video: an LTX-2 video + audio latent to a video file, decoded and written a few frames at a
time (any length in bounded host memory), on one GPU or split over the parallel sampler's workers; and
LTXAV Decode Video, the same decode returning IMAGE."""
from __future__ import annotations

import os

import torch
from comfy_api.latest import Types, io, ui

from . import decode_plan, video_decode, video_save
from .nodes_ltx_ffn_chunker import CATEGORY

DECODE_NODE = "LTXAV Decode Video"


def tile_inputs():
    """VAEDecodeTiled's four inputs, 0 = no tiles; advanced."""
    return [
        io.Int.Input("tile_size", default=0, min=0, max=4096, step=32, optional=True, advanced=True,
                     tooltip=("0: whole frames, no tiles (no seams; the fastest: nothing is decoded twice). Other "
                              "values: VAEDecodeTiled's spatial tiles and blending, to get its frames exactly "
                              "(the official templates use 512): more time (overlaps are decoded twice) and more "
                              "GPU memory (each tile's frames wait until every tile has them).")),
        io.Int.Input("overlap", default=64, min=0, max=4096, step=32, optional=True, advanced=True,
                     tooltip=("Pixels tiles overlap (VAEDecodeTiled's overlap; used with tile_size > 0): wider "
                              "blends seams more smoothly and costs more time.")),
        io.Int.Input("temporal_size", default=0, min=0, max=1 << 20, step=8, optional=True, advanced=True,
                     tooltip=("0: the whole clip in one pass, however long (no seams in time; host memory does not "
                              "grow with it). Other values: VAEDecodeTiled's temporal tiles of that many frames "
                              "(the official templates use 4096), to get its frames exactly: a little more time "
                              "(overlaps decoded twice).")),
        io.Int.Input("temporal_overlap", default=8, min=4, max=4096, step=4, optional=True, advanced=True,
                     tooltip=("Frames temporal tiles overlap (VAEDecodeTiled's; used with temporal_size > 0): more "
                              "costs a little more time.")),
    ]


LATENT_TOOLTIP = ("The LTX-2 latent: video + audio from the LTXAV Parallel samplers (or KSampler, "
                  "LTXVConcatAVLatent), or LTXVSeparateAVLatent's video output. Decode time grows with its frames "
                  "x width x height; host memory does not: frames are decoded and written a few at a time.")
VAE_TOOLTIP = ("The LTX-2 (or LTX-2.3) video VAE: Load Checkpoint's VAE. With several GPUs its decoder's weights go "
               "to each worker once (about 1 GiB of host memory there for LTX-2, kept for later prompts).")


def _settings(fps, gpus, tile_size, overlap, temporal_size, temporal_overlap) -> video_save.Settings:
    return video_save.Settings(fps=fps, tile_size=tile_size, overlap=overlap, temporal_size=temporal_size,
                               temporal_overlap=temporal_overlap, gpus=gpus)


class LTXAVSaveVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTXAVSaveVideo",
            display_name="LTXAV Save Video",
            category=CATEGORY,
            description=("Decodes an LTX-2 video + audio latent and saves it as a video file in ComfyUI's output "
                         "folder, as VAE Decode (Tiled) -> LTXV Audio VAE Decode -> Create Video -> Save Video "
                         "would, but a few frames at a time: host memory stays under a few GiB at any length. "
                         "With several GPUs each Ray worker of the parallel sampler decodes and encodes a part."),
            search_aliases=["save video", "ltx decode", "vae decode video", "long video", "ltxav"],
            inputs=[
                io.Latent.Input("latent", tooltip=LATENT_TOOLTIP),
                io.Vae.Input("vae", tooltip=VAE_TOOLTIP),
                io.Vae.Input("audio_vae", optional=True,
                             tooltip=("The LTX-2 audio VAE (LTXV Audio VAE Loader); needed when the latent has "
                                      "audio. The audio is decoded as LTXV Audio VAE Decode does, in ComfyUI's "
                                      "process: memory for the waveform, about 0.2-0.4 MB a second.")),
                io.Latent.Input("audio_latent", optional=True,
                                tooltip=("LTXVSeparateAVLatent's audio output, when 'latent' is its video output "
                                         "(or to replace the latent's audio). Costs the audio decode's time, a "
                                         "few seconds.")),
                io.Float.Input("fps", default=25.0, min=1.0, max=120.0, step=1.0,
                               tooltip=("Frames per second, as Create Video's fps: the frame rate the clip was made "
                                        "with (LTXVConditioning's frame_rate), or sound and picture drift apart. "
                                        "No cost.")),
                io.String.Input("filename_prefix", default="video/LTXAV",
                                tooltip=("The file's prefix in ComfyUI's output folder, as Save Video's (formatting "
                                         "such as %date:yyyy-MM-dd% works). No cost.")),
                io.Combo.Input("format", options=Types.VideoContainer.as_input(), default="auto",
                               tooltip="The container, as Save Video's (mp4). No cost."),
                io.Combo.Input("codec", options=Types.VideoCodec.as_input(), default="auto",
                               tooltip=("The codec, as Save Video's (H.264 with the encoder's defaults). Encoding "
                                        "takes CPU time, overlapped with the decode.")),
                io.Int.Input("gpus", default=0, min=0, max=64,
                             tooltip=("GPUs to decode on. 0: the parallel sampler's workers while they run (none "
                                      "restart), else every GPU. 1 (or 0 on a machine with one GPU, or ComfyUI on "
                                      "--cpu with no workers): in ComfyUI's process. N: the parallel sampler's N "
                                      "Ray workers (started if there are none of that count: the next sampling run "
                                      "then starts its own again, a model load) each decode and encode one part of "
                                      "the frames, about 1/N of the time, and ComfyUI's process writes the parts in "
                                      "order. With --cpu: the number of CPU worker processes.")),
                *tile_inputs(),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, latent, vae, fps, filename_prefix, format, codec, gpus, tile_size=0, overlap=64,
                temporal_size=0, temporal_overlap=8, audio_vae=None, audio_latent=None) -> io.NodeOutput:
        import folder_paths
        from comfy.cli_args import args

        node = video_save.NODE
        if format not in (Types.VideoContainer.AUTO, Types.VideoContainer.MP4):
            raise ValueError(f"{node}: input 'format' is {format!r}; use 'auto' or 'mp4'.")
        if codec not in (Types.VideoCodec.AUTO, Types.VideoCodec.H264):
            raise ValueError(f"{node}: input 'codec' is {codec!r}; use 'auto' or 'h264'.")
        video, audio = video_save.clip_of(latent, audio_latent, node)
        width, height = video.shape[-1] * decode_plan.SPACE_SCALE, video.shape[-2] * decode_plan.SPACE_SCALE
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), width, height)
        file = f"{filename}_{counter:05}_.{Types.VideoContainer.get_extension(format)}"
        metadata = None
        hidden = cls.hidden  # set when ComfyUI runs the node (None when called directly)
        if not args.disable_metadata and hidden is not None:  # as Save Video
            metadata = {}
            if hidden.extra_pnginfo is not None:
                metadata.update(hidden.extra_pnginfo)
            if hidden.prompt is not None:
                metadata["prompt"] = hidden.prompt
            metadata = metadata or None
        settings = _settings(fps, gpus, tile_size, overlap, temporal_size, temporal_overlap)
        video_save.save(vae, audio_vae, video, audio, settings, os.path.join(folder, file), metadata, node)
        return io.NodeOutput(ui=ui.PreviewVideo([ui.SavedResult(file, subfolder, io.FolderType.output)]))


class LTXAVDecodeVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTXAVDecodeVideo",
            display_name="LTXAV Decode Video",
            category=CATEGORY,
            description=("Decodes an LTX-2 video latent to IMAGE frames, as VAE Decode (Tiled) does (its frames "
                         "exactly with the same tiles), a few frames at a time into the output: host memory is the "
                         "IMAGE itself, frames x width x height x 12 bytes (5,201 frames at 768x512: 22.9 GiB), "
                         "about a third of VAE Decode (Tiled)'s peak. To save a long clip, LTXAV Save Video needs "
                         "none of it."),
            search_aliases=["ltx decode", "vae decode video", "long video", "ltxav"],
            inputs=[
                io.Latent.Input("latent", tooltip=("The LTX-2 latent (video + audio, or video only; the audio is "
                                                   "not decoded here). Host memory: the IMAGE, frames x width x "
                                                   "height x 12 bytes; time grows with the frames.")),
                io.Vae.Input("vae", tooltip="The LTX-2 (or LTX-2.3) video VAE: Load Checkpoint's VAE. No extra cost."),
                *tile_inputs(),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, latent, vae, tile_size=0, overlap=64, temporal_size=0, temporal_overlap=8) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        video, _ = video_save.clip_of(latent, None, DECODE_NODE)
        settings = _settings(25.0, 1, tile_size, overlap, temporal_size, temporal_overlap)
        try:
            plan = video_save.plan_for(vae, video, settings)
        except ValueError as e:
            raise ValueError(f"{DECODE_NODE}: input 'vae' is {e}; connect the LTX-2 checkpoint's VAE (Load "
                             "Checkpoint) or use VAE Decode (Tiled) for other VAEs.") from None
        images = torch.empty((plan.frames, plan.height, plan.width, 3))  # float32, as VAE Decode (Tiled)'s
        pbar = comfy.utils.ProgressBar(plan.frames)
        done = 0
        with torch.inference_mode():
            video_save.load_vae_here(vae, plan)
            check = comfy.model_management.throw_exception_if_processing_interrupted
            for batch in video_decode.decode_chunks(vae, video, plan, as_uint8=False, check=check,
                                                    progress=lambda n: pbar.update_absolute(n, plan.frames)):
                images[done:done + batch.shape[0]] = batch
                done += batch.shape[0]
        return io.NodeOutput(images)


NODES = [LTXAVSaveVideo, LTXAVDecodeVideo]
