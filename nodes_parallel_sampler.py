"""Sampler nodes that run LTXAV sampling on several GPUs (Ray workers, sequence parallel)."""
from __future__ import annotations

import comfy.nested_tensor
import comfy.sample
import comfy.samplers
import comfy.utils
from comfy_api.latest import io, ui

from . import models, ray_join
from .cfg_parallel import MODES as CFG_PARALLEL_MODES
from .driver import NODE, POOL, ParallelSettings
from .errors import user_facing
from .jobs import GuiderJob, KSamplerJob
from .nodes_ltx_ffn_chunker import CATEGORY

# cost sentences that the two sampler nodes' tooltips share
WORKERS_COST = ("Each worker manages the weights as ComfyUI does: with DynamicVRAM (ComfyUI's default on NVIDIA) "
                "they stay in host memory and only what fits beside the video's activations sits on the GPU; "
                "otherwise each worker holds a full copy (GPU memory: weights + its 1/gpus share of the video). "
                "The first prompt starts the workers (~15-25 s) and loads the model on each; later prompts reuse "
                "them. Another file or dtype reads the file again; a LoRA or strength change is applied to the "
                "loaded weights without reading it; gpus/degrees changes restart the workers.")
SEED_COST = "Costs nothing; a new seed reuses the loaded workers."
SAMPLER_COST = ("Samplers that run the model more than once per step (heun, dpm_2, dpmpp_sde, ...) take that many "
                "times longer per step; memory is about the same.")
LATENT_COST = ("Its size sets the cost: memory per worker grows linearly with frames x width x height, time per "
               "step a bit faster (attention is quadratic). A video whose predicted per-worker peak exceeds the "
               "GPU's memory is refused before sampling, naming the longest length that fits.")


def parallel_inputs():
    """The inputs both sampler nodes share: how many GPUs and how to split attention over them."""
    return [
        io.Int.Input("gpus", default=0, min=0, max=64,
                     tooltip=("GPUs to split the video over, one Ray worker each (0 = all the Ray cluster has). "
                              "Per-GPU memory for the video falls about as 1/gpus; each worker streams the "
                              "weights from host memory as ComfyUI does (DynamicVRAM) or holds a full copy. With "
                              "ComfyUI on --cpu: the number of CPU worker processes.")),
        io.Int.Input("ulysses_degree", default=0, min=0, max=64,
                     tooltip=("GPUs that split attention heads with all-to-all (Ulysses); 0 = gpus / ring_degree. "
                              f"Must divide the model's attention heads: {models.heads_note()}. The fastest and "
                              "leanest choice: keep ring at 1 when it divides.")),
        io.Int.Input("ring_degree", default=1, min=1, max=64,
                     tooltip=("GPUs that pass key/value blocks around a ring; ulysses x ring = gpus. Use it only "
                              "when the GPU count does not divide the model's heads (e.g. 3 or 6 GPUs): slower and "
                              "more memory than Ulysses.")),
        io.String.Input("ray_address", default="local",
                        tooltip=("'local': a private Ray cluster on this machine (127.0.0.1, no dashboard, nothing "
                                 "listens beyond loopback), started on first use (a few seconds) and kept for later "
                                 "prompts. 'auto': the cluster "
                                 "`ray start` runs here. host:port: a Ray head elsewhere; its nodes need this "
                                 "ComfyUI, this pack and the model files at the same paths: each worker gets the "
                                 "model's load recipe and patches (LoRAs), not its weights, and loads the "
                                 "checkpoint from its own disk; Ray's ports and the workers' process-group store then "
                                 "listen on the nodes' network addresses (protect them: Ray token auth, a firewall; "
                                 "see docs/cluster.md). Changing it after the first prompt needs a ComfyUI restart "
                                 "(Ray cannot move a running process to another cluster).")),
        io.Combo.Input("cfg_parallel", options=list(CFG_PARALLEL_MODES), default="auto", optional=True,
                       tooltip=("CFG-parallel: run a step's guidance passes (positive and negative at cfg other than "
                                "1; three with DualCFGGuider or PerpNegGuider) on separate groups of GPUs instead of "
                                "splitting every pass over all of them: gpus = cfg groups x ulysses x ring. Faster "
                                "(the groups exchange only the outputs, once a step); each GPU holds the whole video "
                                "of its passes instead of a 1/gpus share of each. auto: on when the passes divide "
                                "evenly over the groups and the GPU count allows, and off for a video that fits only "
                                "with every pass split over all GPUs (long clips, whose passes ComfyUI runs one after "
                                "the other); on: also an uneven share (3 passes on 2 groups); off: sequence parallel "
                                "only. At cfg 1 ComfyUI runs one pass, unless the sampler turns that shortcut off "
                                "(*_cfg_pp samplers: two); a pass a guider makes in a call of its own "
                                "(LTXVReferenceAudio, MultimodalGuider) runs whole on every group.")),
    ]


def _settings(gpus, ulysses_degree, ring_degree, ray_address, cfg_parallel_mode="auto"):
    return ParallelSettings(gpus, ulysses_degree, ring_degree, ray_address, cfg_parallel_mode)


def _noise_mask(latent):
    return latent.get("noise_mask")


def validate_address(ray_address) -> bool | str:
    """Queue-time check of input 'ray_address' (no traceback, the node marked in the UI): 'local', 'auto'
    or host:port. A linked input (None here) is checked when the node runs."""
    if ray_address is None or ray_address.strip() in ("local", "auto"):
        return True
    try:
        ray_join.target(ray_address.strip(), NODE)
    except ValueError as e:
        return str(e)
    return True


class LTXAVParallelKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTXAVParallelKSampler",
            display_name="LTXAV Parallel KSampler",
            category=CATEGORY,
            description=("KSampler for LTX-2 audio-video that splits the video over several GPUs (Ray workers, "
                         "xDiT sequence parallelism). Same result as KSampler on one GPU; each GPU holds 1/gpus of "
                         "the video's activations."),
            search_aliases=["multi gpu ksampler", "ltx parallel", "sequence parallel", "xdit", "ray"],
            inputs=[
                io.Model.Input("model", tooltip="An LTX-2 audio-video MODEL from 'Load Diffusion Model', 'Load "
                               "Checkpoint' or ComfyUI-GGUF's 'Unet Loader (GGUF)', after LoRA loaders, the LTX FFN "
                               "Chunker and other model patches: the workers rebuild it from the same file and "
                               "apply the same patches. " + WORKERS_COST),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The noise seed, as in KSampler. " + SEED_COST),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps; time grows linearly."),
                io.Float.Input("cfg", default=3.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale; other than 1, each step runs the model "
                                       "on positive and negative: twice the time, unless cfg_parallel puts the two "
                                       "passes on separate GPUs."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               tooltip="The sampling algorithm, as in KSampler. " + SAMPLER_COST),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                               tooltip="The noise schedule, as in KSampler. No cost: it only spaces the steps' "
                                       "noise levels."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning (LTXVConditioning, guides...). "
                                      "The prompt's length costs almost nothing; guide frames (LTXVAddGuide) are "
                                      "added to the latent and cost memory and time like video frames."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning, used when cfg is not 1: then every "
                                      "step also runs the model on it (twice the time). Its length costs almost "
                                      "nothing."),
                io.Latent.Input("latent_image", tooltip="The LTXAV latent (video + audio from LTXVConcatAVLatent, "
                                "or video only). " + LATENT_COST),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of the schedule to run, as in KSampler (below 1: start from a less "
                                       "noisy level, for img2img-style edits). No cost: it still runs 'steps' "
                                       "steps."),
                *parallel_inputs(),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def validate_inputs(cls, ray_address=None):
        return validate_address(ray_address)

    @classmethod
    @user_facing((NODE,))
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                gpus, ulysses_degree, ring_degree, ray_address, cfg_parallel="auto") -> io.NodeOutput:
        latent = latent_image
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"],
                                                         latent.get("downscale_ratio_spacial", None))
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
        job = KSamplerJob(noise=noise, latent=samples, noise_mask=_noise_mask(latent), seed=seed, steps=steps, cfg=cfg,
                          sampler_name=sampler_name, scheduler=scheduler, positive=positive, negative=negative,
                          denoise=denoise)
        result = POOL.run(model, job, _settings(gpus, ulysses_degree, ring_degree, ray_address, cfg_parallel))
        out = latent.copy()
        out.pop("downscale_ratio_spacial", None)
        out["samples"] = result.samples
        return io.NodeOutput(out, ui=ui.PreviewText(result.summary))


class LTXAVParallelSamplerCustomAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTXAVParallelSamplerCustomAdvanced",
            display_name="LTXAV Parallel SamplerCustomAdvanced",
            category=CATEGORY,
            description=("SamplerCustomAdvanced for LTX-2 audio-video over several GPUs (Ray workers, xDiT "
                         "sequence parallelism): takes the same NOISE, GUIDER (CFG, dual CFG, ...), SAMPLER and "
                         "SIGMAS (LTXV scheduler or manual) as the stock node."),
            search_aliases=["multi gpu sampler", "ltx parallel", "sequence parallel", "xdit", "ray"],
            inputs=[
                io.Noise.Input("noise",
                               tooltip="RandomNoise or DisableNoise, as in SamplerCustomAdvanced. " + SEED_COST),
                io.Guider.Input("guider", tooltip="A guider (CFGGuider, DualCFGGuider, BasicGuider...) built on an "
                                "LTX-2 audio-video MODEL; the workers rebuild its model and use its conditioning. "
                                + WORKERS_COST + " CFG guiders with cfg other than 1 run the model on positive and "
                                "negative: twice the time per step."),
                io.Sampler.Input("sampler", tooltip="KSamplerSelect or another SAMPLER. " + SAMPLER_COST),
                io.Sigmas.Input("sigmas", tooltip="LTXVScheduler, BasicScheduler or manual sigmas; steps = "
                                "len(sigmas) - 1, and time grows linearly with steps. No memory cost."),
                io.Latent.Input("latent_image", tooltip="The LTXAV latent (video + audio, or video only). "
                                + LATENT_COST),
                *parallel_inputs(),
            ],
            outputs=[io.Latent.Output(display_name="output"), io.Latent.Output(display_name="denoised_output")],
        )

    @classmethod
    def validate_inputs(cls, ray_address=None):
        return validate_address(ray_address)

    @classmethod
    @user_facing((NODE,))
    def execute(cls, noise, guider, sampler, sigmas, latent_image, gpus, ulysses_degree, ring_degree,
                ray_address, cfg_parallel="auto") -> io.NodeOutput:
        patcher = guider.model_patcher
        latent = latent_image.copy()
        latent["samples"] = comfy.sample.fix_empty_latent_channels(patcher, latent["samples"],
                                                                   latent.get("downscale_ratio_spacial", None))
        job = GuiderJob(noise=noise.generate_noise(latent), latent=latent["samples"], noise_mask=_noise_mask(latent),
                        seed=noise.seed, guider=guider, sampler=sampler, sigmas=sigmas)
        result = POOL.run(patcher, job, _settings(gpus, ulysses_degree, ring_degree, ray_address, cfg_parallel))
        samples = result.samples
        out = latent.copy()
        out.pop("downscale_ratio_spacial", None)
        out["samples"] = samples
        denoised = out
        if result.x0 is not None:
            x0 = patcher.model.process_latent_out(result.x0)
            if samples.is_nested:
                shapes = [t.shape for t in samples.unbind()]
                x0 = comfy.nested_tensor.NestedTensor(comfy.utils.unpack_latents(x0, shapes))
            denoised = {**out, "samples": x0}
        return io.NodeOutput(out, denoised, ui=ui.PreviewText(result.summary))


NODES = [LTXAVParallelKSampler, LTXAVParallelSamplerCustomAdvanced]
