"""The parallel sampler nodes with real Ray actors (2 CPU workers, gloo) against the stock samplers
on the same tiny checkpoint, seed and inputs; worker reuse, reloads and LoRA changes, sockets,
interrupt and faults."""
import importlib
import logging
import os
import re
import signal
import threading
import time

import pytest
import torch

from helpers.comfy_host import make_latent
from helpers.comfy_server import is_loopback, listening_sockets, process_tree
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

pytestmark = pytest.mark.usefixtures("ray_stopped_after_module")


def test_ksampler_equals_stock_and_reuses_workers(ps, nodes_mod, tiny_model, tiny_model_f64, tiny_ckpt):
    cc = tiny_ckpt[1]["caption_channels"]
    want, reference = stock_ksampler(tiny_model, cc), stock_ksampler(tiny_model_f64, cc)
    got, ui = parallel_ksampler(nodes_mod, tiny_model, cc)
    assert_matches(got, want, reference)
    assert "LTXAV Parallel Sampler: 2 workers, Ulysses 2 x ring 1" in ui.value
    pids = [i["pid"] for i in worker_infos(ps)]
    got2, _ = parallel_ksampler(nodes_mod, tiny_model, cc)  # same model and settings: same workers, no reload
    assert_matches(got2, want, reference)
    infos = worker_infos(ps)
    assert [i["pid"] for i in infos] == pids and all(i["loads"] == 1 for i in infos)


@pytest.mark.quick
@pytest.mark.parametrize("ltx", ["2.3"], indirect=True)
def test_ltx23_ksampler_equals_stock(nodes_mod, ltx):
    """LTX-2.3 (gated attention, cross-attention adaLN, caption projection before the connectors)."""
    model, model_f64, width, _ = ltx
    got, ui = parallel_ksampler(nodes_mod, model, width)
    assert "LTXAV Parallel Sampler: 2 workers, Ulysses 2 x ring 1" in ui.value
    assert_equals_stock(got, model, model_f64, width)


def test_same_file_loaded_twice_is_not_reloaded(ps, nodes_mod, comfy, tiny_model_f64, tiny_ckpt):
    cc = tiny_ckpt[1]["caption_channels"]
    first = comfy.sd.load_diffusion_model(str(tiny_ckpt[0]))
    parallel_ksampler(nodes_mod, first, cc, steps=1)
    before = worker_infos(ps)
    second = comfy.sd.load_diffusion_model(str(tiny_ckpt[0]))  # ComfyUI ran the loader again: a new MODEL
    assert second is not first and second.patches_uuid != first.patches_uuid
    got, ui = parallel_ksampler(nodes_mod, second, cc)
    assert_equals_stock(got, second, tiny_model_f64, cc)
    after = worker_infos(ps)
    assert [i["loads"] for i in after] == [i["loads"] for i in before]  # no file read
    assert [(i["pid"], i["repatches"]) for i in after] == [(i["pid"], i["repatches"]) for i in before]
    assert re.search(r"model load [\d.]+ s \(kept; file reads \d+, patch changes \d+ on these workers\)", ui.value)


def test_lora_strength_change_reapplies_patches_without_reading_the_file(ps, nodes_mod, tiny_model, tiny_model_f64,
                                                                          tiny_ckpt, tmp_path):
    """As ComfyUI runs nodes (under torch.inference_mode(): the LoRA's tensors are inference tensors, which
    have no version counter): the same LoRA loaded again is kept on the workers, another strength is
    applied to the loaded weights without reading the file, and removing it brings the weights back."""
    import folder_paths
    import nodes

    from helpers.tiny_ltxav import write_lora

    write_lora(tiny_ckpt[0], ("transformer_blocks.0.ff.net.0.proj", "transformer_blocks.1.attn1.to_q"),
               tmp_path / "strength_lora.safetensors")
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    cc = tiny_ckpt[1]["caption_channels"]

    def lora(strength, model=tiny_model):  # a new loader each time: the LoRA file is read again, same content
        with torch.inference_mode():
            return nodes.LoraLoaderModelOnly().load_lora_model_only(model, "strength_lora.safetensors", strength)[0]

    def parallel(model):
        with torch.inference_mode():
            return parallel_ksampler(nodes_mod, model, cc)

    full, full_ref = stock_ksampler(lora(1.0), cc), stock_ksampler(lora(1.0, tiny_model_f64), cc)
    first = lora(1.0)
    assert next(iter(first.patches.values()))[0][1].weights[0].is_inference()  # what ComfyUI hands the sampler
    got, _ = parallel(first)
    assert_matches(got, full, full_ref)
    start = worker_infos(ps)
    got, ui = parallel(first)  # the same MODEL again (a second stage, or a new seed): nothing to redo
    assert_matches(got, full, full_ref)
    assert "(kept;" in ui.value and worker_infos(ps) == start
    got, ui = parallel(lora(1.0))  # the same LoRA loaded again: nothing to redo
    assert_matches(got, full, full_ref)
    assert "(kept;" in ui.value and worker_infos(ps) == start
    half, half_ref = stock_ksampler(lora(0.5), cc), stock_ksampler(lora(0.5, tiny_model_f64), cc)
    assert mismatches(full, half, half_ref)  # the strength matters: workers that kept 1.0 would fail the check
    got, ui = parallel(lora(0.5))
    assert_matches(got, half, half_ref)
    infos = worker_infos(ps)
    assert [i["loads"] for i in infos] == [i["loads"] for i in start]  # the file was not read again
    assert [i["repatches"] for i in infos] == [i["repatches"] + 1 for i in start]
    assert re.search(r"model load \d+\.\d+ s \(patches re-applied, file not read; file reads \d+, patch changes "
                     r"\d+ on these workers\)", ui.value), ui.value
    got, _ = parallel(tiny_model)  # the LoRA removed: the original weights are back
    assert_equals_stock(got, tiny_model, tiny_model_f64, cc)
    assert [i["loads"] for i in worker_infos(ps)] == [i["loads"] for i in start]


class RawQuantized(torch.Tensor):
    """Like ComfyUI-GGUF's GGMLTensor: a tensor subclass whose storage holds quantized bytes, with the
    quantization type and logical shape as attributes."""

    @staticmethod
    def __new__(cls, data, tensor_type, tensor_shape):
        t = data.as_subclass(cls)
        t.tensor_type, t.tensor_shape = tensor_type, tensor_shape
        return t


@pytest.mark.quick
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_content_digest_holds_for_every_tensor_kind_comfyui_hands_a_node(pack, comfy, monkeypatch):
    """A LoRA's patches give the same digest call after call and file read after file read, whatever kind
    of tensor holds them: made under torch.inference_mode() as ComfyUI runs nodes (no version counter),
    views, non-contiguous, quantized, a subclass with storage (GGUF-like) or a wrapper subclass
    (comfy-kitchen's fp8 QuantizedTensor); another strength or other bytes give another. The twin: the
    rule before (the tensor's version counter) fails the first check for inference tensors."""
    from comfy.weight_adapter.lora import LoRAAdapter
    from comfy_kitchen.tensor import QuantizedTensor

    keys = importlib.import_module("ltxav_pack.content_keys")
    digest = keys.content_digest

    def kinds(seed):  # what a LoRA loader would make from one file: equal bytes for equal seeds
        g = torch.Generator().manual_seed(seed)
        up, down, raw = torch.randn(8, 4, generator=g), torch.randn(4, 8, generator=g), torch.randn(8, 8, generator=g)
        fp8 = "TensorCoreFP8E4M3Layout"
        with torch.inference_mode():
            made = {"inference": up.clone(), "inference view": up.clone()[2:], "non-contiguous": up.clone().t(),
                    "strided": up.clone()[:, ::2], "inference fp8": QuantizedTensor.from_float(raw, fp8)}
        made |= {"plain": up.clone(), "quantized": torch.quantize_per_tensor(raw, 0.1, 0, torch.qint8),
                 "GGUF-like": RawQuantized(raw.view(torch.uint8), "Q8_0", (8, 4)),
                 "fp8": QuantizedTensor.from_float(raw, fp8)}
        return {k: (t, down) for k, t in made.items()}

    def patches(t, down, strength=1.0):
        return {"diffusion_model.x.weight": [(strength, LoRAAdapter(set(), (t, down, 2.0, None, None, None)), 1.0, None,
                                              None)]}

    first, again, other = kinds(1), kinds(1), kinds(2)
    for kind, (t, down) in first.items():
        assert digest(patches(t, down)) == digest(patches(t, down)), f"{kind}: another digest on the next call"
        assert digest(patches(t, down)) == digest(patches(*again[kind])), f"{kind}: the file read again differs"
        assert digest(patches(t, down, 0.5)) != digest(patches(t, down)), f"{kind}: another strength not seen"
        assert digest(patches(*other[kind])) != digest(patches(t, down)), f"{kind}: other bytes not seen"
    t, down = first["GGUF-like"]
    assert digest(patches(RawQuantized(t.as_subclass(torch.Tensor), "Q4_0", (8, 4)), down)) != digest(patches(t, down))
    with torch.inference_mode():  # an in-place change of a whole tensor is seen without a version counter
        t, down = kinds(3)["inference"]
        before = digest(patches(t, down))
        t.mul_(2)
        assert digest(patches(t, down)) != before
    monkeypatch.setattr(keys, "_cache_state", lambda t, plain: (t._version, t.data_ptr()))  # the rule before
    t, down = first["inference"]
    assert digest(patches(t, down)) != digest(patches(t, down))


def test_content_digest_follows_content_not_identity(pack):
    rw = importlib.import_module("ltxav_pack.content_keys")
    import threading as th

    def patches(strength=1.0, t=None):
        t = torch.ones(2, 3) if t is None else t
        return {"k": [(strength, ("lora", (t, None, {"alpha": 2.0})), 1.0, None, None)], "n": {"a", "b"}}

    assert rw.content_digest(patches()) == rw.content_digest(patches())  # equal content, other objects
    base = rw.content_digest(patches())
    for other in (patches(0.5), patches(t=torch.ones(2, 3) * 2), patches(t=torch.ones(3, 2)),
                  patches(t=torch.ones(2, 3, dtype=torch.bfloat16))):
        assert rw.content_digest(other) != base
    lock = th.Lock()  # no attributes, cannot be pickled: never taken for unchanged
    assert rw.content_digest(lock) != rw.content_digest(lock)
    twice, thrice = (lambda x: x * 2), (lambda x: x * 3)  # same code, other constants
    assert rw.content_digest(twice) != rw.content_digest(thrice)
    a, b = torch.ones(2), torch.zeros(2)
    assert rw.content_digest(a.add) != rw.content_digest(b.add)  # bound to other objects
    # the model's own objects (refs) count by name, inside a set too (a LoRA adapter's loaded keys are one)
    w1, w2 = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    def held(w):
        return {"k": [(1.0, {("up", w)})]}

    assert rw.content_digest(held(w1), {"m": w1}) == rw.content_digest(held(w2), {"m": w2})
    assert rw.content_digest(held(w1), {"m": w1}) != rw.content_digest(held(w1), {"n": w1})  # another name
    assert rw.content_digest(held(w1)) != rw.content_digest(held(w2))  # no refs: read by content, which differs


class SkipFlag:
    """Like ComfyUI-LTXVideo's STGFlag: set by the guider around its perturbed pass, read by the patches."""

    def __init__(self):
        self.do_skip = False


class BlockPatch:
    """Like ComfyUI-LTXVideo's STGBlockWrapper: a patch replacing a transformer block, holding the block
    and the guider's flag."""

    def __init__(self, block, flag):
        self.block, self.flag = block, flag

    def __call__(self, args, extra_args):
        return extra_args["original_block"](args)


class FlagGuider:
    def __init__(self, patcher, flag):
        self.model_patcher, self.model_options, self.flag = patcher, patcher.model_options, flag


@pytest.mark.quick
def test_patches_holding_a_block_and_a_flag_shared_with_the_guider(pack, comfy, tiny_ckpt):
    """A node pack's block patches (ComfyUI-LTXVideo's STG, under MultimodalGuider) hold a transformer block
    of the model and a flag their guider sets: each patch travels with a reference to the worker's own block
    (no copy of its weights) and leaves the model key alone (nothing of them read for it), and the job's
    guider, in the same pickle as the patches, gets the very flag the worker's patches read; so does the
    dry run's copy (``dumps_job``). The twin: pickled apart, the guider's flag is a copy."""
    mt = importlib.import_module("ltxav_pack.model_transfer")
    jobs = importlib.import_module("ltxav_pack.jobs")
    driver, worker = (comfy.sd.load_diffusion_model(str(tiny_ckpt[0])) for _ in range(2))
    plain_key = mt.model_spec(driver.clone()).key
    flag = SkipFlag()
    blocks = driver.get_model_object("diffusion_model.transformer_blocks")
    for i, block in enumerate(blocks):
        driver.set_model_patch_replace(BlockPatch(block, flag), "dit", "double_block", i)
    spec = mt.model_spec(driver)
    assert spec.key == plain_key
    block_bytes = sum(t.numel() * t.element_size() for t in blocks[0].state_dict().values())
    job = jobs.GuiderJob(noise=None, latent=None, noise_mask=None, seed=0, guider=FlagGuider(driver, flag),
                         sampler=None, sigmas=None)
    payload = spec.job_payload(job)
    assert len(payload) < block_bytes // 4, (len(payload), block_bytes)
    for data in (payload, mt.dumps_job(job, driver)):
        patched = worker.clone()  # as ray_worker rebuilds a job: a clone of its loaded weights
        got = mt.loads_job(data, patched).guider
        replaced = patched.model_options["transformer_options"]["patches_replace"]["dit"]
        assert [replaced[("double_block", i)].block for i in range(len(blocks))] == list(
            patched.model.diffusion_model.transformer_blocks)
        assert got.model_options is patched.model_options and got.model_patcher is patched
        assert all(replaced[("double_block", i)].flag is got.flag for i in range(len(blocks)))
    apart = mt.loads(mt.dumps(FlagGuider(driver, flag), mt.model_refs(driver)), mt.model_refs(patched))
    assert apart.flag is not replaced[("double_block", 0)].flag


def test_every_socket_of_ray_and_the_workers_is_on_loopback(ps, nodes_mod, tiny_model, tiny_ckpt):
    parallel_ksampler(nodes_mod, tiny_model, tiny_ckpt[1]["caption_channels"], steps=1)
    socks = listening_sockets(process_tree(os.getpid()))
    pids = {i["pid"] for i in worker_infos(ps)}
    assert pids <= {pid for pid, *_ in socks}  # the workers are in the list
    exposed = [s for s in socks if not is_loopback(s[2])]
    assert not exposed, f"listening beyond loopback (pid, name, address, port, kind): {exposed}"


def test_ring_degree_and_image_to_video(nodes_mod, tiny_model, tiny_model_f64, tiny_ckpt):
    cc = tiny_ckpt[1]["caption_channels"]
    from comfy_extras.nodes_lt import LTXVConcatAVLatent

    video = make_latent(**LATENT, audio=False)
    mask = torch.ones(1, 1, video["samples"].shape[2], 1, 1)
    mask[:, :, 0] = 0.0
    video["noise_mask"] = mask
    latent = LTXVConcatAVLatent.execute(video, {"samples": torch.zeros(1, 8, 26, 16), "type": "audio"})[0]
    got, ui = parallel_ksampler(nodes_mod, tiny_model, cc, latent=latent, ulysses=1, ring=2)
    assert "Ulysses 1 x ring 2" in ui.value
    assert_equals_stock(got, tiny_model, tiny_model_f64, cc, latent=latent)


def test_lora_and_ffn_chunker_travel_to_the_workers(ps, pack, nodes_mod, tiny_model, tiny_model_f64, tiny_ckpt,
                                                    tmp_path):
    import folder_paths
    import nodes

    from helpers.tiny_ltxav import write_lora

    write_lora(tiny_ckpt[0], ("transformer_blocks.0.ff.net.0.proj", "transformer_blocks.1.attn1.to_q"),
               tmp_path / "ray_lora.safetensors")
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    chunker = importlib.import_module("ltxav_pack.nodes_ltx_ffn_chunker").LTXFFNChunker

    def patched(m):
        return chunker.execute(nodes.LoraLoaderModelOnly().load_lora_model_only(m, "ray_lora.safetensors", 1.0)[0],
                               False, 3)[0]

    model = patched(tiny_model)
    cc = tiny_ckpt[1]["caption_channels"]
    want, reference = stock_ksampler(model, cc), stock_ksampler(patched(tiny_model_f64), cc)
    # the twin: workers that dropped the LoRA would return the plain model's result, and fail the check
    assert mismatches(stock_ksampler(tiny_model, cc), want, reference)
    got, _ = parallel_ksampler(nodes_mod, model, cc)
    assert_matches(got, want, reference)
    infos = worker_infos(ps)
    assert all(i["ffn_chunking"] == {"num_chunks": 3, "auto": False} for i in infos)


def test_trace_dir_gives_each_worker_a_trace(ps, nodes_mod, tiny_model, tiny_model_f64, tiny_ckpt, tmp_path,
                                             monkeypatch):
    import json

    cc = tiny_ckpt[1]["caption_channels"]
    ps.POOL.stop_group()  # workers read the variable when they start
    monkeypatch.setenv("LTXAV_PARALLEL_TRACE_DIR", str(tmp_path / "traces"))
    try:
        got, _ = parallel_ksampler(nodes_mod, tiny_model, cc)
    finally:
        ps.POOL.stop_group()
    assert_equals_stock(got, tiny_model, tiny_model_f64, cc)
    traces = sorted((tmp_path / "traces").glob("rank*.json"))
    assert [t.name.split("-")[0] for t in traces] == ["rank0", "rank1"]
    for t in traces:
        names = {e.get("name", "") for e in json.loads(t.read_text())["traceEvents"]}
        assert any(n.startswith("aten::") for n in names), t.name


def test_sampler_custom_advanced_equals_stock(nodes_mod, tiny_model, tiny_model_f64, tiny_ckpt):
    cc = tiny_ckpt[1]["caption_channels"]
    latent = make_latent(**LATENT)
    sigmas = ltxv_sigmas(latent)
    want = stock_custom_advanced("cfg", tiny_model, cc, latent, sigmas)
    reference = stock_custom_advanced("cfg", tiny_model_f64, cc, latent, sigmas)
    *got, ui = parallel_custom_advanced(nodes_mod, "cfg", tiny_model, cc, latent, sigmas)
    assert "2 workers, Ulysses 2 x ring 1" in ui.value
    assert_matches(got[0], want[0], reference[0])
    assert_matches(got[1], want[1], reference[1])  # denoised_output


def _run_in_thread(fn):
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    return t, box


def _wait_for_step(ps, n):
    import ray

    for _ in range(600):
        g = ps.POOL.group
        if g and g.model_key and ray.get(g.actors[0].progress.remote()) >= n:
            return
        time.sleep(0.1)
    raise AssertionError("sampling did not start")


def test_interrupt_stops_all_workers_and_the_next_prompt_works(ps, nodes_mod, tiny_model, tiny_model_f64, tiny_ckpt):
    import comfy.model_management

    cc = tiny_ckpt[1]["caption_channels"]
    parallel_ksampler(nodes_mod, tiny_model, cc, steps=1)  # workers up and loaded
    pids = [i["pid"] for i in worker_infos(ps)]
    t, box = _run_in_thread(lambda: parallel_ksampler(nodes_mod, tiny_model, cc, steps=400))
    _wait_for_step(ps, 2)
    comfy.model_management.interrupt_current_processing(True)
    t.join(120)
    assert isinstance(box.get("error"), comfy.model_management.InterruptProcessingException)
    assert not comfy.model_management.processing_interrupted()
    steps = [s for s in __import__("ray").get([a.progress.remote() for a in ps.POOL.group.actors])]
    assert steps[0] == steps[1] < 400  # both ranks stopped at the same step
    got, _ = parallel_ksampler(nodes_mod, tiny_model, cc)
    assert_equals_stock(got, tiny_model, tiny_model_f64, cc)
    assert [i["pid"] for i in worker_infos(ps)] == pids  # interrupt keeps the workers


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_dead_or_frozen_worker_is_an_error_and_the_next_prompt_works(ps, nodes_mod, tiny_model, tiny_model_f64,
                                                                      tiny_ckpt, monkeypatch, fault):
    cc = tiny_ckpt[1]["caption_channels"]
    parallel_ksampler(nodes_mod, tiny_model, cc, steps=1)  # workers started and the model loaded, at the default limits
    monkeypatch.setenv("LTXAV_PARALLEL_HEARTBEAT_S", "3")
    pids = [i["pid"] for i in worker_infos(ps)]
    t, box = _run_in_thread(lambda: parallel_ksampler(nodes_mod, tiny_model, cc, steps=400))
    _wait_for_step(ps, 2)
    os.kill(pids[1], signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
    t.join(120)
    err = box.get("error")
    assert isinstance(err, RuntimeError), err
    if fault == "kill":
        assert "LTXAV Parallel Sampler: worker 1 (cpu) died during sampling" in str(err)
    else:
        assert "LTXAV Parallel Sampler: worker 1 stopped answering for 3 s during sampling" in str(err)
    assert "The workers were stopped; the next prompt starts new ones." in str(err)
    assert ps.POOL.group is None
    for _ in range(100):  # killed by Ray: no stray processes
        if not any(_pid_alive(p) for p in pids):
            break
        time.sleep(0.1)
    assert not any(_pid_alive(p) for p in pids)
    got, _ = parallel_ksampler(nodes_mod, tiny_model, cc)
    assert_equals_stock(got, tiny_model, tiny_model_f64, cc)


def test_worker_out_of_memory_is_a_clear_error(ps, nodes_mod, tiny_model, tiny_model_f64, tiny_ckpt, monkeypatch):
    cc = tiny_ckpt[1]["caption_channels"]
    ps.POOL.stop_group()
    monkeypatch.setenv("LTXAV_PARALLEL_FAULT", "oom:1:2")  # the worker raises torch.OutOfMemoryError at step 2
    with pytest.raises(RuntimeError, match=r"worker 1 \(cpu\) ran out of GPU memory during sampling: injected"):
        parallel_ksampler(nodes_mod, tiny_model, cc, steps=5)
    assert ps.POOL.group is None
    monkeypatch.delenv("LTXAV_PARALLEL_FAULT")
    got, _ = parallel_ksampler(nodes_mod, tiny_model, cc)
    assert_equals_stock(got, tiny_model, tiny_model_f64, cc)


def test_memory_planner_refuses_what_does_not_fit(ps, nodes_mod, tiny_model, tiny_model_f64, tiny_ckpt, monkeypatch,
                                                  caplog_info):
    """With each worker capped (LTXAV_PARALLEL_MEMORY_CAP_GIB) between the planner's estimate for 2 and
    for 4 latent frames, the 25-frame (4 latent frames) run is refused before any model load, naming
    the longest length that fits; with a cap that fits, the same prompt logs the plan and samples."""
    cc = tiny_ckpt[1]["caption_channels"]
    mp = importlib.import_module("ltxav_pack.memory_plan")
    groups = importlib.import_module("ltxav_pack.sequence_parallel.groups")
    latent = make_latent(**LATENT)["samples"]
    # KSampler at cfg 3, but at these budgets ComfyUI's estimate for two passes (memory_required) is over
    # the free memory: it runs them one after the other, one a forward
    est = ps.plan.check_memory(tiny_model, latent, groups.Degrees(2), budget=2**30 // 8, passes=2)  # fits: the estimate
    assert "2 guidance passes a step, 1 in each worker's forward" in est.note
    dm = tiny_model.model.diffusion_model
    family = importlib.import_module("ltxav_pack.models").family_of(dm, "test")
    clip, batch = family.latent_clip(latent)
    assert clip.latent_frames == 4 and batch == 1 and est.parts["weights"] > 0
    dims = family.plan_dims(dm, compute_dtype=torch.float32)
    kw = dict(world=2, ffn_chunks=1, sampler=True)
    small = mp.estimate(dims, clip.with_latent_frames(2), **kw).total
    assert small < est.total
    ps.POOL.stop_group()
    monkeypatch.setenv("LTXAV_PARALLEL_MEMORY_CAP_GIB", f"{(small + est.total) / 2 / 2**30:.12f}")
    with pytest.raises(ValueError, match=r"LTXAV Parallel Sampler: a 25-frame 128x96 video needs about .* GiB per "
                                         r"worker .*the longest video that fits is 9 frames.*Shorten input "
                                         r"'latent_image' or raise input 'gpus'"):
        parallel_ksampler(nodes_mod, tiny_model, cc)
    assert all(i["loads"] == 0 for i in worker_infos(ps))  # refused before loading anything
    ps.POOL.stop_group()
    monkeypatch.setenv("LTXAV_PARALLEL_MEMORY_CAP_GIB", "1000")  # fits: the run logs the plan and samples
    got, _ = parallel_ksampler(nodes_mod, tiny_model, cc)
    assert_equals_stock(got, tiny_model, tiny_model_f64, cc)
    assert re.search(r"LTXAV Parallel Sampler: planned peak 0\.\d\d GiB per worker of 1000\.00 GiB free \(Ulysses 2 x "
                     r"ring 1; 2 guidance passes a step, 2 in each worker's forward; weights", caplog_info.text)
    # (with 1000 GiB free ComfyUI batches the two passes, and the plan counts both)
    ps.POOL.stop_group()
    monkeypatch.delenv("LTXAV_PARALLEL_MEMORY_CAP_GIB")


def test_more_gpus_than_the_cluster_has(ps, nodes_mod, tiny_model, tiny_ckpt):
    import ray

    cc = tiny_ckpt[1]["caption_channels"]
    parallel_ksampler(nodes_mod, tiny_model, cc, steps=1)  # Ray up
    slots = int(ray.cluster_resources()["CPU"])
    assert slots >= ps.workers.LOCAL_CPU_SLOTS  # a local cluster offers CPU workers beyond the cores
    with pytest.raises(ValueError, match=rf"input 'gpus' asks for {slots + 1} CPU workers, but the Ray cluster at "
                                         rf"'local' offers {slots} CPU slots \(one a worker; more workers than this "
                                         rf"machine's {os.cpu_count()} cores run, slowly\); use gpus <= {slots}\.$"):
        parallel_ksampler(nodes_mod, tiny_model, cc, gpus=slots + 1)


@pytest.mark.quick
def test_workers_sharing_a_gpu(ps, monkeypatch):
    """LTXAV_PARALLEL_WORKERS_PER_GPU=2 (benchmarks: two workers' host memory on one GPU): one GPU
    offers two workers, over gloo, each holding its share of the card; unset, one GPU offers one."""
    import importlib

    import ray

    worker = importlib.import_module("ltxav_pack.ray_worker")
    host = importlib.import_module("ltxav_pack.comfy_host")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 1.0, "CPU": 8.0})
    settings = ps.plan.ParallelSettings(gpus=2)
    with pytest.raises(ValueError, match=r"input 'gpus' asks for 2 GPUs, but the Ray cluster at .* has 1"):
        ps.plan.world_of(settings, ps.POOL.available(cpu=False), False, ps.POOL.address)
    monkeypatch.setenv("LTXAV_PARALLEL_WORKERS_PER_GPU", "2")
    assert ps.plan.world_of(settings, ps.POOL.available(cpu=False), False, ps.POOL.address) == 2
    assert ps.plan.degrees_of(settings, 2, 1, 32, False) == importlib.import_module(
        "ltxav_pack.sequence_parallel.groups").Degrees(2, 1, 1)
    assert (worker.backend(True), worker.backend(True, 2), worker.backend(False)) == ("nccl", "gloo", "gloo")
    # a 100-byte GPU, 24 bytes a worker: one worker holds 76, each of two 26, of five none (too small)
    assert [host.held_bytes(100, 24, n) for n in (1, 2, 5)] == [76, 26, 0]
    for bad in ("0", "1.5"):
        monkeypatch.setenv("LTXAV_PARALLEL_WORKERS_PER_GPU", bad)
        with pytest.raises(ValueError, match=rf"LTXAV_PARALLEL_WORKERS_PER_GPU='{re.escape(bad)}' is not a whole"):
            ps.POOL.available(cpu=False)


@pytest.mark.parametrize("kw,msg", [
    (dict(gpus=0), r"ComfyUI runs on the CPU, so 'gpus' counts CPU worker processes"),
    (dict(gpus=2, ulysses=2, ring=2), r"ulysses_degree x ring_degree = 2 x 2 = 4, but 2 CPU workers are used"),
    (dict(gpus=2, ulysses=0, ring=3), r"ring_degree=3 does not divide gpus=2"),
])
def test_bad_parallel_settings(nodes_mod, tiny_model, tiny_ckpt, kw, msg):
    with pytest.raises(ValueError, match="LTXAV Parallel Sampler: " + msg):
        parallel_ksampler(nodes_mod, tiny_model, tiny_ckpt[1]["caption_channels"], **kw)


def test_heads_not_divisible(comfy, nodes_mod, tmp_path):
    from helpers.tiny_ltxav import write_tiny_ltxav

    path = tmp_path / "five_heads.safetensors"
    cfg = write_tiny_ltxav(path, num_attention_heads=5, attention_head_dim=8, cross_attention_dim=40)
    model = comfy.sd.load_diffusion_model(str(path))
    with pytest.raises(ValueError, match=r"ulysses_degree=2 does not divide the model's 5 video attention heads; "
                                         r"use a ulysses_degree from \[1\]"):
        parallel_ksampler(nodes_mod, model, cfg["caption_channels"])


def test_non_ltxav_model(comfy, nodes_mod, tiny_ckpt):
    from helpers.tiny_ltxav import non_ltx_patcher

    with pytest.raises(ValueError, match=r"LTXAV Parallel Sampler: the model is a Linear, not LTX-2 audio-video"):
        parallel_ksampler(nodes_mod, non_ltx_patcher(), 16)


def test_unreachable_ray_address(nodes_mod, tiny_model, tiny_ckpt):
    with pytest.raises(ValueError, match=r"cannot join the Ray cluster at 127\.0\.0\.1:1 \(given in input "
                                         r"'ray_address'\): nothing answers there"):
        parallel_ksampler(nodes_mod, tiny_model, tiny_ckpt[1]["caption_channels"], address="127.0.0.1:1")


def test_changing_ray_address_needs_a_restart(ps, nodes_mod, tiny_model, tiny_ckpt):
    cc = tiny_ckpt[1]["caption_channels"]
    parallel_ksampler(nodes_mod, tiny_model, cc, steps=1)
    with pytest.raises(ValueError, match=r"input 'ray_address' changed from 'local' to 'auto'.*restart "
                                         r"ComfyUI to use the new address"):
        parallel_ksampler(nodes_mod, tiny_model, cc, address="auto")


def test_memory_flags_reach_the_workers(ps, nodes_mod, tiny_model, tiny_model_f64, tiny_ckpt, monkeypatch):
    """ComfyUI's memory flags (--reserve-vram, --lowvram, --disable-dynamic-vram, ...) and its CUDA allocator
    are the workers' too; DynamicVRAM runs there only when it runs in the ComfyUI process (never on CPU)."""
    import comfy.cli_args

    cc = tiny_ckpt[1]["caption_channels"]
    ps.POOL.stop_group()  # workers take the flags when they start
    for flag, value in (("reserve_vram", 1.5), ("lowvram", True), ("disable_dynamic_vram", True)):
        monkeypatch.setattr(comfy.cli_args.args, flag, value)
    # the allocator ComfyUI's main.py chose (cuda_malloc.py): comfy-aimdo pages weights out through it
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
    try:
        got, _ = parallel_ksampler(nodes_mod, tiny_model, cc)
        infos = worker_infos(ps)
    finally:
        ps.POOL.stop_group()
    for info in infos:
        assert info["memory_flags"]["reserve_vram"] == 1.5 and info["memory_flags"]["lowvram"] is True
        assert info["memory_flags"]["disable_dynamic_vram"] is True and info["dynamic_vram"] is False
        assert info["alloc_conf"] == "backend:cudaMallocAsync"
    assert_equals_stock(got, tiny_model, tiny_model_f64, cc)


def test_planner_counts_streamed_weights_only_when_workers_stream(ps, comfy, tmp_path, caplog, monkeypatch):
    """A 6-layer model: with DynamicVRAM on the workers only two blocks of weights count, so a budget
    between the streamed and the whole-weights estimate is refused without streaming and accepted with
    it; a budget below the streamed estimate is refused either way, naming what does not fit. A plan
    accepted within memory_plan.EDGE_BYTES of the budget logs the card's-edge warning; one with room does not.
    A model whose patcher does not stream (ComfyUI-GGUF's) counts every weight, DynamicVRAM or not."""
    from helpers.tiny_ltxav import write_tiny_ltxav

    groups = importlib.import_module("ltxav_pack.sequence_parallel.groups")
    path = tmp_path / "six_layers.safetensors"
    write_tiny_ltxav(path, num_layers=6)
    model = comfy.sd.load_diffusion_model(str(path))
    latent = make_latent(**LATENT)["samples"]
    streaming, whole = [{"device": "cpu", "dynamic_vram": True}], [{"device": "cpu", "dynamic_vram": False}]
    unstreamed = ps.plan.check_memory(model, latent, groups.Degrees(2), 10**12, streaming)  # a patcher that keeps all
    assert unstreamed.parts["weights"] == ps.plan.check_memory(model, latent, groups.Degrees(2), 10**12, whole).parts[
        "weights"]
    monkeypatch.setattr(model, "is_dynamic", lambda: True)  # ComfyUI's streaming patcher (DynamicVRAM, on a GPU)
    big = 10**12
    with caplog.at_level(logging.WARNING, logger=ps.plan.log.name):
        streamed = ps.plan.check_memory(model, latent, groups.Degrees(2), big, streaming)
    assert "card's edge" not in caplog.text
    mp = importlib.import_module("ltxav_pack.memory_plan")
    with caplog.at_level(logging.WARNING, logger=ps.plan.log.name):
        ps.plan.check_memory(model, latent, groups.Degrees(2), streamed.total + mp.EDGE_BYTES // 2, streaming)
    assert re.search(r"LTXAV Parallel Sampler: the plan \(\d+\.\d\d GiB\) leaves 0\.75 GiB of the \d+\.\d\d GiB free: "
                     r"at the card's edge.*shorten input 'latent_image' or raise input 'gpus'", caplog.text)
    full = ps.plan.check_memory(model, latent, groups.Degrees(2), big, whole)
    assert streamed.parts["weights"] < full.parts["weights"] and streamed.total < full.total
    budget = (streamed.total + full.total) // 2
    assert ps.plan.check_memory(model, latent, groups.Degrees(2), budget, streaming).total == streamed.total
    with pytest.raises(ValueError, match=r"LTXAV Parallel Sampler: a 25-frame 128x96 video needs about .* GiB per "
                                         r"worker \(Ulysses 2 x ring 1; 1 guidance pass a step, 1 in each worker's "
                                         r"forward: weights"):
        ps.plan.check_memory(model, latent, groups.Degrees(2), budget, whole)
    tiny_budget = streamed.parts["weights"] // 2
    with pytest.raises(ValueError, match=r"the weights ComfyUI keeps on the GPU while streaming the rest and fixed "
                                         r"buffers alone take"):
        ps.plan.check_memory(model, latent, groups.Degrees(2), tiny_budget, streaming)


def test_progress_reaches_every_step_in_order(nodes_mod, tiny_model, tiny_ckpt, monkeypatch):
    """ComfyUI's progress bar is given 1, 2, ..., N: the driver polls rank 0's step (and may see 2, then 5)
    and passes each step on, the last ones too (the workers may finish between two polls); its hook (the
    UI's bar, which ComfyUI throttles in between) ends at N of N."""
    import comfy.utils

    given, sent = [], []
    update = comfy.utils.ProgressBar.update_absolute
    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute",
                        lambda self, value, *a, **kw: (given.append(value), update(self, value, *a, **kw)))
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None:
                        sent.append((value, total)))
    parallel_ksampler(nodes_mod, tiny_model, tiny_ckpt[1]["caption_channels"], steps=8)
    assert given == list(range(1, 9)), given
    assert sent[-1] == (8, 8) and sent == sorted(sent), sent


def test_too_few_tokens_are_refused_before_any_worker_starts(ps, nodes_mod, tiny_model, tiny_ckpt):
    cc = tiny_ckpt[1]["caption_channels"]
    ps.POOL.stop_group()
    latent = make_latent(width=32, height=32, length=9)  # 2 latent frames of 1 x 1: 2 video tokens
    with pytest.raises(ValueError, match=r"^LTXAV Parallel Sampler: the video has 2 tokens, too few to split over 3 "
                                         r"CPU workers \(the last one would get none\); use fewer CPU workers \(input "
                                         r"'gpus'\) or a longer or larger video\.$"):
        parallel_ksampler(nodes_mod, tiny_model, cc, latent=latent, gpus=3, ulysses=3)
    assert ps.POOL.group is None  # no worker was started for it


def test_a_changed_ffn_chunker_keeps_the_model_and_its_worker_lines_are_logged(ps, pack, nodes_mod, tiny_model,
                                                                              tiny_ckpt, caplog_info):
    chunker = importlib.import_module("ltxav_pack.nodes_ltx_ffn_chunker").LTXFFNChunker
    cc = tiny_ckpt[1]["caption_channels"]
    parallel_ksampler(nodes_mod, tiny_model, cc, steps=1)
    caplog_info.clear()
    parallel_ksampler(nodes_mod, chunker.execute(tiny_model, False, 2)[0], cc, steps=1)
    # the chunker's settings travel with the job: the workers keep the model as it is, nothing is re-applied
    assert "sampling on 2 workers" in caplog_info.text
    assert "applying" not in caplog_info.text and "re-applied" not in caplog_info.text, caplog_info.text
    # the workers' own INFO lines reach this process's log, under their loggers, prefixed with the rank
    relayed = [f"{r.name}: {r.getMessage()}" for r in caplog_info.records if "[RayWorker" in r.getMessage()]
    for rank in (0, 1):
        assert any(re.fullmatch(rf"ltxav_pack\.ffn_chunking: \[RayWorker {rank}\] Video FFN chunking active: 2 chunks "
                                r"\(\d+ tokens\)", line) for line in relayed), relayed


def test_user_errors_carry_no_frames_of_the_pack(nodes_mod, tiny_model, tiny_ckpt):
    """ComfyUI logs every node error with its traceback: the pack's own messages reach it without the
    pack's frames below the node's execute and without a chained cause; its queue-time check of
    'ray_address' refuses a malformed one before anything runs. The twin: the undecorated execute."""
    import traceback

    cc = tiny_ckpt[1]["caption_channels"]
    with pytest.raises(ValueError, match=r"input 'ray_address' is 'nowhere'") as err:
        parallel_ksampler(nodes_mod, tiny_model, cc, address="nowhere")
    files = [f.filename for f in traceback.extract_tb(err.value.__traceback__)]
    pack_frames = [f for f in files if os.path.basename(os.path.dirname(f)) == "driver"
                   or os.path.basename(f) in ("ray_cluster.py", "ray_join.py")]
    assert not pack_frames, files
    assert err.value.__cause__ is None and err.value.__suppress_context__
    node = nodes_mod.LTXAVParallelKSampler
    with pytest.raises(ValueError) as twin:
        node.execute.__wrapped__(node, tiny_model, 42, 1, 3.0, "euler", "simple", [], [], make_latent(), 1.0, 2, 0, 1,
                                 "nowhere")
    assert any(os.path.basename(f.filename) == "ray_join.py" for f in traceback.extract_tb(twin.value.__traceback__))
    assert node.validate_inputs(ray_address="local") is True and node.validate_inputs(ray_address="auto") is True
    assert node.validate_inputs(ray_address=None) is True  # a linked input: checked when the node runs
    assert node.validate_inputs(ray_address="nowhere").startswith("LTXAV Parallel Sampler: input 'ray_address' is "
                                                                  "'nowhere'")


@pytest.mark.quick
def test_quoted_causes_end_no_sentence_twice(ps, pack):
    """A worker's message ending in a period, quoted in the driver's sentence, does not read 'video.. The'."""
    errors = importlib.import_module("ltxav_pack.errors")
    assert errors.clause(ValueError("use a longer or larger video.")) == "ValueError: use a longer or larger video"
    assert errors.clause(RuntimeError("")) == "RuntimeError"
    text = ps.workers._describe(ValueError("Sequence parallel: use fewer GPUs or a longer or larger video.\nmore"),
                                1, "sampling", None)
    assert text == ("worker 1 (its device) failed during sampling: ValueError: Sequence parallel: use fewer GPUs or a "
                    "longer or larger video")


@pytest.mark.quick
def test_worker_memory_leaves_the_held_card_out(monkeypatch):
    """A worker's memory report on a GPU (its counters stubbed here): what stays allocated and the run's highest
    allocation are counted less the tensor that holds the rest of an emulated card, and the highest is the run's
    (kept by the phase peaks, which reset PyTorch's counter), not the last phase's; the twin without a held
    tensor counts it all."""
    import importlib
    import types

    worker = importlib.import_module("ltxav_pack.ray_worker")
    jobs = importlib.import_module("ltxav_pack.jobs")
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 20 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 21 * gib)  # the last phase's
    part = types.SimpleNamespace(report=lambda: {"stats": {"peak": 5 * gib, "allocated_top": 30 * gib}})
    fake = types.SimpleNamespace(
        jobs=jobs, cuda=True, weights=None, rank=0,
        held=types.SimpleNamespace(numel=lambda: 15 * gib, element_size=lambda: 1),  # 15 GiB of uint8
        kinds=importlib.import_module("ltxav_pack.parallel_kinds"), parts={"sequence": part},
        comfy=types.SimpleNamespace(aimdo_usage_gib=lambda: 0.5),
        inst=types.SimpleNamespace(host_memory=lambda g: {}))
    m = worker.LTXAVWorker.memory(fake)
    assert (m.peak_gib, m.allocated_gib, m.max_allocated_gib, m.aimdo_gib) == (5.0, 5.0, 15.0, 0.5)
    fake.held = None
    m = worker.LTXAVWorker.memory(fake)
    assert (m.allocated_gib, m.max_allocated_gib) == (20.0, 30.0)
