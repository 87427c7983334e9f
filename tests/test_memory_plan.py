"""The memory planner against the committed GPU measurements, and its search helpers (no host needed)."""
import importlib
import json
from pathlib import Path

import pytest

from helpers.comfy_host import import_pack

import_pack()
mp = importlib.import_module("ltxav_pack.memory_plan")
LTXAV = importlib.import_module("ltxav_pack.models.ltxav").LTXAV()  # the family: its planner numbers, its geometry
RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def ltx2_dims(**kw) -> "mp.ModelDims":
    """LTX-2's hidden sizes with the family's planner numbers (and ``kw``'s weights)."""
    return mp.ModelDims(video_dim=4096, audio_dim=2048, planner=LTXAV.planner, **kw)


LTX2 = ltx2_dims()
from_pixels = LTXAV.geometry.clip


pytestmark = pytest.mark.quick  # the whole module is in the fast subset


def test_clip_from_pixels():
    clip = from_pixels(897, 768, 512)
    assert (clip.latent_frames, clip.latent_height, clip.latent_width) == (113, 16, 24)
    assert clip.video_tokens == 43392 and clip.frames == 897 and clip.audio_tokens == 897
    longer = clip.with_latent_frames(226)
    assert longer.video_tokens == 2 * 43392 and longer.audio_tokens == 2 * 897


def test_auto_ffn_chunks():
    # short sequences are not chunked; long ones get <= FFN_MAX_TOKENS_PER_CHUNK tokens a chunk
    assert mp.auto_ffn_chunks(4096, 1000, None) == 1
    assert mp.auto_ffn_chunks(43392, 1000, None) == 11
    # 43392 tokens x 64 KiB = 2.65 GiB of hidden activations: with 4 GiB free (share 0.5 GiB) the token
    # cap (11) still decides; with 1 GiB free (share 128 MiB) memory does (22)
    assert mp.auto_ffn_chunks(43392, 65536, 4 * 2**30) == 11
    assert mp.auto_ffn_chunks(43392, 65536, 1 * 2**30) == 22
    assert mp.auto_ffn_chunks(10**7, 65536, 2**20) == mp.FFN_MAX_CHUNKS


def jsonl_rows(pattern):
    """(path, record) for every line of the committed JSON-lines results whose name matches ``pattern``."""
    for path in sorted(RESULTS.glob(pattern)):
        for line in path.read_text().splitlines():
            yield path, json.loads(line)


def sequence_parallel_rows():
    for path, row in jsonl_rows("*-sequence_parallel*.jsonl"):
        frames, w, h = (int(v) for v in row["case"].split("x"))
        if frames >= 497 and row["ffn"] == "auto" and not row.get("error"):  # long clips: what the plan is for
            yield pytest.param(row, id=f"{path.stem[11:]}-W{row['world']}u{row['ulysses']}r{row['ring']}-"
                                      f"{row['case']}-i2v{row['i2v']}")


@pytest.mark.parametrize("row", list(sequence_parallel_rows()))
def test_estimate_matches_measured_peaks(row):
    """Within 10% of every long-clip peak measured on the H200s (activations only: these runs hold
    4 to 48 layers of weights, which the plan counts exactly). The ``before-q-buffer`` file predates
    the attention output going into q's buffer (W > 1 peaks then were up to half a hidden vector per
    token higher)."""
    frames, w, h = (int(v) for v in row["case"].split("x"))
    est = mp.estimate(LTX2, from_pixels(frames, w, h), world=row["world"], ring=row["ring"],
                      per_token_timesteps=bool(row["i2v"]))
    measured = max(row["per_rank_peak_over_weights_gb"]) * mp.GIB
    assert abs(est.total - measured) <= 0.10 * measured, (est.describe(), measured / mp.GIB)


def long_video_rows():
    for path in sorted(RESULTS.glob("*-long_video*.json")):
        for row in json.loads(path.read_text())["tries"]:
            if row.get("ok"):
                yield pytest.param(row, id=f"{path.stem[11:]}-W{row['world']}-{row['frames']}")


def meta_ltx2(dtype, operations):
    """ComfyUI's LTXAVModel at LTX-2 dims, 48 layers, on the meta device (no memory)."""
    from comfy.ldm.lightricks.av_model import LTXAVModel

    return LTXAVModel(num_layers=48, dtype=dtype, device="meta", operations=operations, rope_type="split",
                      frequencies_precision="float64", num_attention_heads=32, attention_head_dim=128,
                      cross_attention_dim=4096, audio_num_attention_heads=32, audio_attention_head_dim=64,
                      audio_cross_attention_dim=2048, caption_channels=3840)


@pytest.fixture(scope="module")
def ltx2_fp8_dims(comfy):
    """The planner's view of the benchmark's model: LTX-2 with fp8 weights and the operations ComfyUI picks
    for them."""
    import comfy.ops
    import torch

    model = meta_ltx2(torch.float8_e4m3fn, comfy.ops.pick_operations(torch.float8_e4m3fn, torch.bfloat16))
    return LTXAV.plan_dims(model, compute_dtype=torch.bfloat16)


@pytest.mark.parametrize("row", list(long_video_rows()))
def test_estimate_matches_long_video_runs(row, ltx2_fp8_dims):
    """Within 10% of every completed fp8 48-layer forward of the 24 GB benchmark, weights included."""
    assert ltx2_fp8_dims.weight_bytes == row["plan_dims"]["weight_bytes"]  # the model the benchmark ran
    est = mp.estimate(ltx2_fp8_dims, mp.Clip(**row["clip"]), world=row["world"], ring=row["ring"])
    measured = max(row["per_rank_peak_gb"]) * mp.GIB
    assert abs(est.total - measured) <= 0.10 * measured, (est.describe(), measured / mp.GIB)


def real_path_rows(in_process=False):
    """The parallel sampler's runs through ComfyUI's loader and sampler (bench/comfy_long_video.py) that
    record the planner's parts. On Ray workers (``in_process`` False): each worker's activation peak
    above its forward's start, by PyTorch's allocator. In ComfyUI's process (gpus=1, True): the peak
    above the sampling's start by the benchmark's own count (the node counts it only with memory logs on),
    which also holds what DynamicVRAM keeps of the weights. Clips whose peak is under 1 GiB (the
    host-memory runs' 97 frames) are left out: there the weights, not the activations, decide what fits."""
    for path, row in jsonl_rows("*-comfy_long_video*.jsonl"):
        # code that has changed since; the lean attention's runs have their own checks (lean_rows)
        if "before" in path.stem or "expandable-segments" in path.stem or "-lean-" in path.stem:
            continue
        if row.get("gguf"):  # ComfyUI-GGUF's loader: every weight on the GPU, not what these rows measure
            continue
        if (row.get("kind") == "run" and row.get("ok") and row.get("planned_parts_gib")
                and bool(row.get("in_comfyui_process")) == in_process
                and (row["torch_max_allocated_gb"] if in_process
                     else min(w["peak_gib"] for w in row["worker_memory"])) >= 1):
            yield pytest.param(row, id=f"{path.stem[11:]}-{row['variant']}-{row['frames']}x{row['res']}-"
                                      f"{row['weights']}-cfg{row['cfg']:g}")


def streamed_rows():
    """Runs in ComfyUI's process that left no weight on the GPU (the longest clips: DynamicVRAM streamed
    every block), where the sampling's peak is what the planner's whole figure counts."""
    return [p for p in real_path_rows(in_process=True) if p.values[0]["weights_on_gpu_gb_after"] == 0]


@pytest.mark.parametrize("row", list(real_path_rows()))
def test_estimate_matches_real_path_peaks(row):
    """The planner's activations (video and audio tokens) within 10% of each worker's peak above the
    forward's start, measured on an emulated 16 or 24 GiB card through ComfyUI's own loader, DynamicVRAM
    and sampler (fp8 and bf16, 768x512 and 1920x1088, cfg 1 and 3). The weights it counts are what must
    stay on the GPU while DynamicVRAM streams the rest: DynamicVRAM keeps more when there is room, so
    they are not compared here; every such run fitted its card."""
    parts = row["planned_parts_gib"]
    planned = parts["video tokens"] + parts["audio tokens"]
    for worker in row["worker_memory"]:
        assert abs(planned - worker["peak_gib"]) <= 0.10 * worker["peak_gib"], (parts, worker)
    assert row["planned_peak_gib"] <= row["card_gb"]


def stock_rows():
    """Stock ComfyUI's runs (with and without the LTX FFN Chunker) of the 48-layer checkpoints at cfg 1 on
    an emulated card with DynamicVRAM: clips it ran and clips it ran out of memory on."""
    for path, row in jsonl_rows("*-comfy_long_video*.jsonl"):
        if (row.get("kind") == "run" and row["variant"] in ("stock", "ffn-chunker") and row.get("layers") == 48
                and row.get("dynamic_vram") and not row.get("gguf") and row.get("cfg", 1.0) in (None, 1.0)
                and row.get("card_gb") and (row.get("ok") or row.get("oom"))):
            yield pytest.param(row, id=f"{path.stem[11:]}-{row['variant']}-{row['frames']}x{row['res']}-"
                                      f"{row['weights']}")


@pytest.fixture(scope="module")
def checkpoint_dims(comfy):
    """The planner's view of the benchmark's checkpoints (bench/comfy_long_video.py): ComfyUI's LTXAVModel
    at LTX-2 dims, 48 layers, built on the meta device with the file's dtypes (bf16; ``fp8``: the blocks'
    linear weights in float8_e4m3fn), computing in bf16."""
    import comfy.ops
    import torch

    def dims(weights):
        dm = meta_ltx2(torch.bfloat16, comfy.ops.disable_weight_init)
        if weights == "fp8":
            for m in dm.transformer_blocks.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight = torch.nn.Parameter(torch.empty(m.weight.shape, dtype=torch.float8_e4m3fn, device="meta"),
                                                  requires_grad=False)
        return LTXAV.plan_dims(dm, compute_dtype=torch.bfloat16)

    return {"fp8": dims("fp8"), "bf16": dims("bf16")}


def plan_of(row, dims, chunker=True, lean=False, world=1, lean_value=False, in_place=False):
    """The current planner's figure for a run, as the node plans gpus=1 in ComfyUI's process at cfg 1
    (``lean``: with the lean attention, the node's default; the runs before it were planned without;
    ``lean_value``: with self-attention's value in its input's buffer, the runs of ``-value-`` files), or
    one of ``world`` workers as the driver plans it (``in_place``: Ulysses' exchange in q's, k's and v's own
    buffers, the runs of ``-inplace-`` files)."""
    w, h = (int(v) for v in row["res"].split("x"))
    clip = mp.Clip(row["latent_frames"], h // 32, w // 32, row["audio_tokens"])
    return mp.estimate(dims, clip, world=world, ffn_chunks=None if chunker else 1, sampler=True,
                       per_token_timesteps=True, streaming=True, lean=lean, lean_value=lean_value, in_place=in_place)


def check_plan_matches_streamed_run(row, est):
    """The planner's whole figure within 10% of what PyTorch's allocator and DynamicVRAM held: PyTorch's
    peak above the sampling's start plus DynamicVRAM's use (the streamed blocks live outside PyTorch)."""
    held = row["torch_max_allocated_gb"] + row["aimdo_total_vram_usage_gb"]
    assert abs(est.total / mp.GIB - held) <= 0.10 * held, (est.describe(), held)


@pytest.mark.parametrize("row", streamed_rows())
def test_plan_matches_streamed_runs_in_comfyuis_process(row, checkpoint_dims):
    """gpus=1 samples in ComfyUI's process: at the card's edge, with every weight streamed (fp8 and bf16,
    16 and 24 GiB, both sizes), the current planner's whole figure (streamed blocks, casts, activations,
    sampler state) against what was held. Its activations are the ones the node planned in that run."""
    est = plan_of(row, checkpoint_dims[row["weights"]])
    for part in ("video tokens", "audio tokens", "sampler state"):
        assert est.parts[part] / mp.GIB == pytest.approx(row["planned_parts_gib"][part], abs=1e-3)
    check_plan_matches_streamed_run(row, est)


def test_streamed_check_catches_a_plan_that_keeps_every_weight(checkpoint_dims):
    """The twin: the same runs planned as if every weight stayed on the GPU (no streaming) fail it."""
    rows = streamed_rows()
    assert {p.values[0]["weights"] for p in rows} == {"fp8", "bf16"}
    for param in rows:
        row = param.values[0]
        whole = plan_of(row, checkpoint_dims[row["weights"]])
        whole.parts["weights"] = checkpoint_dims[row["weights"]].weight_bytes
        with pytest.raises(AssertionError):
            check_plan_matches_streamed_run(row, whole)


def check_accepts_what_stock_ran(rows, plan):
    """Every clip stock ComfyUI ran on its emulated card fits the planner's figure for it (the node refuses
    only what stock could not run either), and some clips stock ran out of memory on are refused."""
    refused_ooms = 0
    for row in rows:
        total = plan(row).total / mp.GIB
        if row.get("ok"):
            assert total <= row["comfy_free_at_start_gb"], (row["frames"], row["res"], row["weights"], total)
        else:
            refused_ooms += total > row["comfy_free_at_start_gb"]
    assert refused_ooms >= 2


def test_planner_accepts_every_clip_stock_ran(checkpoint_dims):
    """Stock's runs through ComfyUI on emulated 16 and 24 GiB cards (fp8 and bf16, both sizes; H100 and
    H200): the current planner, as the node plans gpus=1 with the same chunker setting, accepts each clip
    stock ran and refuses clips stock ran out of memory on (3,801 frames fp8 on 16 GiB, 1,097 at 1920x1088)."""
    rows = [p.values[0] for p in stock_rows()]
    assert {(r["weights"], r["card_gb"], r["res"]) for r in rows if r.get("ok")} >= {
        (w, c, res) for w in ("fp8", "bf16") for c in (16.0, 24.0) for res in ("768x512", "1920x1088")}
    check_accepts_what_stock_ran(rows, lambda r: plan_of(r, checkpoint_dims[r["weights"]], r["variant"] != "stock"))


def test_accept_check_catches_the_previous_streaming_plan(checkpoint_dims):
    """The twin: the streaming plan of the code up to this change (two blocks plus every weight outside the
    blocks, one linear's cast) refused bf16 clips stock ran (1,097 frames at 1920x1088 on 24 GiB)."""
    def before(row):
        dims = checkpoint_dims[row["weights"]]
        est = plan_of(row, dims, row["variant"] != "stock")
        est.parts["weights"] = 2 * dims.block_bytes + dims.weight_bytes - dims.blocks_bytes
        est.parts["weight casts"] = dims.cast_bytes
        return est

    with pytest.raises(AssertionError):
        check_accepts_what_stock_ran([p.values[0] for p in stock_rows()], before)


def test_real_path_check_catches_a_planner_off_by_a_pass():
    """The twin: the plan of the code before the batching rule (it counted both passes of cfg 3 in one
    forward, where ComfyUI ran them one after the other) is outside the 10%."""
    path = RESULTS / "2026-12-04-h200-comfy_long_video-card24-fp8-cfg3-planner-before-batching-rule.jsonl"
    row = next(r for r in map(json.loads, path.read_text().splitlines()) if r.get("planned_parts_gib"))
    with pytest.raises(AssertionError):
        test_estimate_matches_real_path_peaks(row)


def test_real_path_results_are_there():
    """The check above has runs to check: 16 and 24 GiB cards, fp8 and bf16, both sizes, cfg 3."""
    rows = [p.values[0] for p in real_path_rows()]
    assert {r["card_gb"] for r in rows} == {16.0, 24.0} and {r["weights"] for r in rows} == {"fp8", "bf16"}
    assert {r["res"] for r in rows} == {"768x512", "1920x1088"} and 3.0 in {r["cfg"] for r in rows}
    assert {r.values[0]["res"] for r in streamed_rows()} == {"768x512", "1920x1088"}


def test_fp8_weights_count_their_cast():
    fp8 = ltx2_dims(weight_bytes=19 * mp.GIB, cast_bytes=16384 * 4096 * 2)
    clip = from_pixels(897, 768, 512)
    assert mp.estimate(fp8, clip).parts["weight casts"] == 128 * 2**20
    assert mp.estimate(fp8, clip).total - mp.estimate(LTX2, clip).total == 19 * mp.GIB + 128 * 2**20


def test_more_workers_less_memory_and_ring_costs_more():
    clip = from_pixels(897, 1280, 704)
    peaks = [mp.estimate(LTX2, clip, world=w).total for w in (1, 2, 4, 8)]
    assert peaks == sorted(peaks, reverse=True)
    assert mp.estimate(LTX2, clip, world=4, ring=2).total > mp.estimate(LTX2, clip, world=4).total


def test_unchunked_ffn_sets_the_peak():
    clip = from_pixels(897, 768, 512)
    assert mp.estimate(LTX2, clip, ffn_chunks=1).total > mp.estimate(LTX2, clip).total


def test_largest_latent_frames_is_the_edge():
    dims = ltx2_dims(weight_bytes=18 * mp.GIB, cast_bytes=256 << 20)
    clip = from_pixels(121, 768, 512)
    budget = int(24e9)
    for world in (1, 2, 4):
        n = mp.largest_latent_frames(budget, dims, clip, world=world)
        assert n > 0
        assert mp.estimate(dims, clip.with_latent_frames(n), world=world).total <= budget
        assert mp.estimate(dims, clip.with_latent_frames(n + 1), world=world).total > budget
    assert mp.largest_latent_frames(10 * mp.GIB, dims, clip) == 0  # the weights alone do not fit


def test_smallest_world():
    dims = ltx2_dims(weight_bytes=18 * mp.GIB)
    clip = from_pixels(1601, 768, 512)
    w = mp.smallest_world(int(24e9), dims, clip, max_world=8, video_heads=32)
    assert w is not None and w > 1
    assert mp.estimate(dims, clip, world=w).total <= int(24e9) < mp.estimate(dims, clip, world=w // 2).total
    assert mp.smallest_world(10 * mp.GIB, dims, clip, max_world=8, video_heads=32) is None


def test_streamed_weights_are_two_blocks_and_their_casts(checkpoint_dims):
    """The LTXAV family's ModelDims of LTX-2 at real dims (48 layers, built on the meta device): under
    streaming two blocks as stored count, and for fp8 four blocks' linears cast to bf16; the parts outside
    the blocks do not."""
    fp8, bf16 = checkpoint_dims["fp8"], checkpoint_dims["bf16"]
    for dims in (fp8, bf16):
        assert dims.blocks_bytes == 48 * dims.block_bytes  # every block the same size
        assert dims.streamed_weight_bytes == 2 * dims.block_bytes < dims.weight_bytes / 20
    assert fp8.block_cast_bytes == 736 << 20 and bf16.block_cast_bytes == 0  # one block's linears in bf16
    assert bf16.block_bytes - fp8.block_bytes == fp8.block_cast_bytes // 2  # those linears, 2 bytes against 1
    assert fp8.streamed_cast_bytes == 4 * fp8.block_cast_bytes and bf16.streamed_cast_bytes == 0
    assert bf16.cast_bytes == 0 and fp8.cast_bytes == 16384 * 4096 * 2  # the FFN's widest linear


def test_streaming_accepts_weights_larger_than_the_card_and_refuses_what_activations_cannot():
    """fp8 LTX-2 (19 GiB of weights) on a 16 GB card: refused whole, accepted streamed; and a clip whose
    activations alone exceed the card is refused either way."""
    dims = ltx2_dims(weight_bytes=19 * mp.GIB, cast_bytes=128 << 20, block_bytes=380 << 20,
                        blocks_bytes=48 * (380 << 20))
    budget = int(16e9)
    short = from_pixels(121, 768, 512)
    assert mp.estimate(dims, short).total > budget
    assert mp.estimate(dims, short, streaming=True).total <= budget
    assert mp.largest_latent_frames(budget, dims, short) == 0
    longest = mp.largest_latent_frames(budget, dims, short, streaming=True)
    assert longest > 0
    too_long = short.with_latent_frames(longest + 1)
    assert mp.estimate(dims, too_long, streaming=True).total > budget


@pytest.mark.parametrize("doc,table", [("README.md", "USER"), ("docs/development.md", "DEVELOPER")])
def test_docs_list_every_environment_variable(pack, doc, table):
    """The README's table is envs.USER and docs/development.md's envs.DEVELOPER, row for row, and the two
    are every variable; a variable added or changed in code without its document (the twin: one default
    changed) does not match."""
    envs = importlib.import_module("ltxav_pack.envs")
    text = (Path(__file__).resolve().parents[1] / doc).read_text()
    variables = getattr(envs, table)
    assert envs.table_markdown(variables) in text
    assert set(envs.USER) | set(envs.DEVELOPER) == set(envs.TABLE) and len(envs.TABLE) == len(set(envs.TABLE))
    changed = envs.table_markdown(variables).replace(f"| {variables[0].default or 'unset'} |", "| 601 |", 1)
    assert changed != envs.table_markdown(variables) and changed not in text


def lean_rows(value=None):
    """The parallel sampler's runs in ComfyUI's process with the lean attention (gpus=1, 8 and 48 layers),
    at the current code: files named ``-lean-`` without an earlier commit in their name; ``row["value"]``:
    self-attention's value went into its input's buffer (``-value-`` files), ``value`` picks those or the
    others (None: all)."""
    for path, row in jsonl_rows("*-comfy_long_video-lean-*.jsonl"):
        if (row.get("kind") == "run" and row["variant"] == "parallel-chunker" and "-402d28f" not in path.stem
                and row.get("in_comfyui_process", True) and value in (None, "-value-" in path.stem)):
            yield dict(row, value="-value-" in path.stem)


def test_lean_plan_matches_its_runs_and_refuses_what_ran_out_of_memory(checkpoint_dims):
    """With the lean attention (one H100, 24 GiB emulated, fp8): where a clip ran, the planner's figure
    less what lives outside PyTorch's allocator (the streamed blocks, the allocator's pool) is within 10%
    of PyTorch's peak; every clip that ran out of memory (7,801 and 8,301 frames at 768x512, 1,601 at
    1920x1088; with the value in place 9,601, and 1,801 at 1920x1088) is refused against the free memory it had,
    and every clip that ran (5,201, 7,401; with the value in place 5,201 and 8,301, and 1,681 at 1920x1088) is
    accepted. Clips the planner refused in the run itself measured nothing and are left out."""
    rows = list(lean_rows())
    assert {r["ok"] for r in rows} == {True, False} and {r["res"] for r in rows} == {"768x512", "1920x1088"}
    assert {r["frames"] for r in rows if r["value"] and r["ok"]} == {1681, 5201, 8301}
    assert any(r["value"] and r["oom"] and r["res"] == "1920x1088" for r in rows)
    for row in rows:
        est = plan_of(row, checkpoint_dims[row["weights"]], lean=True, lean_value=row["value"])
        free = row["at_sampling_start"]["device_free_gb"]
        if row["ok"]:
            in_torch = (est.total - est.parts["weights"] - est.parts["allocator pool"]) / mp.GIB
            assert abs(in_torch - row["torch_max_allocated_gb"]) <= 0.10 * row["torch_max_allocated_gb"], (
                row["frames"], est.describe())
            assert est.total / mp.GIB <= free, (row["frames"], est.describe())
        elif row["oom"]:
            assert est.total / mp.GIB > free, (row["frames"], row["res"], est.describe())


def test_value_plan_check_catches_the_plan_without_the_value_term(checkpoint_dims):
    """The twin: planned without the value in its input's buffer, 8,301 frames (which ran with it) miss its
    PyTorch peak by more than 10% and are refused against the free memory they had."""
    row = next(r for r in lean_rows(value=True) if r["ok"] and r["frames"] == 8301)
    est = plan_of(row, checkpoint_dims[row["weights"]], lean=True)
    in_torch = (est.total - est.parts["weights"] - est.parts["allocator pool"]) / mp.GIB
    assert abs(in_torch - row["torch_max_allocated_gb"]) > 0.10 * row["torch_max_allocated_gb"]
    assert est.total / mp.GIB > row["at_sampling_start"]["device_free_gb"]


def test_lean_plan_check_catches_the_plan_without_the_lean_attention(checkpoint_dims):
    """The twin: the same runs planned with ComfyUI's own attention memory (rotary tables, new outputs)
    miss the peak of the clip that ran by more than 10%."""
    row = next(r for r in lean_rows(value=False) if r["ok"])
    est = plan_of(row, checkpoint_dims[row["weights"]], lean=False)
    in_torch = (est.total - est.parts["weights"]) / mp.GIB
    assert abs(in_torch - row["torch_max_allocated_gb"]) > 0.10 * row["torch_max_allocated_gb"]


def test_lean_plan_refusal_needs_the_pool_allowance(checkpoint_dims):
    """The twin: without the allocator's pool the planner would accept 7,801 frames, which ran out of memory."""
    row = next(r for r in lean_rows() if not r["ok"] and r["frames"] == 7801)
    est = plan_of(row, checkpoint_dims[row["weights"]], lean=True)
    assert (est.total - est.parts["allocator pool"]) / mp.GIB <= row["at_sampling_start"]["device_free_gb"]


def lean_worker_rows():
    """The lean attention's runs on several Ray workers sharing one GPU over gloo, each capped at its card's
    size (``-lean-workers2-`` files: two workers on one H100, 24 and 16 GiB, fp8 and bf16, 768x512 and
    1920x1088, 2 layers), that ran; ``checked``: the planner's check was on (it accepted them); ``value``: with
    self-attention's value in its input's buffer (``-value-``); ``in_place``: Ulysses' exchange in q's, k's and
    v's own buffers (``-inplace-``)."""
    for path, row in jsonl_rows("*-comfy_long_video-lean-workers*.jsonl"):
        if row.get("kind") == "run" and row.get("ok") and row.get("worker_memory"):
            yield pytest.param(row, "unchecked" not in path.stem, "-value-" in path.stem, "-inplace-" in path.stem,
                               id=f"{path.stem[11:]}-{row['frames']}x{row['res']}-{row['weights']}")


def activations_gib(est):
    return (est.parts["video tokens"] + est.parts["audio tokens"]) / mp.GIB


@pytest.mark.parametrize("row,checked,value,in_place", list(lean_worker_rows()))
def test_lean_plan_matches_several_workers(row, checked, value, in_place, checkpoint_dims):
    """With the lean attention on several workers the planner's activations (video and audio tokens) are within
    10% of every worker's peak above its forward's start (PyTorch's allocator), and every clip that ran with the
    check on is accepted against the worker's share less its CUDA context (``value``: the runs with
    self-attention's value in its input's buffer, planned with it; ``in_place``: Ulysses' exchange in place)."""
    est = plan_of(row, checkpoint_dims[row["weights"]], lean=True, world=row["gpus"], lean_value=value,
                  in_place=in_place)
    for worker in row["worker_memory"]:
        assert abs(activations_gib(est) - worker["peak_gib"]) <= 0.10 * worker["peak_gib"], (est.describe(), worker)
    if checked:
        assert est.total <= row["card_gb"] * mp.GIB - mp.CUDA_CONTEXT_BYTES, est.describe()


@pytest.mark.quick
def test_in_place_exchange_plans_no_send_buffer(checkpoint_dims):
    """Where Ulysses' exchange goes in q's, k's and v's own buffers (a power of two of ranks, Ulysses alone, tokens
    that divide them) the plan drops the send buffer (``lean_exchange`` hidden vectors a local token) and counts
    the two staging buffers; elsewhere it keeps it."""
    assert [mp.exchange_in_place(*a) for a in ((2, 1, 96), (4, 1, 96), (8, 1, 96), (1, 1, 96), (3, 1, 96),
                                                (2, 2, 96), (4, 1, 90))] == [True, True, True, False, False,
                                                                             False, False]
    dims = checkpoint_dims["fp8"]
    clip = mp.Clip(1646, 16, 24, 13161)
    kw = dict(world=2, sampler=True, per_token_timesteps=True, streaming=True, lean=True, lean_value=True)
    auto, send = mp.estimate(dims, clip, **kw), mp.estimate(dims, clip, in_place=False, **kw)
    local = clip.video_tokens // 2
    dropped = send.parts["video tokens"] - auto.parts["video tokens"]
    assert dropped == pytest.approx(dims.planner.lean_exchange * local * dims.vector, abs=2)
    assert auto.parts["exchange buffers"] == 2 * mp.SWAP_STAGING_BYTES and send.parts["exchange buffers"] == 0
    three = {**kw, "world": 3}  # not a power of two: the send buffer
    assert mp.estimate(dims, clip, **three).parts == mp.estimate(dims, clip, in_place=False, **three).parts


def test_in_place_plan_check_catches_the_send_buffer(checkpoint_dims):
    """The twin of the in-place rows: 15,025 frames on two workers with Ulysses' exchange in place, planned with
    the send buffer instead, miss the workers' peak by more than 10% and are refused against their share."""
    row = next(p.values[0] for p in lean_worker_rows() if p.values[3] and p.values[1])
    assert row["frames"] == 15025
    est = plan_of(row, checkpoint_dims[row["weights"]], lean=True, world=row["gpus"], lean_value=True, in_place=False)
    peak = row["worker_memory"][0]["peak_gib"]
    assert abs(activations_gib(est) - peak) > 0.10 * peak
    assert est.total > row["card_gb"] * mp.GIB - mp.CUDA_CONTEXT_BYTES


def test_lean_plan_for_several_workers_fails_with_the_unmeasured_exchange(checkpoint_dims):
    """The twin: with Ulysses' exchange as it was planned before any several-worker run (1.5 hidden vectors a
    local token) the activations miss a measured worker peak by more than 10%."""
    import dataclasses

    row = next(p.values[0] for p in lean_worker_rows() if p.values[0]["frames"] == 11001 and not p.values[2])
    dims = checkpoint_dims[row["weights"]]
    old = dataclasses.replace(dims, planner=dataclasses.replace(dims.planner, lean_exchange=1.5))
    peak = row["worker_memory"][0]["peak_gib"]
    assert abs(activations_gib(plan_of(row, old, lean=True, world=row["gpus"])) - peak) > 0.10 * peak
