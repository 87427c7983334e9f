"""The lean attention (lean_attention.py, models/ltx_rope.py) against stock ComfyUI on the tiny LTX-2 and
LTX-2.3 checkpoints: rotary tables made per range of tokens equal ComfyUI's to the bit, and a forward or a
sampling run with the tables deferred, the attention output in the queries' buffer and the projections in
place equals stock's under the float64-reference rule. The range sizes are shrunk to a few tokens so every
range path runs on the tiny inputs."""
import contextlib
import functools
import importlib

import pytest
import torch

from helpers.lean_ranges import values_recorded
from helpers.numerics import assert_matches, mismatches
from helpers.sp_cases import FORWARD_CASES, forward_inputs, run_case, stock_patchers


@pytest.fixture(scope="module")
def lean(pack):
    return importlib.import_module("ltxav_pack.lean_attention")


@pytest.fixture(scope="module")
def rope(pack):
    return importlib.import_module("ltxav_pack.models.ltx_rope")


def deferred_tables(dm, rope, case="fwd_t2v", shape="even"):
    """The RotaryTables of one forward's positions (video, video cross, audio, audio cross), and the tables
    ComfyUI's own code makes from them."""
    kw = forward_inputs(dm, shape, case)
    x = kw.pop("x")
    (vx, ax), coords, _ = dm._process_input(x, None, kw.get("denoise_mask"), **{k: v for k, v in kw.items()
                                                                                  if k == "ref_audio"})
    tables = rope.deferred(dm._prepare_positional_embeddings)(coords, 25, vx.dtype)
    direct = dm._prepare_positional_embeddings(coords, 25, vx.dtype)
    return [t for pair in tables for t in pair], [t for pair in direct for t in pair]


def grids_with_two_samples(table):
    """The table's positions for two samples whose positions differ (the second shifted by half a cell)."""
    grid = table.grid
    return torch.cat([grid, grid + 0.5], dim=0)


@pytest.mark.quick
@pytest.mark.parametrize("case", ["fwd_t2v", "fwd_ref_audio"])
def test_rotary_rows_equal_comfyuis_to_the_bit(ltx, rope, small_ranges, case):
    """Every range of every deferred table (video, audio and both cross tables) equals the same rows of
    ComfyUI's own table, by the per-axis gather (not the direct fallback)."""
    model, _, _, _ = ltx
    dm = model.model.diffusion_model
    tables, direct = deferred_tables(dm, rope, case)
    assert len(tables) == 4 and all(isinstance(t, rope.RotaryTable) for t in tables)
    for table, (cos, sin, split) in zip(tables, direct):
        n = table.tokens
        for start, end in [(0, n), (0, 7), (7, 14), (n - 5, n), (3, 4)]:
            got = table.rows(start, end)
            assert got[2] == split
            want = (cos[:, :, start:end], sin[:, :, start:end]) if split else (cos[:, start:end], sin[:, start:end])
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (start, end)
        assert isinstance(table._gather, rope._Gather)


@pytest.mark.quick
def test_rotary_rows_per_sample_and_interleaved(comfy, rope, small_ranges, tmp_path):
    """Samples with different positions, and the interleaved layout (rope_type 'interleaved'), gather
    ComfyUI's rows too."""
    from helpers.tiny_ltxav import write_tiny_ltxav

    path = tmp_path / "interleaved.safetensors"
    write_tiny_ltxav(path, rope_type="interleaved")
    dm = comfy.sd.load_diffusion_model(str(path)).model.diffusion_model
    tables, _ = deferred_tables(dm, rope)
    for table in tables:
        two = rope.RotaryTable(table.make, (grids_with_two_samples(table), *table.args[1:]), table.kwargs)
        want = table.make(two.grid, *table.args[1:], **table.kwargs)
        got = two.rows(0, two.tokens)
        assert not got[2] and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert isinstance(two._gather, rope._Gather)


@pytest.mark.quick
def test_a_wrong_layout_is_caught_and_rows_stay_exact(ltx, rope, small_ranges, monkeypatch, caplog):
    """The twin: a gather with the axes' columns one place off differs from ComfyUI's rows; the layout
    check sees it, warns, and the table makes its ranges with ComfyUI's own function (still exact)."""
    model, _, _, _ = ltx
    dm = model.model.diffusion_model
    real = rope._Gather.__init__

    def shifted(self, table):
        real(self, table)
        self.cos, self.sin = self.cos[1:] + self.cos[:1], self.sin[1:] + self.sin[:1]  # axis a gets a+1's values

    tables, direct = deferred_tables(dm, rope)
    gather = rope._Gather(tables[0])
    monkeypatch.setattr(rope._Gather, "__init__", shifted)
    wrong = rope._Gather(tables[0])
    assert torch.equal(gather.rows(0, 9)[0], direct[0][0][:, :, :9])
    assert not torch.equal(wrong.rows(0, 9)[0], direct[0][0][:, :, :9])
    tables, direct = deferred_tables(dm, rope)
    got = tables[0].rows(0, 9)
    assert tables[0]._gather is False and "table layout is not the one" in caplog.text
    assert torch.equal(got[0], direct[0][0][:, :, :9]) and torch.equal(got[1], direct[0][1][:, :, :9])


@pytest.fixture(scope="module")
def stock_forward(comfy, tiny_ckpts):
    patchers = stock_patchers(comfy, tiny_ckpts)

    @functools.cache
    def result(version, case, dtype=torch.float32):
        return run_case(patchers[version, dtype], case, "even", {})

    return result, patchers


def lean_run(lean, patcher, case):
    """``run_case`` with the lean attention: a direct forward gets its wrapper in its transformer_options,
    a sampling run through the patcher (``lean_attention.on``, as the one-GPU path adds it)."""
    from comfy.patcher_extension import WrappersMP

    if case in FORWARD_CASES:
        to = {"wrappers": {WrappersMP.DIFFUSION_MODEL: {lean.WRAPPER_KEY: [lean.diffusion_model_wrapper]}}}
        return run_case(patcher, case, "even", to)
    with lean.on(patcher):
        return run_case(patcher, case, "even", {})


@contextlib.contextmanager
def in_place(obj, name, args_tensor):
    """Record, for each call of ``obj.name`` on a long sequence, whether its result is its input's buffer
    (``args_tensor(args)``: the input)."""
    real = getattr(obj, name)
    seen = []

    def recorded(*args, **kwargs):
        out = real(*args, **kwargs)
        x = args_tensor(args)
        if x.dim() == 3 and x.shape[1] > 11:
            seen.append(out.data_ptr() == x.data_ptr())
        return out

    setattr(obj, name, recorded)
    try:
        yield seen
    finally:
        setattr(obj, name, real)


@contextlib.contextmanager
def counting(obj, name):
    """Count the calls of ``obj.name`` (a class attribute) inside the ``with``."""
    real = getattr(obj, name)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    setattr(obj, name, counted)
    try:
        yield calls
    finally:
        setattr(obj, name, real)


@pytest.mark.parametrize("version", ["2", "2.3"], ids=["ltx2", "ltx23"])
@pytest.mark.parametrize("case", FORWARD_CASES + ["ks_i2v", "ks_guide_attenuated"])
def test_lean_forward_equals_stock(stock_forward, lean, rope, small_ranges, version, case):
    """One forward (text-to-video, video only, image-to-video, reference audio) or two KSampler steps at
    cfg 3 (image-to-video, an attenuated guide: the masked attention path) with the lean attention equal
    stock's; the rotary tables are never made whole and queries and projections go by ranges."""
    result, patchers = stock_forward
    with counting(rope.RotaryTable, "whole") as whole, counting(rope._Gather, "rows") as ranges, \
            counting(lean.ffn_chunking, "chunked_forward") as projections, \
            in_place(rope.RotaryTable, "rotate", lambda a: a[1]) as rotated, \
            in_place(lean, "attention_into_query", lambda a: a[1]) as attended, values_recorded(lean) as values:
        got = lean_run(lean, patchers[version, torch.float32], case)
    assert not whole and ranges and projections
    # long queries and keys are normalised and rotated in their projection's buffer, the attention
    # output lands in the queries' (unless a mask asks for the plain call), and self-attention's values
    # in the normed hidden state's
    assert rotated and all(rotated) and attended and any(attended) and values and all(values)
    assert_matches(got, result(version, case), result(version, case, torch.float64), f"{version} {case}")


@pytest.mark.parametrize("version", ["2", "2.3"], ids=["ltx2", "ltx23"])
def test_lean_forward_under_inference_mode_equals_stock(stock_forward, lean, rope, small_ranges, version):
    """As ComfyUI runs nodes (inside ``torch.inference_mode()``): the values, rotations and outputs still go into
    their buffers and the forward equals stock's."""
    result, patchers = stock_forward
    with torch.inference_mode(), values_recorded(lean) as values:
        got = lean_run(lean, patchers[version, torch.float32], "fwd_t2v")
    assert values and all(values)
    assert_matches(got, result(version, "fwd_t2v"), result(version, "fwd_t2v", torch.float64), version)


def test_value_in_place_twin_needs_the_gate_taken_first(stock_forward, lean, rope, small_ranges):
    """The twin: LTX-2.3's gate logits read from the attention's input after its value went there fail."""
    result, patchers = stock_forward
    with values_recorded(lean, keep_gate=False) as values:
        got = lean_run(lean, patchers["2.3", torch.float32], "fwd_t2v")
    assert values and all(values)
    assert mismatches(got, result("2.3", "fwd_t2v"), result("2.3", "fwd_t2v", torch.float64))


@pytest.mark.quick
def test_values_go_in_place_only_under_comfyuis_own_blocks(ltx, lean):
    """Values go into their input only in ComfyUI's own blocks and attention class: not when a patch
    replaces blocks, another node pack changed a block's forward or an attention's class; the planner
    counts it the same way."""
    from comfy.ldm.lightricks.model import CrossAttention

    model, _, _, _ = ltx
    dm = model.model.diffusion_model
    fam = importlib.import_module("ltxav_pack.models").family_of(dm, "test")
    blocks = list(dm.transformer_blocks)
    assert fam.in_place_values(dm, {}) == [a for b in blocks for a in (b.attn1, b.audio_attn1)]
    assert lean.values_in_place(dm, fam, {})
    replaced = {"patches_replace": {"dit": {("double_block", 0): lambda args, extra: args}}}
    assert fam.in_place_values(dm, replaced) == [] and not lean.values_in_place(dm, fam, replaced)
    first = blocks[0]

    class Other(CrossAttention):
        pass
    try:
        first.forward = first.forward
        assert first.attn1 not in fam.in_place_values(dm, {}) and blocks[1].attn1 in fam.in_place_values(dm, {})
        del first.forward
        first.audio_attn1.__class__ = Other
        got = fam.in_place_values(dm, {})
        assert first.attn1 in got and first.audio_attn1 not in got
    finally:
        vars(first).pop("forward", None)
        first.audio_attn1.__class__ = CrossAttention


def test_lean_forward_twin_sees_a_lost_range(stock_forward, lean, rope, small_ranges, monkeypatch):
    """The twin: a rotation that leaves the last range of tokens unrotated fails the same check."""
    from comfy.ldm.lightricks import model as ltx_model

    result, patchers = stock_forward
    real = ltx_model.apply_rotary_emb
    n = rope.CHUNK_TOKENS

    def skip_last(x, table):
        return x.clone() if x.shape[1] < n else real(x, table)

    monkeypatch.setattr(ltx_model, "apply_rotary_emb", skip_last)
    got = lean_run(lean, patchers["2", torch.float32], "fwd_t2v")
    assert mismatches(got, result("2", "fwd_t2v"), result("2", "fwd_t2v", torch.float64))


@pytest.mark.quick
def test_attention_into_query_writes_the_query_buffer(lean, monkeypatch):
    """Long queries go a range at a time into q's own buffer (equal to the whole call); a shared buffer,
    a mask or a short sequence get the plain call."""
    from comfy.ldm.modules.attention import attention_basic

    monkeypatch.setattr(lean, "QUERY_CHUNK_TOKENS", 5)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 23, 12, generator=g, dtype=torch.float64) for _ in range(3))
    want = attention_basic(q, k, v, 3)
    got = lean.attention_into_query(attention_basic, q.clone(), k, v, 3)
    assert got.data_ptr() != want.data_ptr() and torch.allclose(got, want, rtol=0, atol=1e-12)
    qq = q.clone()
    assert lean.attention_into_query(attention_basic, qq, k, v, 3).data_ptr() == qq.data_ptr()
    shared = torch.randn(2, 23, 36, generator=g, dtype=torch.float64)
    a, b, c = shared.split(12, dim=-1)
    out = lean.attention_into_query(attention_basic, a, b, c, 3)
    assert out.data_ptr() not in {a.data_ptr(), b.data_ptr(), c.data_ptr()}


@pytest.mark.quick
def test_planner_counts_the_query_range_the_attention_uses(lean):
    """The planner's range term is the attention's query range (a change to one without the other fails)."""
    mp = importlib.import_module("ltxav_pack.memory_plan")
    assert mp.LEAN_RANGE_TOKENS == lean.QUERY_CHUNK_TOKENS
