"""xfuser's long-context attention through the pack's kernel, on CPU processes (gloo), against full
attention: Ulysses, ring and hybrid degrees, with and without padding. Needs no ComfyUI host."""
import importlib
import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from helpers.comfy_host import import_pack
from helpers.numerics import assert_matches, mismatches

if importlib.util.find_spec("xfuser") is None:  # (importing xfuser itself fails without a GPU)
    pytest.skip("xfuser not installed (pip install xfuser==0.4.5)", allow_module_level=True)


def _modules():
    """The pack's sequence-parallel names used here, from their modules, as one namespace."""
    import types

    names = {}
    for module in ("xdit_context_parallel", "sequence_parallel.groups", "sequence_parallel.layout",
                   "sequence_parallel.attention", "sequence_parallel.constants", "models.ltxav"):
        names.update(vars(importlib.import_module(f"ltxav_pack.{module}")))
    return types.SimpleNamespace(**names)


def _rank(rank, world, ulysses, ring, n_tokens, init_file, out_dir):
    torch.set_num_threads(1)
    import_pack(run_init=False)
    sp = _modules()
    sp.init_process_groups(rank, world, sp.Degrees(ulysses, ring), "gloo", f"file://{init_file}")
    try:
        par = sp.SequenceParallel()
        g = torch.Generator().manual_seed(0)
        b, h, d, t = 2, 4, 8, 7
        q, k, v = (torch.randn(b, n_tokens, h, d, generator=g) for _ in range(3))
        aq = torch.randn(b, t, h, d, generator=g)
        layout = sp.ShardLayout(n_tokens, world, rank)
        lq, lk, lv = (layout.take(x).clone() for x in (q, k, v))
        lk[:, layout.real:] = float("nan")
        par.kernel.padding = layout.pad > 0
        out = par.attention(None, lq, lk, lv)
        full = layout.gather(out, par.group)
        # audio queries over sharded video keys: each rank's partial softmax, merged
        o, lse = sp.attention_with_lse(aq, layout.take(k)[:, :layout.real], layout.take(v)[:, :layout.real])
        outs = [torch.empty_like(o) for _ in range(world)]
        lses = [torch.empty_like(lse) for _ in range(world)]
        torch.distributed.all_gather(outs, o, group=par.group)
        torch.distributed.all_gather(lses, lse, group=par.group)
        merged = None
        m_lse = None
        for oo, ll in zip(outs, lses):
            merged, m_lse = par.merge(merged, m_lse, oo, ll)
        torch.save({"self": full, "cross": merged.to(aq.dtype), "q": q, "k": k, "v": v, "aq": aq},
                   Path(out_dir) / f"{rank}.pt")
    finally:
        sp.destroy_process_groups()


def sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                            v.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("world,ulysses,ring,n", [
    (2, 2, 1, 16), pytest.param(2, 2, 1, 15, marks=pytest.mark.quick), (2, 1, 2, 15), (3, 1, 3, 17), (4, 2, 2, 18),
    (4, 4, 1, 13),
])
def test_long_context_attention_matches_full_attention(world, ulysses, ring, n):
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(world, ulysses, ring, n, os.path.join(tmp, "init"), tmp), nprocs=world,
                           start_method="spawn")
        res = [torch.load(Path(tmp) / f"{r}.pt") for r in range(world)]
    q, k, v, aq = (res[0][name] for name in ("q", "k", "v", "aq"))
    want_self, want_cross = sdpa(q, k, v), sdpa(aq, k, v)  # full attention, float32
    ref_self, ref_cross = sdpa(q.double(), k.double(), v.double()), sdpa(aq.double(), k.double(), v.double())
    for r in res:
        assert_matches(r["self"], want_self, ref_self, "self-attention")
        assert_matches(r["cross"], want_cross, ref_cross, "merged cross-attention")
    # the twin: one rank's merged partial off by 2^-10 in scale fails the same check
    shard = -(-n // world)
    wrong = res[0]["self"].clone()
    wrong[:, :shard] *= 1 + 2 ** -10
    assert mismatches(wrong, want_self, ref_self)


@pytest.mark.quick
def test_shard_layout():
    import_pack()
    sp = _modules()
    layout = [sp.ShardLayout(10, 4, r) for r in range(4)]
    assert [(x.start, x.real, x.local, x.pad) for x in layout] == [(0, 3, 3, 2), (3, 3, 3, 2), (6, 3, 3, 2),
                                                                   (9, 1, 3, 2)]
    t = torch.arange(10).view(1, 10)
    assert layout[3].take(t).tolist() == [[9, 9, 9]]
    with pytest.raises(ValueError, match="the video has 5 tokens, too few to split over 4 GPUs"):
        sp.ShardLayout(5, 4, 0).check()


def test_distinct_values():
    import_pack()
    sp = _modules()
    t = torch.tensor([[0.7, 0.0, 0.7, 0.7], [0.5, 0.5, 0.5, 0.5]])
    values, index = sp.distinct_values(t)
    assert values.shape == (2, 2)
    assert torch.equal(values.gather(1, index), t)


def test_run_constants_reuse_a_tensor_only_while_it_is_unchanged():
    """The meta device stands in for the GPU: what matters is which device tensor comes back."""
    import_pack()
    sp = _modules()
    kept = sp.RunConstants()
    meta = torch.device("meta")
    host = torch.arange(6).view(1, 2, 3)
    first = kept.on(meta, "positions", host)
    assert first.device == meta
    assert kept.on(meta, "positions", host.clone()) is first  # equal values: the same device copy
    assert kept.on(meta, "grid", host) is not first  # another key: its own copy
    changed = host.clone()
    changed[0, 0, 0] = 7
    second = kept.on(meta, "positions", changed)
    assert second is not first
    assert kept.on(meta, "positions", host.view(2, 3)) is not second  # same values, other shape
    third = kept.on(meta, "positions", host)
    third.add_(1)  # written in place on the device: never handed out again
    assert kept.on(meta, "positions", host) is not third
    fourth = kept.on(meta, "positions", host)
    kept.clear()
    assert kept.on(meta, "positions", host) is not fourth
    assert kept.on(torch.device("cpu"), "positions", host) is host  # already there: no copy
    made = []

    def make():
        made.append(torch.zeros(3))
        return made[-1]

    a = kept.host("grid", make)
    assert kept.host("grid", make) is a and len(made) == 1
    a[0] = 1.0  # written by whoever got it: made again
    assert kept.host("grid", make) is not a and len(made) == 2
    assert kept.host("other", make) is made[-1] and len(made) == 3


def test_has_spatial_variation_reads_like_comfyuis_per_frame_loop():
    import_pack()
    sp = _modules()

    def comfy_loop(mask):  # av_model.LTXAVModel._process_input, as ComfyUI writes it
        for f in range(mask.shape[2]):
            m = mask[0, 0, f]
            if m.numel() > 0 and m.min() != m.max():
                return True
        return False

    per_frame = torch.ones(1, 1, 4, 3, 5)
    per_frame[:, :, 0] = 0
    inpaint = per_frame.clone()
    inpaint[0, 0, 2, 1, 3] = 0.5
    other_sample = per_frame.repeat(2, 1, 1, 1, 1)
    other_sample[1, 0, 1, 0, 0] = 0.0  # only the first sample is looked at
    nan = per_frame.clone()
    nan[0, 0, 3, 0, 0] = float("nan")
    for mask in (per_frame, inpaint, other_sample, nan, torch.ones(1, 1, 4, 1, 1), torch.ones(1, 1, 2, 0, 3)):
        assert sp.has_spatial_variation(mask) == comfy_loop(mask)
    assert sp.has_spatial_variation(inpaint) and not sp.has_spatial_variation(per_frame)
