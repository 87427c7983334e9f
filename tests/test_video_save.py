"""LTXAV Save Video and LTXAV Decode Video against stock ComfyUI on a tiny LTX-2 / LTX-2.3 checkpoint's
VAEs (tests/helpers/tiny_vae.py): the streamed decode's frames against VAEDecodeTiled's with the same
tiles (float frames by the float64-reference rule, 8-bit frames at most one level off on a small
fraction), the audio against LTXVAudioVAEDecode's, the file against Save Video's (frames, rate,
durations), the parts two CPU workers decode against the whole decode, the segments they send them in
joined in order (and their temporary files removed however the save ends), bad inputs and Interrupt."""
import errno
import importlib
import io
import math
import os
from fractions import Fraction

import pytest
import torch

from helpers.numerics import assert_matches, mismatches
from helpers.video_files import read_video

pytestmark = pytest.mark.usefixtures("ray_stopped_after_module")

LATENT_FRAMES, HEIGHT, WIDTH = 12, 3, 5  # latent: 89 frames of 160x96
SEGMENTED = 24  # latent frames of the segment tests: 185 frames, parts longer than x264's delay (about 50 frames)
TILED = (128, 32, 48, 16)  # VAEDecodeTiled settings: 2 spatial tiles, 3 temporal tiles with a 9-frame feather
WHOLE = (0, 64, 0, 8)  # the node's defaults: one tile
LEVEL_FRACTION = 1e-3  # 8-bit frames: at most one level off on at most this share of the values


@pytest.fixture(scope="module", autouse=True)
def caches_emptied_after_module():
    """The stock results and latents kept for the module's tests go with it (not at interpreter exit,
    when ComfyUI's patchers can no longer detach)."""
    yield
    _STOCK.clear()
    _LATENTS.clear()


@pytest.fixture(scope="module")
def ckpts(comfy, tmp_path_factory):
    """{version: checkpoint path} with transformer, video VAE and audio VAE."""
    from helpers.tiny_vae import write_tiny_checkpoint

    folder = tmp_path_factory.mktemp("vae_ckpt")
    out = {}
    for version in ("2", "2.3"):
        out[version] = folder / f"tiny_ltxav_vae_{version}.safetensors"
        write_tiny_checkpoint(out[version], version)
    return out


@pytest.fixture(scope="module")
def vaes(ckpts):
    """{version: (video VAE float32, video VAE float64, audio VAE)}, loaded as the stock loaders load them."""
    from helpers.tiny_vae import load_vaes

    out = {}
    for version, path in ckpts.items():
        video, audio = load_vaes(path)
        out[version] = (video, load_vaes(path, dtype=torch.float64)[0], audio)
    return out


@pytest.fixture(autouse=True)
def three_latent_frames_a_step(video_mod, monkeypatch):
    """Decode steps of 3 latent frames (the tiny frames would take a whole tile a step): several steps a tile,
    ending at other places than the tiles do."""
    plan = importlib.import_module("ltxav_pack.decode_plan")
    monkeypatch.setattr(plan, "STEP_BYTES", 3 * plan.TIME_SCALE * plan.SPACE_SCALE ** 2 * HEIGHT * WIDTH * 3)


@pytest.fixture(scope="module")
def video_mod(pack):
    import importlib

    return (importlib.import_module("ltxav_pack.video_decode"), importlib.import_module("ltxav_pack.video_save"),
            importlib.import_module("ltxav_pack.video_file"), importlib.import_module("ltxav_pack.nodes_video"))


_LATENTS = {}


def latents(frames=LATENT_FRAMES, height=HEIGHT, width=WIDTH, seed=0):
    """A video latent and its audio latent (as LTXVEmptyLatentAudio sizes it for 25 fps), random; the same
    tensors for the same arguments."""
    key = (frames, height, width, seed)
    if key not in _LATENTS:
        _LATENTS[key] = _latents(*key)
    return _LATENTS[key]


def _latents(frames, height, width, seed):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(1, 128, frames, height, width, generator=g)
    audio = torch.randn(1, 8, math.ceil(((frames - 1) * 8 + 1) / 25 * 25), 16, generator=g)
    return video, audio


def av_latent(video, audio):
    from comfy_extras.nodes_lt import LTXVConcatAVLatent

    return LTXVConcatAVLatent.execute({"samples": video}, {"samples": audio, "type": "audio"})[0]


_STOCK = {}


def stock_frames(vae, video, settings):
    """VAEDecodeTiled's IMAGE for the node's tile settings (0: as large as the frame / clip); kept for the
    module's other tests of the same VAE, latent and settings."""
    key = (id(vae), video.data_ptr(), tuple(video.shape), settings)
    if key not in _STOCK:
        _STOCK[key] = (vae, video, _stock_frames(vae, video, settings))
    return _STOCK[key][2]


def _stock_frames(vae, video, settings):
    import nodes

    tile, overlap, temporal, temporal_overlap = settings
    tile = tile or 32 * max(video.shape[-2:])
    temporal = temporal or 8 * video.shape[2]
    with torch.inference_mode():
        return nodes.VAEDecodeTiled().decode(vae, {"samples": video}, tile, overlap, temporal, temporal_overlap)[0]


def as_saved(images):
    """Frames as Save Video converts them before encoding."""
    return (images * 255).clamp(0, 255).byte()


def assert_levels(got, want, what=""):
    """8-bit frames: same shape, at most one level apart, on at most LEVEL_FRACTION of the values."""
    assert got.shape == want.shape and got.dtype == want.dtype == torch.uint8, (got.shape, want.shape)
    diff = (got.int() - want.int()).abs()
    off = (diff > 0).float().mean().item()
    assert diff.max().item() <= 1 and off <= LEVEL_FRACTION, \
        f"{what}: {diff.max().item()} levels apart at most, {off:.2e} of the values differ"


def streamed(video_mod, vae, video, settings, frames=None, as_uint8=False, halo=None, sliced=False):
    """The streamed decode of ``frames``; ``sliced``: from only the latent frames a worker gets for them
    (``PartJob.of``), as a worker decodes its part."""
    vd, vs, _, _ = video_mod
    plan = vs.plan_for(vae, video, vs.Settings(25.0, *settings))
    if halo is not None:
        import dataclasses

        plan = dataclasses.replace(plan, halo=halo)
    latent, first = video, 0
    if sliced:
        job = importlib.import_module("ltxav_pack.video_parts").PartJob.of(video, plan, frames, 25.0)
        latent, first = job.latent, job.latent_start
    with torch.inference_mode():
        vs.load_vae_here(vae, plan)
        return torch.cat(list(vd.decode_chunks(vae, latent, plan, frames, as_uint8=as_uint8,
                                               latent_start=first))), plan


@pytest.mark.quick
@pytest.mark.parametrize("settings", [WHOLE, TILED, (256, 64, 32, 8), (64, 0, 4096, 8)],
                         ids=["whole", "tiled", "time-tiles", "no-overlap"])
def test_plan_places_tiles_as_vaedecodetiled(video_mod, vaes, settings, monkeypatch):
    """The plan's tiles are where stock VAEDecodeTiled decodes them (its decode recorded, not run)."""
    vd, vs, _, _ = video_mod
    vae = vaes["2"][0]
    video = torch.zeros(1, 128, LATENT_FRAMES, HEIGHT, WIDTH)
    for i, n in enumerate(video.shape[2:]):  # each latent position's coordinates, read back by the recorder
        video[:, i] = torch.arange(n, dtype=torch.float32).view([-1 if d == i else 1 for d in range(3)])
    seen = []

    def record(x, **kw):
        seen.append((int(x[0, 0, 0, 0, 0]), x.shape[2], int(x[0, 1, 0, 0, 0]), x.shape[3], int(x[0, 2, 0, 0, 0]),
                     x.shape[4]))
        return torch.zeros(vae.first_stage_model.decode_output_shape(x.shape))

    monkeypatch.setattr(vae.first_stage_model, "decode", record)
    stock_frames(vae, video, settings)
    plan = vs.plan_for(vae, video, vs.Settings(25.0, *settings))
    want = [(t, tn, y, h, x, w) for t, tn in plan.time.tiles for (y, h), (x, w) in plan.spatial_tiles]
    assert seen == want
    assert plan.whole == (len(want) == 1)


@pytest.mark.parametrize("version", ["2", "2.3"], ids=["ltx2", "ltx23"])
@pytest.mark.parametrize("settings", [WHOLE, TILED], ids=["whole", "tiled"])
def test_streamed_decode_equals_vaedecodetiled(video_mod, vaes, version, settings):
    """The frames, decoded a few latent frames at a time, equal VAEDecodeTiled's with the same tiles: the
    float frames by the float64-reference rule, the 8-bit frames Save Video would encode at most one level
    off on a small fraction of the values."""
    vae, vae64, _ = vaes[version]
    video, _ = latents()
    got, plan = streamed(video_mod, vae, video, settings)
    assert plan.whole == (settings == WHOLE) and plan.step == 3
    want = stock_frames(vae, video, settings)
    assert_matches(got, want, stock_frames(vae64, video, settings), f"{version} {settings}")
    assert_levels(as_saved(got), as_saved(want), f"{version} {settings}")


def test_streamed_decode_in_bfloat16_equals_vaedecodetiled(video_mod, ckpts, vaes):
    """The video VAE in bfloat16, as ComfyUI loads it on a GPU: the streamed decode equals VAEDecodeTiled's in
    bfloat16 by the float64-reference rule and in 8-bit frames. The one-level bound is against stock in the
    same dtype: bfloat16's own rounding puts stock's frames more than one level from the float64 frames (on a
    GPU, against float32: bench/README.md, save_video.py's reference variant)."""
    from helpers.tiny_vae import load_vaes

    vae16 = load_vaes(ckpts["2"], dtype=torch.bfloat16)[0]
    assert vae16.vae_dtype == torch.bfloat16
    video, _ = latents()
    got, _ = streamed(video_mod, vae16, video, TILED)
    want, reference = stock_frames(vae16, video, TILED), stock_frames(vaes["2"][1], video, TILED)
    assert_matches(got, want, reference, "bfloat16", dtype=torch.bfloat16)
    assert_levels(as_saved(got), as_saved(want), "bfloat16")
    with pytest.raises(AssertionError, match="levels apart"):  # stock's own bf16 frames, against float64's
        assert_levels(as_saved(want), as_saved(reference), "stock in bfloat16")


@pytest.mark.quick
def test_frame_batches_follow_the_frame_size_and_leave_the_frames_as_they_are(video_mod, vaes, monkeypatch):
    """Frames are handed out in batches of at most 32 MiB of uint8 (16 frames at 768x512, 5 at 1920x1088, at
    least one): the frames are the same whatever the batch; the twin, the same batches out of order, differ."""
    vd = video_mod[0]
    assert [vd.batch_frames(h, w) for h, w in ((512, 768), (1088, 1920), (4320, 7680))] == [16, 5, 1]
    vae = vaes["2"][0]
    video, _ = latents()
    whole = streamed(video_mod, vae, video, TILED, as_uint8=True)[0]
    monkeypatch.setattr(vd, "BATCH_BYTES", 3 * HEIGHT * 32 * WIDTH * 32 * 3)
    plan = streamed(video_mod, vae, video, TILED, frames=(0, 1))[1]
    assert vd.batch_frames(plan.height, plan.width) == 3
    with torch.inference_mode():
        batches = list(vd.decode_chunks(vae, video, plan))
    assert len(batches) > 2 and {b.shape[0] for b in batches[:-1]} <= {1, 2, 3}
    assert torch.equal(torch.cat(batches), whole)
    assert not torch.equal(torch.cat(batches[1:] + batches[:1]), whole)


@pytest.mark.quick
def test_parts_with_context_equal_the_whole_decode(video_mod, vaes):
    """A worker's share (a frame range, decoded from only its latent frames and the decoder's receptive
    radius of context on both sides, as ``PartJob.of`` slices them) is the same as those frames of the whole
    decode: three parts put together equal stock. A slice short of that context is refused, by name."""
    vd = video_mod[0]
    vp = importlib.import_module("ltxav_pack.video_parts")
    vae, vae64, _ = vaes["2"]
    video, _ = latents(frames=SEGMENTED)
    plan = streamed(video_mod, vae, video, TILED, frames=(0, 1))[1]
    parts = plan.split(3)
    assert len(parts) == 3 and parts[0][0] == 0 and parts[-1][1] == plan.frames
    spans = [plan.latents_for(*p) for p in parts]  # the middle part's slice misses latent frames at both ends
    assert spans[0][0] == 0 and spans[-1][1] == video.shape[2] and 0 < spans[1][0] < spans[1][1] < video.shape[2]
    got = torch.cat([streamed(video_mod, vae, video, TILED, frames=p, sliced=True)[0] for p in parts])
    assert_matches(got, stock_frames(vae, video, TILED), stock_frames(vae64, video, TILED), "parts")
    job = vp.PartJob.of(video, plan, parts[1], 25.0)
    short = job.latent[:, :, 1:]
    with pytest.raises(ValueError, match=rf"frames {parts[1][0]}..{parts[1][1]} need latent frames {spans[1][0]}\.\."):
        next(vd.decode_chunks(vae, short, plan, parts[1], latent_start=job.latent_start + 1))


@pytest.mark.quick
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_part_job_travels_without_its_latent(video_mod, vaes, dtype):
    """``PartJob.for_ray``: the job's pickle holds the latent's shape and dtype only, the latent goes as an
    array of its bytes (Ray hands a worker a read-only view of its object store), and ``with_latent`` on the
    worker's side gives back the same latent, bit for bit, in its dtype (bfloat16 has no NumPy dtype). The
    twin: one byte changed in the array shows in the latent."""
    vp = importlib.import_module("ltxav_pack.video_parts")
    mt = importlib.import_module("ltxav_pack.model_transfer")
    video = latents(frames=SEGMENTED)[0].to(dtype)
    vs = video_mod[1]
    plan = vs.plan_for(vaes["2"][0], video, vs.Settings(25.0, *TILED))
    job = vp.PartJob.of(video, plan, plan.split(3)[1], 25.0)
    light, array = job.for_ray()
    data = mt.dumps(light, {})
    assert light.latent.device.type == "meta" and len(data) < job.latent.numel() * job.latent.element_size() // 4
    array.flags.writeable = False
    back = mt.loads(data, {}).with_latent(array)
    assert back.latent.dtype == dtype and back.latent.shape == job.latent.shape and torch.equal(back.latent, job.latent)
    assert (back.plan, back.latent_start, back.fps) == (job.plan, job.latent_start, job.fps)
    changed = array.copy()
    changed[len(changed) // 2] ^= 0x40
    assert not torch.equal(light.with_latent(changed).latent, job.latent)


def test_parts_without_context_differ(video_mod, vaes):
    """The twin: parts decoded with one latent frame of context instead of the receptive radius fail the
    same checks (the decoder sees the part's ends as the clip's)."""
    vae, vae64, _ = vaes["2"]
    video, _ = latents(frames=SEGMENTED)
    plan = streamed(video_mod, vae, video, TILED, frames=(0, 1))[1]
    assert plan.halo > 1
    parts = plan.split(3)
    got = torch.cat([streamed(video_mod, vae, video, TILED, frames=p, halo=1, sliced=True)[0] for p in parts])
    want = stock_frames(vae, video, TILED)
    assert mismatches(got, want, stock_frames(vae64, video, TILED))
    with pytest.raises(AssertionError, match="levels apart"):
        assert_levels(as_saved(got), as_saved(want), "parts without context")


def saved_file(entry_ui, folder):
    item = entry_ui["images"][0]
    return os.path.join(folder, item["subfolder"], item["filename"]), item


def stock_save(vae, audio_vae, video, audio, settings, path, fps=25.0):
    """VAEDecodeTiled -> LTXVAudioVAEDecode -> CreateVideo -> SaveVideo's file (Save Video's own writer);
    returns the IMAGE and AUDIO."""
    from comfy_api.latest import InputImpl, Types
    from comfy_extras.nodes_lt_audio import LTXVAudioVAEDecode

    images = stock_frames(vae, video, settings)
    with torch.inference_mode():
        sound = LTXVAudioVAEDecode.execute({"samples": audio}, audio_vae).result[0]
    InputImpl.VideoFromComponents(Types.VideoComponents(images=images, audio=sound, frame_rate=Fraction(fps))).save_to(
        str(path))
    return images, sound


def assert_frames_in_order(decoded, sent):
    """Each frame read back from the file is nearer the frame sent at its place than its neighbours (the
    parts are joined in order, none lost or repeated)."""
    assert decoded.shape == sent.shape
    err = lambda i, j: (decoded[i].float() - sent[j].float()).abs().mean().item()  # noqa: E731
    for i in range(len(sent)):
        near = [j for j in (i - 1, i + 1) if 0 <= j < len(sent)]
        assert all(err(i, i) < err(i, j) for j in near), f"frame {i} of the file is not the frame sent there"


@pytest.mark.parametrize("version", ["2", "2.3"], ids=["ltx2", "ltx23"])
def test_save_node_in_comfyuis_process_equals_stock_chain(video_mod, vaes, version, tmp_path, monkeypatch):
    """gpus=1: the frames handed to the encoder equal stock's 8-bit frames, the audio LTXVAudioVAEDecode's,
    and the file has Save Video's frame count, rate and durations (audio cut to the video's length)."""
    import folder_paths

    _, vs, vf, nodes_video = video_mod
    vae, _, audio_vae = vaes[version]
    video, audio = latents()
    sent, audio_sent = [], []
    real_add, real_init = vf.VideoWriter.add_frames, vf.VideoWriter.__init__

    def add_frames(self, frames):
        sent.append(frames.clone())
        return real_add(self, frames)

    def init(self, *args, **kw):
        real_init(self, *args, **kw)
        audio_sent.append(self.audio)

    monkeypatch.setattr(vf.VideoWriter, "add_frames", add_frames)
    monkeypatch.setattr(vf.VideoWriter, "__init__", init)
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    with torch.inference_mode():
        out = nodes_video.LTXAVSaveVideo.execute(av_latent(video, audio), vae, 25.0, "video/ltxav", "auto", "auto", 1,
                                                 audio_vae=audio_vae)
    path, item = saved_file(out.ui.as_dict(), tmp_path)
    assert item["type"] == "output" and item["subfolder"] == "video" and item["filename"].endswith(".mp4")
    images, sound = stock_save(vae, audio_vae, video, audio, WHOLE, tmp_path / "stock.mp4")
    got = torch.cat(sent)
    assert_levels(got, as_saved(images), "frames sent to the encoder")
    waveform, rate, _ = audio_sent[0]
    want = sound["waveform"][0, :, :math.ceil(sound["sample_rate"] / Fraction(25) * images.shape[0])]
    assert rate == sound["sample_rate"] and torch.equal(waveform, want)
    mine, stock = read_video(path), read_video(tmp_path / "stock.mp4")
    assert mine[:5] == stock[:5]
    assert mine[0] == images.shape[0] == 89 and mine[1] == 25 and mine[2] == pytest.approx(89 / 25)
    assert mine[3] == pytest.approx(89 / 25, abs=0.05) and mine[4] == {"2": 24000, "2.3": 48000}[version]
    assert_frames_in_order(mine[5], got)


def test_decode_node_equals_vaedecodetiled(video_mod, vaes):
    """LTXAV Decode Video's IMAGE is VAEDecodeTiled's (same tiles), by the float64-reference rule."""
    nodes_video = video_mod[3]
    vae, vae64, _ = vaes["2"]
    video, audio = latents()
    with torch.inference_mode():
        got = nodes_video.LTXAVDecodeVideo.execute(av_latent(video, audio), vae, *TILED).result[0]
    assert got.dtype == torch.float32
    assert_matches(got, stock_frames(vae, video, TILED), stock_frames(vae64, video, TILED), "decode node")


@pytest.mark.quick
def test_bad_inputs_name_the_node_and_the_input(video_mod, vaes, tmp_path, monkeypatch):
    import folder_paths

    nodes_video = video_mod[3]
    vae, _, audio_vae = vaes["2"]
    video, audio = latents(frames=2)
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    save = nodes_video.LTXAVSaveVideo.execute
    with pytest.raises(ValueError, match=r"LTXAV Save Video: the latent has audio, but input 'audio_vae' is not"):
        save(av_latent(video, audio), vae, 25.0, "v", "auto", "auto", 1)
    with pytest.raises(ValueError, match=r"LTXAV Save Video: input 'latent' holds 2 clips"):
        save({"samples": video.repeat(2, 1, 1, 1, 1)}, vae, 25.0, "v", "auto", "auto", 1)
    with pytest.raises(ValueError, match=r"LTXAV Save Video: input 'latent' holds a \[1, 8, 9, 16\] tensor"):
        save({"samples": audio}, vae, 25.0, "v", "auto", "auto", 1)
    with pytest.raises(ValueError, match=r"LTXAV Save Video: input 'vae' is not an LTX video VAE \(AudioVAE\)"):
        save({"samples": video}, audio_vae, 25.0, "v", "auto", "auto", 1)
    with pytest.raises(ValueError, match=r"LTXAV Save Video: input 'audio_vae' is not an LTX-2 audio VAE"):
        save(av_latent(video, audio), vae, 25.0, "v", "auto", "auto", 1, audio_vae=vae)
    with pytest.raises(ValueError, match=r"LTXAV Save Video: input 'gpus' is -1"):
        save({"samples": video}, vae, 25.0, "v", "auto", "auto", -1)
    assert not list(tmp_path.rglob("*.mp4"))


def test_interrupt_leaves_no_file(video_mod, vaes, tmp_path, monkeypatch):
    """Interrupt stops the decode at its next step; the half-written file is removed."""
    import comfy.model_management
    import folder_paths

    nodes_video = video_mod[3]
    vae, _, audio_vae = vaes["2"]
    video, audio = latents()
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException), torch.inference_mode():
            nodes_video.LTXAVSaveVideo.execute(av_latent(video, audio), vae, 25.0, "v", "auto", "auto", 1,
                                               audio_vae=audio_vae)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not list(tmp_path.rglob("*.mp4"))


def test_two_workers_decode_parts_that_equal_stock(ps, video_mod, vaes, tmp_path, monkeypatch):
    """gpus=2 on CPU workers: each worker decodes and encodes one part; their frames equal stock's, the
    file joins the parts in order with the audio, and the VAE is sent once. The node with gpus 0 saves on
    the workers that run (none restart); with none running, in ComfyUI's process."""
    import folder_paths

    _, vs, vf, nodes_video = video_mod
    vae, vae64, audio_vae = vaes["2"]
    video, audio = latents()
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    # the frames each worker sends to its encoder: the same call, returning frames instead
    plan = vs.plan_for(vae, video, vs.Settings(25.0, *TILED))
    writer = vf.VideoWriter(io.BytesIO(), 25.0, plan.width, plan.height)
    parts = vs.save_on_workers(vae, video, plan, 25.0, 2, True, writer, frames=True)
    assert [(p.start, p.stop) for p in parts] == plan.split(2) and len(ps.POOL.group.actors) == 2
    for p in parts:  # each worker's host memory at its part's phases (what bench/save_video.py records)
        phases = p.host["anon_gib"]
        assert set(phases) == {"start", "vae_loaded", "first_batch", "batches_most", "end"}, phases
        assert all(v > 0 for v in phases.values()) and phases["batches_most"] >= phases["first_batch"], phases
    got = torch.cat([p.images for p in parts])
    images = stock_frames(vae, video, TILED)
    assert_levels(got, as_saved(images), "the workers' frames")
    key = vs.vae_key(vae)
    assert ps.POOL._wait([a.load_vae.remote(key) for a in ps.POOL.group.actors], "test", 60) == [True, True]
    with pytest.raises(ValueError, match=r"LTXAV Save Video: input 'gpus' asks for 99 CPU workers but the Ray cluster"):
        vs.save_on_workers(vae, video, plan, 25.0, 99, True, writer)
    assert len(ps.POOL.group.actors) == 2  # the workers are still there

    # gpus 0: the running workers save it (none restart), not ComfyUI's process; ComfyUI's models (the video
    # VAE stock_frames loaded) are unloaded, but the audio VAE the save used stays loaded, as stock's leaves it
    import comfy.model_management as mm

    group = ps.POOL.group
    monkeypatch.setattr(vs, "save_here", lambda *a, **k: pytest.fail("saved in ComfyUI's process"))
    with torch.inference_mode():
        out = nodes_video.LTXAVSaveVideo.execute(av_latent(video, audio), vae, 25.0, "video/ltxav", "auto", "auto", 0,
                                                 *TILED, audio_vae=audio_vae)
    assert ps.POOL.group is group
    assert [m.model for m in mm.current_loaded_models] == [audio_vae.patcher]
    path, _ = saved_file(out.ui.as_dict(), tmp_path)
    stock_save(vae, audio_vae, video, audio, TILED, tmp_path / "stock.mp4")
    mine, stock = read_video(path), read_video(tmp_path / "stock.mp4")
    assert mine[:5] == stock[:5]
    assert_frames_in_order(mine[5], got)
    assert vs.workers_for(0) == (2, True) and vs.workers_for(3) == (3, True)
    monkeypatch.setattr(ps.POOL, "group", None)  # no workers running: on --cpu, gpus 0 is ComfyUI's process
    assert vs.workers_for(0) == (0, True)


def spools(folder):
    """The save's temporary folders under ``folder`` (segments on their way into the file)."""
    return list(folder.rglob(".ltxav-parts-*"))


def test_a_worker_streams_its_part_and_answers_while_it_runs(ps, video_mod, vaes):
    """decode_part is a Ray streaming generator in the threaded actor: held after its first segment (Ray's
    backpressure, one item ahead, not taken), the worker still answers ``poll`` (part way through the frames)
    and ``interrupt`` from its other thread; taken on, the part ends with its segments so far and a PartResult
    marked interrupted (the segment being written dropped), and the worker takes the next call."""
    import ray

    vs = video_mod[1]
    vp = importlib.import_module("ltxav_pack.video_parts")
    mt = importlib.import_module("ltxav_pack.model_transfer")
    vae = vaes["2"][0]
    video, _ = latents(frames=SEGMENTED)
    plan = vs.plan_for(vae, video, vs.Settings(25.0, *TILED))
    group, key = vs.workers(2, True), vs.vae_key(vae)
    vs.hold_vae(group, vae)
    job = ray.put(mt.dumps(vp.PartJob(video, plan, 25.0, segment_bytes=1), {}))
    actor = group.actors[0]
    stream = actor.decode_part.options(_generator_backpressure_num_objects=1).remote(job, 0, plan.frames)
    assert ray.wait([stream], timeout=120)[0]
    step, _ = ray.get(actor.poll.remote(), timeout=30)
    assert 0 < step < plan.frames
    ray.get(actor.interrupt.remote(), timeout=30)
    *segments, result = [ray.get(ref) for ref in stream]
    assert segments and all(isinstance(s, vp.Segment) for s in segments) and segments[0].first_frame == 0
    assert isinstance(result, vp.PartResult) and result.interrupted and (result.start, result.stop) == (0, plan.frames)
    assert ps.POOL._wait([a.load_vae.remote(key) for a in group.actors], "test", 60) == [True, True]


def test_parts_arrive_in_segments_joined_in_order(ps, video_mod, vaes, tmp_path, monkeypatch):
    """gpus=2 with segments of one batch (SEGMENT_BYTES tiny; the job carries it to the workers): each part
    arrives as several standalone MP4s, each beginning with a keyframe, which wait in a temporary folder beside
    the file (gone after the save) and are joined in frame order: the file has stock's frame count, rate and
    durations, its frames in order. The twin: the same segments joined out of order give frames that are not."""
    import av
    import folder_paths

    _, vs, vf, nodes_video = video_mod
    vp = importlib.import_module("ltxav_pack.video_parts")
    vae, _, audio_vae = vaes["2"]
    video, audio = latents(frames=SEGMENTED)
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    monkeypatch.setattr(vp, "SEGMENT_BYTES", 1)  # a new segment after every batch that brought packets
    joined, spooled = [], []
    real_add = vf.VideoWriter.add_segment

    def add_segment(self, data, first_frame):
        joined.append((first_frame, data))
        spooled.append(len(spools(tmp_path)))
        return real_add(self, data, first_frame)

    monkeypatch.setattr(vf.VideoWriter, "add_segment", add_segment)
    with torch.inference_mode():
        out = nodes_video.LTXAVSaveVideo.execute(av_latent(video, audio), vae, 25.0, "video/ltxav", "auto", "auto", 2,
                                                 *TILED, audio_vae=audio_vae)
    path, _ = saved_file(out.ui.as_dict(), tmp_path)
    plan = vs.plan_for(vae, video, vs.Settings(25.0, *TILED))
    firsts = [f for f, _ in joined]
    assert firsts == sorted(firsts) and firsts[0] == 0
    for start, stop in plan.split(2):
        assert start in firsts and len([f for f in firsts if start <= f < stop]) >= 2, (start, stop, firsts)
    for _, data in joined:
        with av.open(io.BytesIO(data)) as c:
            assert next(p for p in c.demux(video=0) if p.dts is not None).is_keyframe
    assert spooled == [1] * len(joined) and not spools(tmp_path)
    stock_save(vae, audio_vae, video, audio, TILED, tmp_path / "stock.mp4")
    mine, stock = read_video(path), read_video(tmp_path / "stock.mp4")
    assert mine[:5] == stock[:5]
    sent = as_saved(stock_frames(vae, video, TILED))
    assert_frames_in_order(mine[5], sent)

    swapped = vf.VideoWriter(str(tmp_path / "swapped.mp4"), 25.0, plan.width, plan.height)
    frame = 0
    for _, data in [joined[1], joined[0], *joined[2:]]:
        frame += real_add(swapped, data, frame)
    swapped.close()
    twin = read_video(tmp_path / "swapped.mp4")
    assert twin[0] == mine[0]
    with pytest.raises(AssertionError, match="is not the frame sent there"):
        assert_frames_in_order(twin[5], sent)


@pytest.mark.parametrize("fault", ["interrupt", "worker dies", "disk full"])
def test_a_stopped_save_on_workers_leaves_no_segments(ps, video_mod, vaes, tmp_path, monkeypatch, fault):
    """When the first segment reaches ComfyUI's process, Interrupt is pressed, the other worker dies, or the
    segment cannot be written: the save raises InterruptProcessingException (the workers kept) or an error
    naming the node (the workers stopped), and the temporary folder, which was there, is gone with the file."""
    import comfy.model_management
    import folder_paths
    import ray

    _, vs, _, nodes_video = video_mod
    vp = importlib.import_module("ltxav_pack.video_parts")
    vae, _, audio_vae = vaes["2"]
    video, audio = latents(frames=SEGMENTED)
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    monkeypatch.setattr(vp, "SEGMENT_BYTES", 1)
    real_take, seen = vs.SegmentFiles.take, []

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def take(self, rank, item):
        if isinstance(item, vp.Segment) and not seen:
            seen.append((rank, self.folder, os.path.isdir(self.folder)))
            if fault == "interrupt":
                comfy.model_management.interrupt_current_processing(True)
            elif fault == "worker dies":
                ray.kill(ps.POOL.group.actors[1 - rank], no_restart=True)
            else:
                monkeypatch.setattr(vs, "open", no_space, raising=False)
        return real_take(self, rank, item)

    monkeypatch.setattr(vs.SegmentFiles, "take", take)
    want = {"interrupt": comfy.model_management.InterruptProcessingException, "worker dies": RuntimeError,
            "disk full": RuntimeError}[fault]
    try:
        with pytest.raises(want) as err, torch.inference_mode():
            nodes_video.LTXAVSaveVideo.execute(av_latent(video, audio), vae, 25.0, "video/ltxav", "auto", "auto", 2,
                                               *TILED, audio_vae=audio_vae)
    finally:
        interrupted = comfy.model_management.processing_interrupted()
        comfy.model_management.interrupt_current_processing(False)
    assert not interrupted
    rank, folder, existed = seen[0]
    assert existed and os.path.dirname(folder) == str(tmp_path / "video")
    assert not os.path.exists(folder) and not spools(tmp_path) and not list(tmp_path.rglob("*.mp4"))
    if fault == "interrupt":
        assert ps.POOL.group is not None
        return
    assert ps.POOL.group is None
    if fault == "worker dies":
        assert f"LTXAV Save Video: worker {1 - rank} (cpu) died during decoding" in str(err.value)
    else:
        assert "LTXAV Save Video: cannot write the workers' video to a temporary file in" in str(err.value)
        assert "No space left on device" in str(err.value) and "input 'gpus' 1" in str(err.value)


def test_save_node_through_the_server(server, ckpts):
    """POST /prompt: Load Checkpoint + LTXV Audio VAE Loader + empty latents -> LTXAV Save Video saves an
    MP4 in the output folder and reports it in the UI output as Save Video does."""
    import shutil

    (server.base / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(ckpts["2"], server.base / "models" / "checkpoints" / "tiny_ltxav_vae.safetensors")
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_ltxav_vae.safetensors"}},
        "2": {"class_type": "LTXVAudioVAELoader", "inputs": {"ckpt_name": "tiny_ltxav_vae.safetensors"}},
        "3": {"class_type": "EmptyLTXVLatentVideo", "inputs": {"width": 128, "height": 96, "length": 33,
                                                             "batch_size": 1}},
        "4": {"class_type": "LTXVEmptyLatentAudio", "inputs": {"frames_number": 33, "frame_rate": 25,
                                                             "batch_size": 1, "audio_vae": ["2", 0]}},
        "5": {"class_type": "LTXVConcatAVLatent", "inputs": {"video_latent": ["3", 0], "audio_latent": ["4", 0]}},
        "6": {"class_type": "LTXAVSaveVideo", "inputs": {"latent": ["5", 0], "vae": ["1", 2], "audio_vae": ["2", 0],
                                                       "fps": 25.0, "filename_prefix": "video/server",
                                                       "format": "auto", "codec": "auto", "gpus": 0}},
    }
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    item = entry["outputs"]["6"]["images"][0]
    assert item["type"] == "output" and item["subfolder"] == "video" and entry["outputs"]["6"]["animated"] == [True]
    frames, rate, seconds, audio_seconds, _, _ = read_video(server.base / "output" / "video" / item["filename"])
    assert (frames, rate) == (33, 25) and seconds == pytest.approx(33 / 25)
    assert audio_seconds == pytest.approx(33 / 25, abs=0.05)
