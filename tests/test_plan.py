"""The run's plan (``driver.plan.plan``) without Ray or workers: the worker count, the degrees and
CFG-parallel or not, the fallback to every pass split over all workers when only that fits, and the
refusals the nodes show. Each choice has a twin where the inputs differ just enough to change it."""
import importlib

import pytest

from helpers.comfy_host import make_latent
from helpers.sampler_cases import LATENT

NODE = "LTXAV Parallel Sampler"
pytestmark = pytest.mark.quick


@pytest.fixture(scope="module")
def dp(pack):
    return importlib.import_module("ltxav_pack.driver.plan")


@pytest.fixture(scope="module")
def Degrees(pack):
    return importlib.import_module("ltxav_pack.sequence_parallel.groups").Degrees


@pytest.fixture
def one_pass_a_forward(tiny_model, monkeypatch):
    """ComfyUI's own estimate says two passes never fit one forward: each worker runs one at a time."""
    monkeypatch.setattr(tiny_model.model, "memory_required", lambda shape, cond_shapes=None:
                        10**15 if shape[0] > 1 else 0)
    return tiny_model


def test_degrees_and_cfg_parallel_are_chosen_before_any_budget(dp, Degrees, tiny_model):
    latent = make_latent(**LATENT)["samples"]
    auto = dp.plan(dp.ParallelSettings(gpus=2), 2, tiny_model, latent, available=4, cpu=False)
    assert (auto.world, auto.degrees, auto.notes, auto.estimate) == (2, Degrees(1, 1, 2), (), None)
    # the twins: cfg 1 (one pass a step) and cfg_parallel off keep both workers on one sequence
    one = dp.plan(dp.ParallelSettings(gpus=2), 1, tiny_model, latent, available=4, cpu=False)
    assert one.degrees == Degrees(2, 1, 1)
    assert one.notes == ("cfg-parallel not used (one guidance pass a step (cfg 1 or a guider without negative): "
                         "nothing to split)",)
    off = dp.plan(dp.ParallelSettings(gpus=2, cfg_parallel="off"), 2, tiny_model, latent, available=4, cpu=False)
    assert (off.degrees, off.notes) == (Degrees(2, 1, 1), ())
    every = dp.plan(dp.ParallelSettings(gpus=0, cfg_parallel="off"), 2, tiny_model, latent, available=2, cpu=False)
    assert every.world == 2  # gpus 0: all the cluster offers
    # unknown budgets (CPU workers without a cap) give no verdict
    assert dp.plan(dp.ParallelSettings(gpus=2), 2, tiny_model, latent, 4, False, budgets=[None, None]).estimate is None


@pytest.mark.parametrize("kw,available,cpu,msg", [
    (dict(gpus=3), 2, False, r"input 'gpus' asks for 3 GPUs, but the Ray cluster at 'local' has 2; use gpus <= 2 "
                             r"\(0 = all\)\.$"),
    (dict(gpus=0), 8, True, r"ComfyUI runs on the CPU, so 'gpus' counts CPU worker processes"),
    (dict(gpus=2, ulysses=0, ring=3), 2, True, r"ring_degree=3 does not divide gpus=2"),
    (dict(gpus=2, ulysses=2, ring=2), 2, True, r"ulysses_degree x ring_degree = 2 x 2 = 4, but 2 CPU workers are "
                                               r"used"),
    (dict(gpus=2, cfg_parallel="sometimes"), 2, False, r"input 'cfg_parallel' is 'sometimes'"),
])
def test_refusals_name_the_input_and_what_works(dp, tiny_model, kw, available, cpu, msg):
    latent = make_latent(**LATENT)["samples"]
    with pytest.raises(ValueError, match=f"^{NODE}: {msg}"):
        dp.plan(dp.ParallelSettings(**kw), 2, tiny_model, latent, available, cpu)
    # the twin: the same job on as many workers as asked for, with degrees that fit, is planned
    assert dp.plan(dp.ParallelSettings(gpus=2), 2, tiny_model, latent, 2, cpu).world == 2


def test_too_few_tokens_are_refused_by_the_plan(dp, Degrees, tiny_model):
    latent = make_latent(width=32, height=32, length=9)["samples"]  # 2 video tokens
    with pytest.raises(ValueError, match=rf"^{NODE}: the video has 2 tokens, too few to split over 3 CPU workers"):
        dp.plan(dp.ParallelSettings(gpus=3, ulysses=3), 1, tiny_model, latent, 4, True)
    assert dp.plan(dp.ParallelSettings(gpus=2, ulysses=2), 1, tiny_model, latent, 4, True).degrees == Degrees(2)


def test_a_budget_just_too_small_is_refused(dp, Degrees, one_pass_a_forward):
    model = one_pass_a_forward
    latent = make_latent(**LATENT)["samples"]
    settings = dp.ParallelSettings(gpus=2, cfg_parallel="off")
    need = dp.check_memory(model, latent, Degrees(2), 10**12, passes=2).total
    fits = dp.plan(settings, 2, model, latent, 2, False, budgets=[need + 2**20, need], infos=[{"device": "card"}] * 2)
    assert (fits.degrees, fits.budget, fits.per_forward, fits.estimate.total) == (Degrees(2), need, 1, need)
    assert "Ulysses 2 x ring 1; 2 guidance passes a step, 1 in each worker's forward" in fits.estimate.note
    with pytest.raises(ValueError, match=rf"^{NODE}: a 25-frame 128x96 video needs about .* GiB per worker \(Ulysses "
                                         r"2 x ring 1; 2 guidance passes a step, 1 in each worker's forward: .*\), but "
                                         r"card has .* GiB for it; .*Shorten input 'latent_image' or raise input "
                                         r"'gpus'\.$"):
        dp.plan(settings, 2, model, latent, 2, False, budgets=[need + 2**20, need - 1], infos=[{"device": "card"}] * 2)


def test_auto_falls_back_to_every_pass_split_over_all_workers_when_only_that_fits(dp, Degrees, one_pass_a_forward):
    model = one_pass_a_forward
    latent = make_latent(**LATENT)["samples"]
    split = dp.check_memory(model, latent, Degrees(2), 10**12, passes=2).total  # each pass over both workers
    whole = dp.check_memory(model, latent, Degrees(1, 1, 2), 10**12, passes=2).total  # a whole pass a worker
    assert split < whole
    between = (split + whole) // 2
    auto = dp.plan(dp.ParallelSettings(gpus=2), 2, model, latent, 2, False, budgets=[between] * 2)
    assert auto.degrees == Degrees(2, 1, 1) and auto.estimate.total == split
    assert auto.notes == ("cfg-parallel not used (the video fits only with each pass split over all 2 GPUs)",)
    # the twins: where a whole pass a worker fits, auto keeps cfg-parallel; 'on' never falls back
    roomy = dp.plan(dp.ParallelSettings(gpus=2), 2, model, latent, 2, False, budgets=[whole] * 2)
    assert (roomy.degrees, roomy.notes, roomy.estimate.total) == (Degrees(1, 1, 2), (), whole)
    with pytest.raises(ValueError, match=rf"^{NODE}: a 25-frame 128x96 video needs about .* GiB per worker \(cfg 2 x "
                                         r"Ulysses 1 x ring 1; 2 guidance passes a step, 1 in each worker's forward"):
        dp.plan(dp.ParallelSettings(gpus=2, cfg_parallel="on"), 2, model, latent, 2, False, budgets=[between] * 2)
    # neither fits: the refusal is the split-all plan's, the one that needs least
    with pytest.raises(ValueError, match=rf"^{NODE}: .* per worker \(Ulysses 2 x ring 1; "):
        dp.plan(dp.ParallelSettings(gpus=2), 2, model, latent, 2, False, budgets=[split - 1] * 2)


def test_the_verdict_keeps_the_first_plans_decisions(dp, Degrees, tiny_model, monkeypatch):
    """A run plans before its workers start and again with their budgets: the second plan takes the workers,
    degrees and notes from the first (``shaped``) and decides only the memory verdict; the twin without
    ``shaped`` decides them again."""
    latent = make_latent(**LATENT)["samples"]
    settings = dp.ParallelSettings(gpus=2)
    first = dp.plan(settings, 2, tiny_model, latent, available=4, cpu=False)
    decided = []
    real = dp._shape
    monkeypatch.setattr(dp, "_shape", lambda *a: decided.append(a) or real(*a))
    final = dp.plan(settings, 2, tiny_model, latent, 4, False, budgets=[1 << 40, 1 << 40], shaped=first)
    assert decided == [] and (final.world, final.degrees, final.notes) == (first.world, first.degrees, first.notes)
    assert final.estimate is not None
    dp.plan(settings, 2, tiny_model, latent, 4, False, budgets=[1 << 40, 1 << 40])
    assert len(decided) == 1
