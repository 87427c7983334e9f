"""Sequence-parallel LTXAV forward on W CPU processes (gloo) against ComfyUI's stock single-process
forward on the same tiny checkpoint and inputs."""
import functools
import importlib

import pytest
import torch

from helpers.numerics import assert_matches, mismatches, rel_l2
from helpers.sp_cases import (
    FORWARD_CASES,
    SAMPLER_CASES,
    SHAPES,
    exchanges_logged,
    no_exchange,
    recording_shapes,
    run_case,
    scaled_attention,
    shifted_tiles,
    small_lean_ranges,
    stock_patchers,
    swap_one_token_off,
    token_count,
)
from helpers.sp_harness import run_parallel

# (world, ulysses, ring, Ulysses head groups): Ulysses-only, ring-only and hybrid degrees; the tiny
# model's 12 heads make one Ulysses group by default, so one config runs 3 (4 heads a call)
CONFIGS = [(2, 2, 1, 1), (2, 2, 1, 3), (2, 1, 2, 1), (3, 3, 1, 1), (3, 1, 3, 1), (4, 2, 2, 1), (4, 4, 1, 1)]
ODD_SHAPE = {2: "odd45", 3: "odd70", 4: "odd45"}  # token counts that do not divide W


@pytest.fixture(scope="module")
def stock(comfy, tiny_ckpts):
    """Stock ComfyUI results (no wrapper) in float32 and float64, computed once per (version, case, shape)."""
    patchers = stock_patchers(comfy, tiny_ckpts)

    @functools.cache
    def result(version, case, shape, dtype=torch.float32):
        patcher = patchers[version, dtype]
        with recording_shapes(patcher.model.diffusion_model) as seen:
            outs = run_case(patcher, case, shape, {})
        return outs, seen

    return result


@pytest.fixture(scope="module")
def ckpts(tiny_ckpts):
    return {v: path for v, (path, _) in tiny_ckpts.items()}


def jobs_for(world):
    """Every case on the even shape for LTX-2 and LTX-2.3; the image-to-video and attenuated-guide
    cases (per-token timesteps, the masked path) on a token count W does not divide, for LTX-2."""
    even = [(v, c, "even") for v in ("2", "2.3") for c in FORWARD_CASES + SAMPLER_CASES]
    odd = [("2", c, ODD_SHAPE[world]) for c in ("fwd_t2v", "fwd_i2v", "ks_i2v", "ks_guide_attenuated")]
    return even + odd


def assert_equals_stock(stock, ranks, job):
    want, _ = stock(*job)
    reference, _ = stock(*job, dtype=torch.float64)
    for rank, res in enumerate(ranks):
        assert_matches(res[job]["outs"], want, reference, f"{job} rank {rank}")


@pytest.mark.parametrize("world,ulysses,ring,groups", [
    pytest.param(*c, id=f"w{c[0]}-u{c[1]}-r{c[2]}" + (f"-g{c[3]}" if c[3] > 1 else ""),
                 marks=[pytest.mark.quick] if c == (2, 2, 1, 1) else []) for c in CONFIGS])
def test_parallel_equals_stock(stock, ckpts, world, ulysses, ring, groups):
    jobs = jobs_for(world)
    ranks = run_parallel(world, ulysses, ring, ckpts, jobs, sp_attrs={"HEAD_GROUPS": groups})
    for job in jobs:
        assert_equals_stock(stock, ranks, job)
        _, want_seen = stock(*job)
        # every rank returns the same tensors (they continue sampling from them)
        for res in ranks[1:]:
            assert all(torch.equal(a, b) for a, b in zip(res[job]["outs"], ranks[0][job]["outs"]))

        # no rank builds a full-length PE or per-token timestep embedding
        n = max(want_seen["pe"])  # the stock forward's video token count (guides included)
        local = -(-n // world)
        for res in ranks:
            assert max(res[job]["seen"]["pe"]) <= max(local, _audio_tokens(job)), job
            assert max(res[job]["seen"]["adaln"]) < n, job


@pytest.mark.parametrize("world,ulysses,ring,jobs", [
    (2, 2, 1, [("2", "fwd_t2v", "even"), ("2", "fwd_ref_audio", "even"), ("2.3", "ks_guide_attenuated", "even")]),
    (2, 1, 2, [("2.3", "fwd_t2v", "even")]),
    (1, 1, 1, [("2.3", "ks_i2v", "even")]),
], ids=["ulysses", "ring", "one-rank"])
def test_lean_ranges_equal_stock(stock, ckpts, world, ulysses, ring, jobs):
    """The lean attention going by ranges of a few tokens on every rank (rotary tables, norms, attention
    outputs into the queries, output projections) equals stock, with Ulysses, ring and one rank."""
    ranks = run_parallel(world, ulysses, ring, ckpts, jobs, sp_attrs={small_lean_ranges.__name__: small_lean_ranges})
    for job in jobs:
        assert_equals_stock(stock, ranks, job)


@pytest.mark.parametrize("broken", [shifted_tiles, scaled_attention], ids=["shifted-tiles", "scaled-attention"])
def test_broken_forward_is_caught(stock, ckpts, broken):
    """The twin of the test above: a layout off by one token, or one rank's attention off by 2^-10 in
    scale, fails the same check."""
    job = ("2", "fwd_t2v", "even")
    ranks = run_parallel(2, 2, 1, ckpts, [job], sp_attrs={broken.__name__: broken})
    want, _ = stock(*job)
    reference, _ = stock(*job, dtype=torch.float64)
    assert mismatches(ranks[0][job]["outs"], want, reference)


@pytest.mark.parametrize("world", [2, 4])
def test_in_place_exchange_where_the_tokens_divide_equals_stock(stock, ckpts, world):
    """Ulysses over 2 and 4 ranks: where the video tokens divide the group the exchange swaps head blocks in
    q's, k's and v's own buffers (no send buffer); where they do not, it goes through a send buffer; both equal
    stock, in a forward and two sampler steps with the lean attention's ranges shrunk."""
    jobs = [("2.3", "fwd_t2v", "even"), ("2", "ks_i2v", "even"), ("2", "fwd_t2v", ODD_SHAPE[world])]
    ranks = run_parallel(world, world, 1, ckpts, jobs, sp_attrs={exchanges_logged.__name__: exchanges_logged,
                                                                 small_lean_ranges.__name__: small_lean_ranges})
    for job in jobs:
        assert_equals_stock(stock, ranks, job)
    lines = set(ranks[0]["log"])
    assert f"exchange in place: {token_count('even') // world} tokens a rank" in lines
    assert f"exchange with a send buffer: {-(-token_count(ODD_SHAPE[world]) // world)} tokens a rank" in lines


def test_in_place_exchange_one_token_off_is_caught(stock, ckpts):
    """The twin: the other ranks' tokens one token off after each swap fail the same check."""
    job = ("2", "fwd_t2v", "even")
    ranks = run_parallel(2, 2, 1, ckpts, [job], sp_attrs={swap_one_token_off.__name__: swap_one_token_off})
    want, _ = stock(*job)
    reference, _ = stock(*job, dtype=torch.float64)
    assert mismatches(ranks[0][job]["outs"], want, reference)


@pytest.mark.quick
def test_group_of_one_runs_stock_attention(stock, ckpts):
    """One rank (gpus=1, or each group of cfg-parallel with Ulysses 1) holds every token: its attention
    is ComfyUI's own call, no exchange and so no send buffer, and the result equals stock; with the
    guide mask too (the masked path)."""
    jobs = [("2", "fwd_t2v", "even"), ("2.3", "ks_guide_attenuated", "even")]
    ranks = run_parallel(1, 1, 1, ckpts, jobs, sp_attrs={no_exchange.__name__: no_exchange})
    for job in jobs:
        assert_equals_stock(stock, ranks, job)


def test_exchange_refusal_is_seen(ckpts):
    """The twin: with two ranks the same refusal stops the forward, so the test above would see an exchange."""
    with pytest.raises(Exception, match="exchange ran"):
        run_parallel(2, 2, 1, {"2": ckpts["2"]}, [("2", "fwd_t2v", "even")],
                     sp_attrs={no_exchange.__name__: no_exchange})


def _audio_tokens(job):
    _, case, shape = job
    if case in ("fwd_noaudio", "ks_noaudio"):
        return 0
    return SHAPES[shape][2] + 1 + (5 if case == "fwd_ref_audio" else 0)


def test_shape_recording_sees_full_lengths_in_stock(stock):
    """The recorder the test above relies on does see full lengths in the stock forward."""
    _, seen = stock("2", "fwd_i2v", "even")
    n = token_count("even")
    assert n in seen["pe"] and max(seen["adaln"]) == n


def test_attenuated_guides_change_the_result(stock):
    """The attenuation path is really exercised: strength 0.5 guides differ from strength 1."""
    plain, _ = stock("2", "ks_guide", "even")
    attenuated, _ = stock("2", "ks_guide_attenuated", "even")
    assert rel_l2(attenuated[0], plain[0]) > 1e-3


def test_memory_lines_when_enabled(ckpts, comfy):
    ranks = run_parallel(2, 2, 1, {"2": ckpts["2"]}, [("2", "fwd_t2v", "even")],
                         env={"LTXAV_PARALLEL_MEMORY_LOG": "1"})
    for rank, res in enumerate(ranks):
        assert [line.split(".")[0] for line in res["log"]] == [f"[RayWorker {rank}] PE Generated",
                                                               f"[RayWorker {rank}] Blocks complete"]
    quiet = run_parallel(2, 2, 1, {"2": ckpts["2"]}, [("2", "fwd_t2v", "even")])
    assert quiet[0]["log"] == []


@pytest.fixture(scope="module")
def groups(pack):
    return importlib.import_module("ltxav_pack.sequence_parallel.groups")


@pytest.mark.parametrize("deg,world,heads,msg", [
    ((2, 2), 2, 32, r"ulysses_degree x ring_degree = 2 x 2 = 4, but 2 GPUs"),
    ((3, 1), 3, 32, r"ulysses_degree=3 does not divide the model's 32 video attention heads; "
                    r"use a ulysses_degree from \[1\]"),
    ((0, 2), 2, 32, r"must be >= 1"),
])
@pytest.mark.quick
def test_bad_degrees(groups, deg, world, heads, msg):
    with pytest.raises(ValueError, match=msg):
        groups.check_degrees(groups.Degrees(*deg), world, heads, "LTXAV Parallel Sampler")


def test_non_ltxav_refused(pack, tiny_model):
    models = importlib.import_module("ltxav_pack.models")
    with pytest.raises(ValueError, match=r"Sampler X: the model is a Linear, not LTX-2 audio-video"):
        models.family_of(torch.nn.Linear(1, 1), "Sampler X")
    assert models.family_of(tiny_model.model.diffusion_model, "Sampler X").NAME == "LTX-2 audio-video (LTXAV)"
