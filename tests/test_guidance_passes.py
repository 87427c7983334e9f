"""Guidance passes counted by a dry run of ComfyUI's own sampler and guider (guidance_passes): for each
sampler, guider and model option that changes the count (the cfg-1 shortcut and the *_cfg_pp samplers
that turn it off, DualCFGGuider, PerpNegGuider, LTXVReferenceAudio's identity pass, heun's two
evaluations a step, ComfyUI-LTXVideo's MultimodalGuider and its separate calls), the dry run's calls
equal those stock ComfyUI makes when it samples the tiny checkpoint in this process; the cfg-parallel
degree and the planner's share that follow from them. Against the workers: tests/test_cfg_parallel.py."""
import importlib
import math

import pytest
import torch

from helpers.comfy_host import make_conditioning, make_latent
from helpers.node_packs import LTXVIDEO, load_node_pack, not_installed
from helpers.sampler_cases import LATENT, conds, ltxv_sigmas, multimodal, reference_audio

NODE = "LTXAV Parallel Sampler"


@pytest.fixture(scope="module")
def gp(pack):
    return importlib.import_module("ltxav_pack.guidance_passes")


@pytest.fixture(scope="module")
def jobs(pack):
    return importlib.import_module("ltxav_pack.jobs")


@pytest.fixture(scope="module")
def mt(pack):
    return importlib.import_module("ltxav_pack.model_transfer")


class CountingStock:
    """Stock sampling with a CALC_COND_BATCH and a PREDICT_NOISE wrapper that record each call's passes
    and then run it: what ComfyUI really evaluates."""

    def __init__(self):
        self.evaluations = []

    def predict_noise(self, executor, *args, **kwargs):
        self.evaluations.append([])
        return executor(*args, **kwargs)

    def calc_cond_batch(self, executor, model, conds, *args, **kwargs):
        n = sum(c is not None for c in conds)
        if n:
            self.evaluations[-1].append(n)
        return executor(model, conds, *args, **kwargs)

    def run(self, job, patcher):
        """Sample ``job`` (a KSampler job on ``patcher``; a guider job on its guider's MODEL)."""
        import comfy.patcher_extension

        patcher = job.guider.model_patcher if hasattr(job, "guider") else patcher
        wrappers = comfy.patcher_extension.WrappersMP
        patcher.add_wrapper_with_key(wrappers.PREDICT_NOISE, "test_count", self.predict_noise)
        patcher.add_wrapper_with_key(wrappers.CALC_COND_BATCH, "test_count", self.calc_cond_batch)
        try:
            with torch.inference_mode():
                job.sample(patcher, None)
        finally:
            for kind in (wrappers.PREDICT_NOISE, wrappers.CALC_COND_BATCH):
                patcher.remove_wrappers_with_key(kind, "test_count")
        return tuple(tuple(ev) for ev in self.evaluations if ev)


def guider_job(jobs, model, cc, kind, sampler="euler", cfg=3.0, steps=2):
    """A SamplerCustomAdvanced job (as the pack's node builds it) with a stock or node-pack guider."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Guider_Basic, Guider_DualCFG, Noise_RandomNoise
    from comfy_extras.nodes_perpneg import Guider_PerpNeg

    pos, neg = conds(cc)
    if kind in ("cfg", "reference audio"):
        if kind == "reference audio":
            model, pos, neg = reference_audio(model, cc)
        g = comfy.samplers.CFGGuider(model)
        g.set_conds(pos, neg)
        g.set_cfg(cfg)
    elif kind.startswith("dual"):
        g = Guider_DualCFG(model)
        g.set_conds(pos, make_conditioning(cc, seed=3), neg)
        g.set_cfg(cfg, 1.0, nested=kind == "dual nested")  # regular: cfg 1 for cond2-negative drops the negative
    elif kind == "perpneg":
        g = Guider_PerpNeg(model)
        g.set_conds(pos, neg, make_conditioning(cc, seed=4))
        g.set_cfg(cfg, 1.0)
    elif kind == "basic":
        g = Guider_Basic(model)
        g.set_conds(pos)
    elif kind == "multimodal":
        g = multimodal(model, cc)
    elif kind == "multimodal cfg 1":
        g = multimodal(model, cc, video=(1.0, 0.0, 1.0), audio=(1.0, 0.0, 1.0))
    latent = make_latent(**LATENT)
    noise = Noise_RandomNoise(7)
    return jobs.GuiderJob(noise=noise.generate_noise(latent), latent=latent["samples"], noise_mask=None, seed=7,
                          guider=g, sampler=comfy.samplers.sampler_object(sampler),
                          sigmas=ltxv_sigmas(latent, steps=steps))


def ksampler_job(jobs, cc, cfg, sampler, steps=2):
    import comfy.sample

    latent = make_latent(**LATENT)
    pos, neg = conds(cc)
    return jobs.KSamplerJob(noise=comfy.sample.prepare_noise(latent["samples"], 7), latent=latent["samples"],
                            noise_mask=None, seed=7, steps=steps, cfg=cfg, sampler_name=sampler, scheduler="simple",
                            positive=pos, negative=neg)


CASES = [  # (id, builder(jobs, model, cc), the calls of each model evaluation)
    ("ksampler-cfg3-euler", lambda j, m, cc: ksampler_job(j, cc, 3.0, "euler"), ((2,),) * 2),
    ("ksampler-cfg1-euler", lambda j, m, cc: ksampler_job(j, cc, 1.0, "euler"), ((1,),) * 2),
    ("ksampler-cfg1-euler_cfg_pp", lambda j, m, cc: ksampler_job(j, cc, 1.0, "euler_cfg_pp"), ((2,),) * 2),
    ("cfg1-euler_ancestral_cfg_pp", lambda j, m, cc: guider_job(j, m, cc, "cfg", "euler_ancestral_cfg_pp", 1.0),
     ((2,),) * 2),
    ("cfg3-heun", lambda j, m, cc: guider_job(j, m, cc, "cfg", "heun", steps=2), ((2,),) * 3),  # last step: euler
    ("basic", lambda j, m, cc: guider_job(j, m, cc, "basic"), ((1,),) * 2),
    ("dual-regular", lambda j, m, cc: guider_job(j, m, cc, "dual"), ((2,),) * 2),
    ("dual-nested", lambda j, m, cc: guider_job(j, m, cc, "dual nested"), ((3,),) * 2),
    ("perpneg", lambda j, m, cc: guider_job(j, m, cc, "perpneg"), ((3,),) * 2),
    ("reference-audio-cfg1-cfg_pp", lambda j, m, cc: guider_job(j, m, cc, "reference audio", "euler_cfg_pp", 1.0),
     ((2, 1),) * 2),
    ("reference-audio-cfg1-euler", lambda j, m, cc: guider_job(j, m, cc, "reference audio", "euler", 1.0),
     ((1, 1),) * 2),
    ("multimodal", lambda j, m, cc: guider_job(j, m, cc, "multimodal"), ((1, 1, 1, 1),) * 2),
    ("multimodal-cfg1", lambda j, m, cc: guider_job(j, m, cc, "multimodal cfg 1"), ((1,),) * 2),
]


@pytest.mark.quick
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dry_run_counts_what_stock_comfyui_runs(gp, jobs, mt, comfy, tiny_ckpt, case):
    """The dry run's calls, evaluation by evaluation, are those of stock ComfyUI sampling the same job; the
    twin: the rule before the dry run (ComfyUI's CFGGuider rule, blind to the sampler, post-CFG functions
    and separate calls) differs from stock for the cases that made it wrong."""
    name, build, want = case
    if name.startswith("multimodal") and load_node_pack(LTXVIDEO) is None:
        pytest.skip(not_installed(LTXVIDEO))
    model = comfy.sd.load_diffusion_model(str(tiny_ckpt[0]))
    cc = tiny_ckpt[1]["caption_channels"]
    job = build(jobs, model, cc)
    patcher = getattr(job, "guider", None) and job.guider.model_patcher or model
    counted = gp.count(patcher, job, mt.dumps_job(job, patcher), NODE)
    assert counted.how == "dry run" and counted.evaluations == want, counted
    fresh = comfy.sd.load_diffusion_model(str(tiny_ckpt[0]))
    stock = CountingStock().run(build(jobs, fresh, cc), fresh)
    assert stock == want
    rule = gp.fallback(patcher, job, "the rule")  # the fallback: the count before the dry run
    wrong = name in ("ksampler-cfg1-euler_cfg_pp", "cfg1-euler_ancestral_cfg_pp", "cfg3-heun", "dual-regular",
                     "reference-audio-cfg1-cfg_pp", "reference-audio-cfg1-euler", "multimodal", "multimodal-cfg1")
    assert (rule.evaluations != stock) == wrong, rule


@pytest.mark.quick
def test_dry_run_runs_no_forward_and_leaves_the_job_alone(gp, jobs, mt, comfy, tiny_ckpt, monkeypatch):
    """The dry run never calls the model (its stand-in has no forward), nor ComfyUI's model loading, and
    the job it counts (the MultimodalGuider's step counter, the guider's conds) is a copy: the job itself
    samples afterwards as it would have."""
    if load_node_pack(LTXVIDEO) is None:
        pytest.skip(not_installed(LTXVIDEO))
    import comfy.model_management

    model = comfy.sd.load_diffusion_model(str(tiny_ckpt[0]))
    cc = tiny_ckpt[1]["caption_channels"]
    job = guider_job(jobs, model, cc, "multimodal")
    patcher = job.guider.model_patcher

    def no(*args, **kwargs):
        raise AssertionError("the dry run ran the model or loaded it")

    with monkeypatch.context() as m:
        m.setattr(type(patcher.model.diffusion_model), "forward", no)
        m.setattr(comfy.model_management, "load_models_gpu", no)
        counted = gp.count(patcher, job, mt.dumps_job(job, patcher), NODE)
    assert counted.evaluations == ((1, 1, 1, 1),) * 2 and counted.guider == "MultimodalGuider"
    assert job.guider.current_step == 0 and not hasattr(job.guider, "conds")
    assert CountingStock().run(job, patcher) == counted.evaluations


@pytest.mark.quick
def test_a_guider_that_runs_the_model_itself_falls_back_to_the_rule(gp, jobs, mt, comfy, tiny_ckpt, caplog):
    """A guider that calls the model outside calc_cond_batch cannot be counted by the dry run: the count
    falls back to ComfyUI's CFGGuider rule, and the log says so."""
    import comfy.samplers

    class DirectGuider(comfy.samplers.CFGGuider):
        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 - ComfyUI's signature
            return self.inner_model.apply_model(x, timestep, **self.conds["positive"][0]["model_conds"])

    model = comfy.sd.load_diffusion_model(str(tiny_ckpt[0]))
    cc = tiny_ckpt[1]["caption_channels"]
    job = guider_job(jobs, model, cc, "cfg")
    job.guider.__class__ = DirectGuider
    counted = gp.count(model, job, mt.dumps_job(job, model), NODE)
    assert counted.how.startswith("_Uncountable: the guider runs the model outside calc_cond_batch")
    assert counted.evaluations == ((2,),) * 2  # the rule: one pass per conditioning the guider holds
    assert "could not count the guidance passes by a dry run of the sampler" in caplog.text


# -- what follows from the count: the degree and the planner's share (no workers) ------------------

@pytest.mark.quick
@pytest.mark.parametrize("calls,mode,world,want,note", [
    ((2,), "auto", 2, 2, ""),  # the LTX-2.3 templates: cfg 1 with *_cfg_pp samplers
    ((2,), "auto", 4, 2, ""),
    ((2, 1), "auto", 2, 1, r"1 of the 3 passes a step comes in a call of its own \(CFGGuider or a post-CFG function "
                           r"calls the model again\), which every cfg group would run whole: each pass is split over "
                           r"all 2 GPUs instead"),
    ((2, 1), "on", 2, 2, r"each group also runs 1 pass a step that another group runs too \(1 a step comes in a call "
                         r"of one pass, which every group runs whole\)"),
    ((2, 1), "on", 4, 2, r"each group also runs 1 pass a step"),
    ((1, 1, 1, 1), "auto", 2, 1, r"MultimodalGuider makes its 4 passes a step in separate calls of one pass each, and "
                                 r"cfg-parallel shares the passes of one call: each group would run every pass whole"),
    ((1, 1, 1, 1), "on", 4, 1, r"MultimodalGuider makes its 4 passes a step in separate calls"),
    ((3,), "on", 2, 2, r"each group also runs 1 pass a step that another group runs too \(3 passes do not split "
                       r"evenly over 2 groups\)"),
])
def test_degree_follows_the_calls(gp, pack, calls, mode, world, want, note):
    import re

    cfgp = importlib.import_module("ltxav_pack.cfg_parallel")
    guider = "MultimodalGuider" if calls == (1, 1, 1, 1) else "CFGGuider"
    passes = gp.Passes.uniform(calls, steps=3, guider=guider)
    degree, why = cfgp.choose_degree(mode, passes, world, 0, 1, 12, NODE)
    assert degree == want and (re.search(note, why) if note else why == ""), why


@pytest.mark.quick
def test_passes_per_worker_and_share(gp, pack):
    groups = importlib.import_module("ltxav_pack.sequence_parallel.groups")
    id_lora = gp.Passes.uniform((2, 1), steps=8)
    assert id_lora.per_step == 3 and id_lora.describe() == "3 guidance passes a step (calls of 2 + 1)"
    assert id_lora.per_worker(groups.Degrees(2)) == [24, 24]  # sequence parallel: every pass on every rank
    assert id_lora.per_worker(groups.Degrees(1, 1, 2)) == [16, 16]  # the pair split, the identity pass whole
    assert id_lora.per_worker(groups.Degrees(2, 1, 2)) == [16, 16, 16, 16]
    assert (id_lora.largest_share(1), id_lora.largest_share(2)) == (2, 1)
    dual = gp.Passes.uniform((3,), steps=2)
    assert dual.per_worker(groups.Degrees(1, 1, 2)) == [4, 2] and dual.largest_share(2) == 2
    varying = gp.Passes(((2, 1), (2,)), "CFGGuider")
    assert varying.describe() == "3 guidance passes a step (its calls change from step to step)"
    assert math.isclose(varying.per_step, 3)


@pytest.mark.quick
def test_planner_holds_the_largest_calls_share(ps, gp, tiny_model):
    """ID-LoRA's passes (a call of 2, then one of 1): sequence parallel batches the pair into one forward;
    with cfg 2 each group's forward holds one pass, like a plain cfg-1 job's."""
    groups = importlib.import_module("ltxav_pack.sequence_parallel.groups")
    latent = make_latent(**LATENT)["samples"]
    big = 10**12
    id_lora = gp.Passes.uniform((2, 1), steps=2)
    sp = ps.plan.check_memory(tiny_model, latent, groups.Degrees(2), big, passes=id_lora)
    assert sp.parts == ps.plan.check_memory(tiny_model, latent, groups.Degrees(2), big, passes=2).parts
    assert "3 guidance passes a step (calls of 2 + 1), 2 in each worker's forward" in sp.note
    split = ps.plan.check_memory(tiny_model, latent, groups.Degrees(1, 1, 2), big, passes=id_lora)
    assert split.parts == ps.plan.check_memory(tiny_model, latent, groups.Degrees(1), big, passes=1).parts
    assert "1 in each worker's forward" in split.note
