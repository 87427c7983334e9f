"""The model-family contract (``models``): a family registered by its model class is found by that class and
its numbers are what the memory planner computes with; a class nobody registered is refused by name. The
family here is a tiny fake one, registered for the test the way a family module registers itself."""
import importlib
import math

import pytest
import torch

from helpers.comfy_host import import_pack

import_pack()
models = importlib.import_module("ltxav_pack.models")
mp = importlib.import_module("ltxav_pack.memory_plan")

pytestmark = pytest.mark.quick


class TinyDiT(torch.nn.Module):
    """A fake diffusion model: 3 blocks of two linears, 6 heads."""

    def __init__(self, dim=12, heads=6):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)) for _ in range(3))
        self.head = torch.nn.Linear(dim, dim)


class Unregistered(torch.nn.Module):
    pass


TINY_PLANNER = mp.Coefficients(attention=2.0, attention_out_in_place=0.25, ring=0.5, full_sequence=0.125,
                               ffn_kept=1.0, per_token_timestep=0.5, fixed_bytes=1000, lean_attention=1.5,
                               lean_gated=0.0, lean_exchange=0.5, lean_range=1.0, lean_pool=0.5)
TINY_GEOMETRY = mp.LatentGeometry(time_stride=4, space_stride=16, audio_per_second=0, video_elements=16,
                                  audio_elements=0)


@pytest.fixture
def tiny_family(monkeypatch):
    """The fake family, registered as a family module registers itself; the registry is put back after."""
    monkeypatch.setattr(models, "REGISTRY", dict(models.REGISTRY))

    @models.register(TinyDiT)
    class TinyFamily(models.Family):
        NAME = "Tiny test DiT"
        HEADS = 6
        planner = TINY_PLANNER
        geometry = TINY_GEOMETRY
        TRANSFORMER_OPTIONS_ARG = 2

        def video_heads(self, dm):
            return dm.heads

        def plan_dims(self, dm, compute_dtype=None):
            return mp.ModelDims(video_dim=dm.dim, audio_dim=0, planner=self.planner, ffn_mult=4,
                                **mp.weight_figures(dm, list(dm.blocks), compute_dtype))

    return TinyFamily


def test_a_registered_family_is_found_by_class_and_plans_with_its_numbers(tiny_family):
    dm = TinyDiT()
    family = models.family_of(dm, "Some Node")
    assert isinstance(family, tiny_family) and models.family_of(type("Sub", (TinyDiT,), {})(), "N") is family
    assert "6 for Tiny test DiT" in models.heads_note() and "32 for LTX-2 audio-video (LTXAV)" in models.heads_note()
    # its forward's transformer_options (argument 2)
    assert family.transformer_options_of(("x", "t", {"a": 1}), {}) == {"a": 1}
    assert family.with_transformer_options(("x", "t", {}), {}, {"b": 2}) == (("x", "t", {"b": 2}), {})

    dims = family.plan_dims(dm, torch.float32)
    assert dims.weight_bytes == 4 * sum(p.numel() for p in dm.parameters())
    assert dims.block_bytes == 4 * (12 * 48 + 48 + 48 * 12 + 12) and dims.blocks_bytes == 3 * dims.block_bytes
    # the latent's geometry: 4x time, 16x space, no audio
    clip, batch = family.latent_clip(torch.zeros(2, 16, 5, 2, 4))
    assert (clip.video_tokens, clip.audio_tokens, clip.frames, batch) == (40, 0, 17, 2)
    assert clip == family.geometry.clip(17, 64, 32)

    # the planner's arithmetic with the family's numbers, by hand (one worker, no chunking, sampler state)
    est = mp.estimate(dims, clip, ffn_chunks=1, sampler=True)
    vec = 12 * 4
    attention = 40 * 2.0 * vec + 40 * 0.125 * vec
    ffn = 40 * 1.0 * vec + 40 * 2 * 4 * vec
    assert est.parts["fixed"] == 1000 and est.parts["video tokens"] == int(max(attention, ffn))
    assert est.parts["sampler state"] == mp.SAMPLER_COPIES * 4 * 16 * 40
    two = mp.estimate(dims, clip, world=2, ffn_chunks=1)
    assert two.parts["video tokens"] == int(max(20 * 1.75 * vec + 40 * 0.125 * vec, 20 * vec + 20 * 8 * vec))
    # ... and LTX's numbers on the same dims plan otherwise
    ltx = importlib.import_module("ltxav_pack.models.ltxav").LTXAV()
    with_ltx = mp.estimate(mp.ModelDims(**{**vars(dims), "planner": ltx.planner}), clip, ffn_chunks=1, sampler=True)
    assert with_ltx.parts["fixed"] != est.parts["fixed"] and with_ltx.parts["video tokens"] != est.parts["video tokens"]
    # the search helpers divide the family's heads
    budget = est.parts["weights"] + est.parts["fixed"] + math.ceil(max(attention, ffn)) // 5
    world = mp.smallest_world(budget, dims, clip, max_world=8, video_heads=family.video_heads(dm), ffn_chunks=1)
    assert world is not None and world > 1 and 6 % world == 0


def test_an_unregistered_model_is_refused_by_name(tiny_family):
    """The twin: a model class no family registered is refused, naming the node and what is supported."""
    with pytest.raises(ValueError, match=r"^Some Node: the model is a Unregistered, not LTX-2 audio-video \(LTXAV\) or "
                                         r"Tiny test DiT; the parallel sampler supports .* checkpoints only"):
        models.family_of(Unregistered(), "Some Node")


def test_the_fake_family_is_gone_after_its_test():
    """A family is known only while registered: after the fixture TinyDiT is refused again."""
    with pytest.raises(ValueError, match=r"Some Node: the model is a TinyDiT, not LTX-2 audio-video \(LTXAV\);"):
        models.family_of(TinyDiT(), "Some Node")


def test_a_clip_made_without_a_family_has_ltx_geometry():
    """``mp.Clip(...)`` without a geometry (made by hand: tests, benchmarks) has LTXAV's: the two stay equal."""
    assert mp.Clip(1, 1, 1).geometry == importlib.import_module("ltxav_pack.models.ltxav_plan").GEOMETRY
