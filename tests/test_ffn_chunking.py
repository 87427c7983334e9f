"""The chunking mechanics on plain torch modules (no ComfyUI host needed)."""
import copy
import importlib

import pytest
import torch

from helpers.comfy_host import import_pack
from helpers.numerics import assert_matches, mismatches

import_pack()
fc = importlib.import_module("ltxav_pack.ffn_chunking")


pytestmark = pytest.mark.quick  # the whole module is in the fast subset


class GELUProj(torch.nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = torch.nn.Linear(dim, inner)

    def forward(self, x):
        return torch.nn.functional.gelu(self.proj(x), approximate="tanh")


class FeedForward(torch.nn.Module):
    """Same structure as comfy.ldm.lightricks.model.FeedForward (net = GELU proj, dropout, linear)."""

    def __init__(self, dim=32, mult=4, dtype=torch.float32):
        super().__init__()
        self.net = torch.nn.Sequential(GELUProj(dim, dim * mult), torch.nn.Dropout(0.0),
                                       torch.nn.Linear(dim * mult, dim))
        self.to(dtype)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ff = FeedForward()
        self.audio_ff = FeedForward(16)


class Model(torch.nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(Block() for _ in range(layers))


@pytest.mark.parametrize("tokens", [64, 67, 5])
@pytest.mark.parametrize("chunks", [2, 3, 16])
def test_chunked_equals_plain_fp32(tokens, chunks):
    torch.manual_seed(0)
    ff = FeedForward()
    x = torch.randn(2, tokens, 32)
    want = ff.net(x)
    reference = copy.deepcopy(ff.net).double()(x.double())
    got = fc.chunked_forward(ff, x.clone(), chunks)
    assert got.shape == want.shape
    assert_matches(got, want, reference)
    assert ff.calls == min(chunks, tokens)
    got[:, -1] *= 1 + 2 ** -10  # the twin: one token's row off in scale by 2^-10 fails the same check
    assert mismatches(got, want, reference)


def test_chunked_bf16_matches_per_chunk_reference():
    torch.manual_seed(0)
    ff = FeedForward(dtype=torch.bfloat16)
    x = torch.randn(1, 50, 32, dtype=torch.bfloat16)
    want = ff.net(x)
    got = fc.chunked_forward(ff, x.clone(), 4)
    # bf16: only the matmul reduction order may differ between a slice and the whole
    assert_matches(got, want, copy.deepcopy(ff.net).double()(x.double()))
    bounds = fc._chunk_bounds(50, 4)
    exact = torch.cat([ff.net(x[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])], dim=1)
    assert torch.equal(got, exact)


def test_writes_into_a_fresh_input_but_not_into_views_or_grad_inputs():
    ff = FeedForward()
    x = torch.randn(1, 40, 32)
    assert fc.chunked_forward(ff, x, 4).data_ptr() == x.data_ptr()

    base = torch.randn(1, 80, 32)
    view = base[:, :40]
    keep = base.clone()
    out = fc.chunked_forward(ff, view, 4)
    assert out.data_ptr() != base.data_ptr() and torch.equal(base, keep)

    xg = torch.randn(1, 40, 32, requires_grad=True)
    out = fc.chunked_forward(ff, xg, 4)
    out.sum().backward()
    assert xg.grad is not None


def test_one_chunk_is_the_plain_call():
    ff = FeedForward()
    x = torch.randn(1, 10, 32)
    assert torch.equal(fc.chunked_forward(ff, x.clone(), 1), ff.net(x))


def test_chunk_bounds_cover_everything_evenly():
    for n in (1, 7, 64, 1001):
        for k in (1, 3, 16):
            if k > n:
                continue
            b = fc._chunk_bounds(n, k)
            sizes = [e - s for s, e in zip(b[:-1], b[1:])]
            assert b[0] == 0 and b[-1] == n and max(sizes) - min(sizes) <= 1


def test_installed_routes_and_restores():
    model = Model()
    ff = model.transformer_blocks[0].ff
    with fc.installed(model, fc.ChunkSettings(4, False)):
        assert "forward" in ff.__dict__
        ff(torch.randn(1, 40, 32))
        assert ff.calls == 4
        model.transformer_blocks[0].audio_ff(torch.randn(1, 3, 16))  # 3 tokens: 3 chunks
        assert model.transformer_blocks[0].audio_ff.calls == 3
    assert "forward" not in ff.__dict__
    ff(torch.randn(1, 40, 32))
    assert ff.calls == 5


def test_installed_restores_after_an_error():
    model = Model()
    with pytest.raises(RuntimeError):
        with fc.installed(model, fc.ChunkSettings(2, False)):
            raise RuntimeError("boom")
    assert all("forward" not in b.ff.__dict__ and "forward" not in b.audio_ff.__dict__
               for b in model.transformer_blocks)


def test_chunk_count_per_call():
    ff = FeedForward()
    x = torch.zeros(1, 5, 32)
    assert fc.chunks_for(fc.ChunkSettings(16, False), ff, x, None) == 5  # capped at the token count
    assert fc.chunks_for(fc.ChunkSettings(3, False), ff, x, None) == 3
    long = torch.zeros(1, 9000, 32)
    assert fc.chunks_for(fc.ChunkSettings(1, True), ff, long, None) == 3  # auto: <= 4096 tokens a chunk
    # auto with little free memory: 9000 tokens x 2 x 128 x 4 bytes = 9.2 MB of activations, share 1/8 of 8 MB
    assert fc.chunks_for(fc.ChunkSettings(1, True), ff, long, 8e6) == 10


def test_settings_roundtrip_through_options():
    s = fc.ChunkSettings(8, True)
    assert fc.ChunkSettings.from_options({fc.CHUNKING_KEY: s.as_dict()}) == s
    assert fc.ChunkSettings.from_options({}) is None
