"""CFG-parallel: the guidance passes of each step on separate groups of Ray workers (CPU, gloo), alone
and combined with Ulysses and ring, against the stock samplers on the same tiny checkpoint; the
degree choice, the pass counts, the planner's share of the batch, regrouping, interrupt."""
import importlib
import re

import pytest

from helpers.comfy_host import make_latent
from helpers.numerics import assert_matches, mismatches
from helpers.sampler_cases import (
    LATENT,
    assert_equals_stock,
    ltxv_sigmas,
    parallel_custom_advanced,
    parallel_ksampler,
    stock_custom_advanced,
    stock_ksampler,
    worker_infos,
)

NODE = "LTXAV Parallel Sampler"


pytestmark = pytest.mark.usefixtures("ray_stopped_after_module")


@pytest.fixture(scope="module")
def cfgp(pack):
    return importlib.import_module("ltxav_pack.cfg_parallel")


@pytest.fixture(scope="module")
def gp(pack):
    return importlib.import_module("ltxav_pack.guidance_passes")


def worker_passes(ui) -> list[int]:
    """The model passes each worker evaluated, from the node's summary."""
    return [int(n) for n in re.findall(r"; (\d+) model passes", ui.value)]


# -- the degree and the shares (no workers) ---------------------------------------------------

@pytest.mark.quick
def test_shares(cfgp):
    assert cfgp.shares([0, 1], 2) == [[0], [1]]
    assert cfgp.shares([0, 1, 2], 2) == [[0, 1], [2]]
    assert cfgp.shares([0, 1, 2], 3) == [[0], [1], [2]]
    assert cfgp.shares([0, 2], 3) == [[0], [2], []]


@pytest.mark.quick
@pytest.mark.parametrize("mode,passes,world,ulysses,ring,want", [
    ("auto", 2, 2, 0, 1, 2),  # CFG on 2 GPUs: one pass a GPU
    ("auto", 2, 4, 0, 1, 2),  # cfg 2 x Ulysses 2
    ("auto", 2, 4, 1, 2, 2),  # cfg 2 x ring 2
    ("auto", 2, 4, 2, 1, 2),  # the user's Ulysses degree is what is left
    ("auto", 2, 4, 4, 1, 1),  # ... or it takes every GPU: sequence parallel only
    ("auto", 2, 3, 0, 1, 1),  # 2 passes do not divide 3 GPUs
    ("auto", 3, 3, 0, 1, 3),  # DualCFG / PerpNeg on 3 GPUs
    ("auto", 3, 2, 0, 1, 1),  # 3 passes on 2 groups would be uneven
    ("on", 3, 2, 0, 1, 2),  # ... which 'on' allows
    ("on", 3, 4, 0, 1, 2),
    ("on", 1, 2, 0, 1, 1),  # cfg 1: one pass, nothing to split
    ("auto", 2, 1, 0, 1, 1),
    ("off", 2, 2, 0, 1, 1),
])
def test_choose_degree(cfgp, gp, mode, passes, world, ulysses, ring, want):
    assert cfgp.choose_degree(mode, gp.Passes.of(passes), world, ulysses, ring, 12, NODE)[0] == want


@pytest.mark.quick
@pytest.mark.parametrize("mode,passes,world,ulysses,msg", [
    ("on", 2, 3, 0, r"input 'cfg_parallel' is 'on', but the 2 guidance passes a step cannot be split over gpus=3 "
                    r"with ulysses_degree=0 and ring_degree=1: use an even gpus count with ulysses_degree 0, or set "
                    r"cfg_parallel to 'auto' or 'off'"),
    ("on", 2, 4, 4, r"input .* cannot be split over gpus=4 with ulysses_degree=4"),
    ("sideways", 2, 2, 0, r"input 'cfg_parallel' is 'sideways'; use one of auto, on, off"),
])
def test_bad_cfg_parallel_settings(cfgp, gp, mode, passes, world, ulysses, msg):
    with pytest.raises(ValueError, match=f"{NODE}: {msg}"):
        cfgp.choose_degree(mode, gp.Passes.of(passes), world, ulysses, 1, 12, NODE)


def test_planner_counts_each_workers_share_of_the_passes(ps, tiny_model, monkeypatch):
    """Where ComfyUI batches a step's passes into one forward, a worker holds both at cfg other than 1,
    unless CFG-parallel gives each group its own; the refusal names the degrees and the share."""
    groups = importlib.import_module("ltxav_pack.sequence_parallel.groups")
    latent = make_latent(**LATENT)["samples"]
    big = 10**12
    one = ps.plan.check_memory(tiny_model, latent, groups.Degrees(2), big, passes=1)
    two = ps.plan.check_memory(tiny_model, latent, groups.Degrees(2), big, passes=2)
    split = ps.plan.check_memory(tiny_model, latent, groups.Degrees(1, 1, 2), big, passes=2)
    uneven = ps.plan.check_memory(tiny_model, latent, groups.Degrees(1, 1, 2), big, passes=3)
    alone = ps.plan.check_memory(tiny_model, latent, groups.Degrees(1), big, passes=1)
    assert two.parts["video tokens"] == 2 * one.parts["video tokens"]
    assert split.parts["video tokens"] == alone.parts["video tokens"]  # one pass of the whole video a worker
    assert uneven.parts["video tokens"] == 2 * alone.parts["video tokens"]  # the larger share: 2 of 3
    monkeypatch.setattr(tiny_model.model, "memory_required", lambda shape, cond_shapes=None: 0)  # batching fits
    with pytest.raises(ValueError, match=r"needs about .* GiB per worker \(cfg 2 x Ulysses 1 x ring 1; 3 guidance "
                                         r"passes a step, 2 in each worker's forward: weights"):
        ps.plan.check_memory(tiny_model, latent, groups.Degrees(1, 1, 2), uneven.total - 1, passes=3)


def test_planner_batches_passes_as_comfyui_does(ps, tiny_model, monkeypatch):
    """ComfyUI batches the passes only when its own estimate for the batch (BaseModel.memory_required,
    times 1.5) is below the free memory; otherwise it runs them one after the other, and so does the plan."""
    groups = importlib.import_module("ltxav_pack.sequence_parallel.groups")
    latent = make_latent(**LATENT)["samples"]
    budget = 10**12
    asked = []

    def memory_required(shape, cond_shapes=None):  # 2 passes in one forward: over the budget, 1: well under
        asked.append(list(shape))
        return budget if shape[0] > 1 else 1

    one = ps.plan.check_memory(tiny_model, latent, groups.Degrees(2), budget, passes=1)
    monkeypatch.setattr(tiny_model.model, "memory_required", memory_required)
    two = ps.plan.check_memory(tiny_model, latent, groups.Degrees(2), budget, passes=2)
    assert two.parts == one.parts and "2 guidance passes a step, 1 in each worker's forward" in two.note
    elements = 128 * 4 * 3 * 4 + 8 * 26 * 16  # the video and audio latents as ComfyUI packs them
    assert asked == [[2, 1, elements], [1, 1, elements]]


# -- Ray workers against stock ------------------------------------------------------------------

def test_two_workers_one_pass_each_equal_stock(ps, nodes_mod, tiny_model, tiny_model_f64, tiny_ckpt):
    """KSampler at cfg 3 on 2 workers, cfg_parallel auto: cfg 2 x Ulysses 1, each worker runs one of the
    two passes a step (3 of the 6), and the result equals stock's. The twin: positive and negative
    exchanged (what assembling the gathered passes in the wrong order returns) fails the check."""
    cc = tiny_ckpt[1]["caption_channels"]
    want, reference = stock_ksampler(tiny_model, cc), stock_ksampler(tiny_model_f64, cc)
    got, ui = parallel_ksampler(nodes_mod, tiny_model, cc, cfg_parallel="auto")
    assert f"{NODE}: 2 workers, cfg 2 x Ulysses 1 x ring 1" in ui.value
    assert worker_passes(ui) == [3, 3]
    assert_matches(got, want, reference)
    assert mismatches(stock_ksampler(tiny_model, cc, swap=True), want, reference)


def test_cfg_1_with_a_cfg_pp_sampler_runs_two_passes_one_per_worker(ps, nodes_mod, tiny_model, tiny_model_f64,
                                                                     tiny_ckpt, caplog_info):
    """The LTX-2.3 templates' setting: cfg 1 with a *_cfg_pp sampler, which turns ComfyUI's cfg-1 shortcut
    off: two passes a step, so auto runs them on the two workers, one each; the counted passes are those
    the workers ran, and the result equals stock's. The twin: the cfg-1 shortcut's result (what workers
    that skipped the negative would return) fails the check."""
    cc = tiny_ckpt[1]["caption_channels"]
    want, reference = (stock_ksampler(m, cc, cfg=1.0, sampler="euler_cfg_pp") for m in (tiny_model, tiny_model_f64))
    got, ui = parallel_ksampler(nodes_mod, tiny_model, cc, cfg=1.0, sampler="euler_cfg_pp", cfg_parallel="auto")
    assert f"{NODE}: 2 workers, cfg 2 x Ulysses 1 x ring 1; 2 guidance passes a step" in ui.value
    assert worker_passes(ui) == [3, 3] and "were counted" not in caplog_info.text
    assert_matches(got, want, reference)
    assert mismatches(stock_ksampler(tiny_model, cc, cfg=1.0, sampler="euler"), want, reference)


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_identity_pass_in_a_call_of_its_own(ps, nodes_mod, tiny_model, tiny_model_f64, tiny_ckpt, caplog_info, mode):
    """LTXVReferenceAudio (the ID-LoRA template) adds a pass a step in a call of its own, after the
    positive/negative pair: auto keeps sequence parallel on 2 workers (cfg groups would both run it) and
    says why; 'on' splits the pair and runs the identity pass on both. Both equal stock; the workers ran
    the counted passes."""
    cc = tiny_ckpt[1]["caption_channels"]
    latent = make_latent(**LATENT)
    sigmas = ltxv_sigmas(latent, steps=3)
    kw = dict(cfg=1.0, sampler="euler_cfg_pp")
    want = stock_custom_advanced("reference audio", tiny_model, cc, latent, sigmas, **kw)
    reference = stock_custom_advanced("reference audio", tiny_model_f64, cc, latent, sigmas, **kw)
    assert mismatches(stock_custom_advanced("cfg", tiny_model, cc, latent, sigmas, **kw)[0], want[0], reference[0])
    *got, ui = parallel_custom_advanced(nodes_mod, "reference audio", tiny_model, cc, latent, sigmas,
                                        cfg_parallel=mode, **kw)
    label, passes = {"auto": ("Ulysses 2 x ring 1", [9, 9]), "on": ("cfg 2 x Ulysses 1 x ring 1", [6, 6])}[mode]
    assert f"{NODE}: 2 workers, {label}; 3 guidance passes a step (calls of 2 + 1)" in ui.value, ui.value
    assert worker_passes(ui) == passes and "were counted" not in caplog_info.text
    why = {"auto": f"{NODE}: cfg-parallel not used (1 of the 3 passes a step comes in a call of its own",
           "on": f"{NODE}: cfg-parallel 2: each group also runs 1 pass a step that another group runs too"}[mode]
    assert why in caplog_info.text
    assert_matches(got[0], want[0], reference[0], f"{mode} output")
    assert_matches(got[1], want[1], reference[1], f"{mode} denoised_output")


def test_a_count_the_workers_did_not_run_is_logged(ps, nodes_mod, tiny_model, tiny_ckpt, monkeypatch, caplog_info):
    """The twin of every check that the counted passes are the workers': a count that is not what they ran
    (one pass a step for KSampler at cfg 3) is logged as a WARNING naming both."""
    gp = importlib.import_module("ltxav_pack.guidance_passes")
    monkeypatch.setattr(gp, "count", lambda patcher, job, job_bytes, node: gp.Passes.uniform((1,), job.total_steps))
    parallel_ksampler(nodes_mod, tiny_model, tiny_ckpt[1]["caption_channels"], cfg_parallel="auto")
    assert f"{NODE}: the workers ran [6, 6] model passes where [3, 3] were counted" in caplog_info.text


def test_cfg_1_falls_back_to_sequence_parallel_on_the_same_workers(ps, nodes_mod, tiny_model, tiny_model_f64,
                                                                    tiny_ckpt, caplog_info):
    cc = tiny_ckpt[1]["caption_channels"]
    parallel_ksampler(nodes_mod, tiny_model, cc, steps=1, cfg_parallel="on")  # cfg 2 x Ulysses 1
    pids = [i["pid"] for i in worker_infos(ps)]
    got, ui = parallel_ksampler(nodes_mod, tiny_model, cc, cfg=1.0, cfg_parallel="on")
    assert f"{NODE}: 2 workers, Ulysses 2 x ring 1" in ui.value and worker_passes(ui) == [3, 3]
    assert f"{NODE}: cfg-parallel not used (one guidance pass a step" in caplog_info.text
    assert f"{NODE}: regrouped 2 workers from cfg 2 x Ulysses 1 x ring 1 to Ulysses 2 x ring 1" in caplog_info.text
    assert_equals_stock(got, tiny_model, tiny_model_f64, cc, cfg=1.0)
    infos = worker_infos(ps)
    assert [i["pid"] for i in infos] == pids and all(i["loads"] == 1 for i in infos)  # same workers and model


def test_dual_cfg_guider_three_passes_uneven_on_two_workers(ps, nodes_mod, tiny_model, tiny_model_f64, tiny_ckpt):
    """DualCFGGuider (3 passes a step) on 2 workers: auto keeps sequence parallel (3 do not split evenly);
    'on' shares them 2 and 1. Both equal stock's SamplerCustomAdvanced."""
    cc = tiny_ckpt[1]["caption_channels"]
    latent = make_latent(**LATENT)
    sigmas = ltxv_sigmas(latent, steps=3)
    want = stock_custom_advanced("dual", tiny_model, cc, latent, sigmas)
    reference = stock_custom_advanced("dual", tiny_model_f64, cc, latent, sigmas)
    for mode, label, passes in (("auto", "Ulysses 2 x ring 1", [9, 9]), ("on", "cfg 2 x Ulysses 1 x ring 1", [6, 3])):
        *got, ui = parallel_custom_advanced(nodes_mod, "dual", tiny_model, cc, latent, sigmas, cfg_parallel=mode)
        assert f"{NODE}: 2 workers, {label}" in ui.value and worker_passes(ui) == passes, ui.value
        assert_matches(got[0], want[0], reference[0], f"{mode} output")
        assert_matches(got[1], want[1], reference[1], f"{mode} denoised_output")


def test_auto_splits_every_pass_over_all_workers_when_only_that_fits(ps, nodes_mod, tiny_model, tiny_model_f64,
                                                                     tiny_ckpt, monkeypatch, caplog_info):
    """With each worker capped between the plan of one pass split over 2 workers and one whole pass a
    worker (ComfyUI runs the passes one after the other at such budgets), auto samples sequence parallel;
    'on' is refused."""
    groups = importlib.import_module("ltxav_pack.sequence_parallel.groups")
    cc = tiny_ckpt[1]["caption_channels"]
    latent = make_latent(**LATENT)["samples"]
    probe = 2**30 // 8  # small enough that ComfyUI's estimate for two passes does not fit: one a forward
    split = ps.plan.check_memory(tiny_model, latent, groups.Degrees(2), probe, passes=2)
    whole = ps.plan.check_memory(tiny_model, latent, groups.Degrees(1, 1, 2), probe, passes=2)
    assert "1 in each worker's forward" in split.note and split.total < whole.total
    ps.POOL.stop_group()
    monkeypatch.setenv("LTXAV_PARALLEL_MEMORY_CAP_GIB", f"{(split.total + whole.total) / 2 / 2**30:.12f}")
    try:
        got, ui = parallel_ksampler(nodes_mod, tiny_model, cc, cfg_parallel="auto")
        assert f"{NODE}: 2 workers, Ulysses 2 x ring 1" in ui.value
        assert f"{NODE}: cfg-parallel not used (the video fits only with each pass split over all 2 GPUs)" in \
            caplog_info.text
        assert_equals_stock(got, tiny_model, tiny_model_f64, cc)
        refusal = (rf"{NODE}: a 25-frame 128x96 video needs about .* GiB per worker \(cfg 2 x Ulysses 1 x ring 1; "
                   r"2 guidance passes a step, 1 in each worker's forward")
        with pytest.raises(ValueError, match=refusal):
            parallel_ksampler(nodes_mod, tiny_model, cc, cfg_parallel="on")
    finally:
        ps.POOL.stop_group()  # the workers read the cap when they start


def test_interrupt_stops_every_group_at_the_same_step(ps, nodes_mod, tiny_model, tiny_model_f64, tiny_ckpt):
    """The stop flag is agreed over all workers, not within one sequence-parallel group: with cfg 2 x
    Ulysses 1 each group has one worker, and both must stop at the same step."""
    import threading
    import time

    import comfy.model_management
    import ray

    cc = tiny_ckpt[1]["caption_channels"]
    parallel_ksampler(nodes_mod, tiny_model, cc, steps=1, cfg_parallel="on")  # 2 workers, cfg 2
    box = {}

    def run():
        try:
            parallel_ksampler(nodes_mod, tiny_model, cc, steps=400, cfg_parallel="on")
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    for _ in range(600):
        if ray.get(ps.POOL.group.actors[0].progress.remote()) >= 2:
            break
        time.sleep(0.1)
    comfy.model_management.interrupt_current_processing(True)
    t.join(120)
    assert isinstance(box.get("error"), comfy.model_management.InterruptProcessingException)
    steps = ray.get([a.progress.remote() for a in ps.POOL.group.actors])
    assert steps[0] == steps[1] < 400
    got, ui = parallel_ksampler(nodes_mod, tiny_model, cc, cfg_parallel="on")
    assert "cfg 2 x Ulysses 1 x ring 1" in ui.value
    assert_equals_stock(got, tiny_model, tiny_model_f64, cc)


def test_three_workers_one_pass_each_dual_cfg(ps, nodes_mod, tiny_model, tiny_model_f64, tiny_ckpt):
    cc = tiny_ckpt[1]["caption_channels"]
    latent = make_latent(**LATENT)
    sigmas = ltxv_sigmas(latent, steps=2)
    want = stock_custom_advanced("dual", tiny_model, cc, latent, sigmas)
    reference = stock_custom_advanced("dual", tiny_model_f64, cc, latent, sigmas)
    *got, ui = parallel_custom_advanced(nodes_mod, "dual", tiny_model, cc, latent, sigmas, gpus=3, cfg_parallel="auto")
    assert f"{NODE}: 3 workers, cfg 3 x Ulysses 1 x ring 1" in ui.value and worker_passes(ui) == [2, 2, 2]
    assert_matches(got[0], want[0], reference[0])
    assert_matches(got[1], want[1], reference[1])


FOUR = [(0, 1, "cfg 2 x Ulysses 2 x ring 1", 3.0, "euler"), (1, 2, "cfg 2 x Ulysses 1 x ring 2", 3.0, "euler"),
        (0, 1, "cfg 2 x Ulysses 2 x ring 1", 1.0, "euler_cfg_pp")]


@pytest.mark.parametrize("ulysses,ring,label,cfg,sampler", FOUR, ids=["cfg2-ulysses2", "cfg2-ring2", "cfg1-cfg_pp"])
def test_four_workers_cfg_with_ulysses_or_ring(ps, nodes_mod, tiny_model, tiny_model_f64, tiny_ckpt, ulysses, ring,
                                               label, cfg, sampler):
    """4 workers: two groups of two, each pass split over its group by Ulysses or by the ring (the later
    cases reuse the first's workers with other groups); at cfg 3, and at cfg 1 with a *_cfg_pp sampler
    (the LTX-2.3 templates). Image-to-video: per-token timesteps."""
    import torch
    from comfy_extras.nodes_lt import LTXVConcatAVLatent

    cc = tiny_ckpt[1]["caption_channels"]
    video = make_latent(**LATENT, audio=False)
    mask = torch.ones(1, 1, video["samples"].shape[2], 1, 1)
    mask[:, :, 0] = 0.0
    video["noise_mask"] = mask
    latent = LTXVConcatAVLatent.execute(video, {"samples": torch.zeros(1, 8, 26, 16), "type": "audio"})[0]
    got, ui = parallel_ksampler(nodes_mod, tiny_model, cc, latent=latent, gpus=4, ulysses=ulysses, ring=ring,
                                cfg_parallel="auto", cfg=cfg, sampler=sampler)
    assert f"{NODE}: 4 workers, {label}" in ui.value and worker_passes(ui) == [3, 3, 3, 3], ui.value
    assert_equals_stock(got, tiny_model, tiny_model_f64, cc, latent=latent, cfg=cfg, sampler=sampler)


def test_multimodal_guider_equals_stock(ps, nodes_mod, tiny_model, tiny_model_f64, tiny_ckpt, caplog_info):
    """ComfyUI-LTXVideo's MultimodalGuider (positive, negative, perturbed (STG) and modality-isolated
    passes, each in a call of its own with other transformer_options) on 2 workers equals stock; auto keeps
    sequence parallel and says why, and the counted passes are those the workers ran; the STG flag the
    guider sets is the one the workers' block patches read (the node pack's code reaches the workers under
    ComfyUI's module names: node_packs)."""
    from helpers.node_packs import LTXVIDEO, load_node_pack, not_installed

    if load_node_pack(LTXVIDEO) is None:
        pytest.skip(not_installed(LTXVIDEO))
    cc = tiny_ckpt[1]["caption_channels"]
    latent = make_latent(**LATENT)
    sigmas = ltxv_sigmas(latent, steps=2)
    want = stock_custom_advanced("multimodal", tiny_model, cc, latent, sigmas)
    reference = stock_custom_advanced("multimodal", tiny_model_f64, cc, latent, sigmas)
    # the twin: the perturbed pass unperturbed (what workers whose STG flag is a copy of the guider's
    # would run: their patches never see it set) fails the check
    assert mismatches(stock_custom_advanced("multimodal unperturbed", tiny_model, cc, latent, sigmas)[0], want[0],
                      reference[0])
    *got, ui = parallel_custom_advanced(nodes_mod, "multimodal", tiny_model, cc, latent, sigmas, cfg_parallel="auto")
    assert f"{NODE}: 2 workers, Ulysses 2 x ring 1; 4 guidance passes a step (calls of 1 + 1 + 1 + 1)" in ui.value
    assert f"{NODE}: cfg-parallel not used (MultimodalGuider makes its 4 passes a step in separate calls" in \
        caplog_info.text
    assert worker_passes(ui) == [8, 8] and "were counted" not in caplog_info.text
    assert_matches(got[0], want[0], reference[0], "output")
    assert_matches(got[1], want[1], reference[1], "denoised_output")
