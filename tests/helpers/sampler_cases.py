"""The parallel sampler nodes against the stock samplers on the same tiny checkpoint, seed and inputs
(the Ray tests): stock KSampler / SamplerCustomAdvanced runs, the pack's node calls, worker infos."""
from .comfy_host import make_conditioning, make_latent
from .numerics import assert_matches

LATENT = dict(width=128, height=96, length=25)


def conds(cc):
    """Positive and negative conditioning of width ``cc``."""
    return make_conditioning(cc, seed=1), make_conditioning(cc, seed=2)


def stock_ksampler(model, cc, steps=3, latent=None, cfg=3.0, swap=False, sampler="euler", **kw):
    """Stock KSampler; ``swap``: positive and negative exchanged (what a pass mix-up would return)."""
    import nodes

    pos, neg = conds(cc)
    if swap:
        pos, neg = neg, pos
    return nodes.common_ksampler(model, 42, steps, cfg, sampler, "simple", pos, neg, latent or make_latent(**LATENT),
                                 **kw)[0]


def parallel_ksampler(nodes_mod, model, cc, steps=3, latent=None, gpus=2, ulysses=0, ring=1, address="local",
                      cfg=3.0, cfg_parallel="off", sampler="euler"):
    """The pack's LTXAV Parallel KSampler with KSampler's settings of ``stock_ksampler``: (LATENT, ui)."""
    pos, neg = conds(cc)
    out = nodes_mod.LTXAVParallelKSampler.execute(model, 42, steps, cfg, sampler, "simple", pos, neg,
                                                  latent or make_latent(**LATENT), 1.0, gpus, ulysses, ring, address,
                                                  cfg_parallel)
    return out.args[0], out.ui


def guider(kind, model, cc, cfg=3.0):
    """A stock guider on ``model``: ``cfg`` (CFGGuider), ``dual`` (DualCFGGuider: negative, middle and
    positive, three passes), ``basic`` (BasicGuider, one pass), ``reference audio`` (CFGGuider on
    LTXVReferenceAudio's MODEL and conditioning: one more pass a step, in a call of its own) or
    ``multimodal`` (ComfyUI-LTXVideo's MultimodalGuider: four passes a step, each in a call of its own)."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Guider_Basic, Guider_DualCFG

    pos, neg = conds(cc)
    if kind == "reference audio":
        model, pos, neg = reference_audio(model, cc)
    if kind.startswith("multimodal"):  # "multimodal unperturbed": STG on no block, its pass is the positive
        return multimodal(model, cc, video=(cfg, 1.0, 2.0), audio=(cfg, 1.0, 2.0),
                          skip_blocks="" if kind.endswith("unperturbed") else "1")
    if kind in ("cfg", "reference audio"):
        g = comfy.samplers.CFGGuider(model)
        g.set_conds(pos, neg)
        g.set_cfg(cfg)
    elif kind == "dual":
        g = Guider_DualCFG(model)
        g.set_conds(pos, make_conditioning(cc, seed=3), neg)
        g.set_cfg(cfg, 2.0)
    else:
        g = Guider_Basic(model)
        g.set_conds(pos)
    return g


def reference_audio(model, cc):
    """LTXVReferenceAudio on ``model`` (its identity guidance: a post-CFG function that calls
    calc_cond_batch again without the reference), with a stand-in for the audio VAE's encoder: (MODEL,
    positive, negative)."""
    import torch
    from comfy_extras.nodes_lt import LTXVReferenceAudio

    class AudioVAE:
        audio_sample_rate = 16000

        def encode(self, waveform):  # [B, samples, channels] -> latents [B, 8, T, 16]
            return torch.randn(1, 8, 5, 16, generator=torch.Generator().manual_seed(3))

    pos, neg = conds(cc)
    audio = {"waveform": torch.zeros(1, 1, 16000), "sample_rate": 16000}
    return LTXVReferenceAudio.execute(model, pos, neg, audio, AudioVAE(), 3.0, 0.0, 1.0).args


def multimodal(model, cc, video=(3.0, 1.0, 2.0), audio=(3.0, 1.0, 2.0), skip_blocks="1"):
    """ComfyUI-LTXVideo's MultimodalGuider node: per modality (cfg, stg, modality_scale)."""
    import nodes

    from .node_packs import LTXVIDEO, load_node_pack

    load_node_pack(LTXVIDEO)
    node_classes = nodes.NODE_CLASS_MAPPINGS
    params = None
    for modality, (cfg, stg, modality_scale) in (("VIDEO", video), ("AUDIO", audio)):
        params = node_classes["GuiderParameters"]().get_parameters(modality, cfg, stg, True, 0.0, modality_scale, 0,
                                                                  True, params)[0]
    pos, neg = conds(cc)
    return node_classes["MultimodalGuider"]().get_guider(model, pos, neg, params, skip_blocks)[0]


def ltxv_sigmas(latent, steps=4):
    from comfy_extras.nodes_lt import LTXVScheduler

    return LTXVScheduler.execute(steps, 2.05, 0.95, True, 0.1, latent)[0]


def stock_custom_advanced(kind, model, cc, latent, sigmas, seed=5, cfg=3.0, sampler="euler"):
    """Stock SamplerCustomAdvanced with a ``guider(kind, ...)``: (output, denoised_output)."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    out = SamplerCustomAdvanced.execute(Noise_RandomNoise(seed), guider(kind, model, cc, cfg),
                                        comfy.samplers.sampler_object(sampler), sigmas, latent)
    return out.args[0], out.args[1]


def parallel_custom_advanced(nodes_mod, kind, model, cc, latent, sigmas, gpus=2, ulysses=0, ring=1,
                             cfg_parallel="off", seed=5, cfg=3.0, sampler="euler"):
    """The pack's LTXAV Parallel SamplerCustomAdvanced with the same inputs: (output, denoised, ui)."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

    out = nodes_mod.LTXAVParallelSamplerCustomAdvanced.execute(
        Noise_RandomNoise(seed), guider(kind, model, cc, cfg), comfy.samplers.sampler_object(sampler), sigmas, latent,
        gpus, ulysses, ring, "local", cfg_parallel)
    return out.args[0], out.args[1], out.ui


def worker_infos(ps):
    import ray

    return ray.get([a.info.remote() for a in ps.POOL.group.actors])


def assert_equals_stock(got, model, model_f64, cc, **kw):
    """``got`` against the stock KSampler on ``model`` (float32) and on its float64 twin (numerics)."""
    assert_matches(got, stock_ksampler(model, cc, **kw), stock_ksampler(model_f64, cc, **kw))
