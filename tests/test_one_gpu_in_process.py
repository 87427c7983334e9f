"""gpus=1 on one local GPU: the sampler nodes sample in ComfyUI's own process (no Ray workers, no second
CUDA context on the card), equal to the stock samplers on the same tiny checkpoint; the decision, the
planner's refusal, an out-of-memory error and Interrupt there. Under ComfyUI's --cpu the pack runs CPU
workers instead, so these tests take the CPU mode out of the decision (``driver.workers.cpu_mode``)."""
import dataclasses
import threading
import time

import pytest
import torch

from helpers.comfy_host import make_latent
from helpers.numerics import mismatches
from helpers.sampler_cases import (
    LATENT,
    assert_equals_stock,
    ltxv_sigmas,
    parallel_custom_advanced,
    parallel_ksampler,
    stock_custom_advanced,
    stock_ksampler,
)

HERE = "LTXAV Parallel Sampler: in ComfyUI's process (one GPU: no workers)"


@pytest.mark.quick
@pytest.mark.parametrize("settings,cpu,devices,env,want", [
    (dict(gpus=1), False, 4, {}, True),
    (dict(gpus=0), False, 1, {}, True),  # all GPUs Ray sees, on a machine with one
    (dict(gpus=0), False, 2, {}, False),
    (dict(gpus=2), False, 4, {}, False),
    (dict(gpus=1), True, 0, {}, False),  # ComfyUI on --cpu: CPU workers
    (dict(gpus=1, ray_address="auto"), False, 1, {}, False),  # a cluster the user joined
    (dict(gpus=1, ring=2), False, 1, {}, False),  # degrees the workers' checks refuse
    (dict(gpus=1, cfg_parallel="on"), False, 1, {}, False),
    (dict(gpus=1), False, 1, {"LTXAV_PARALLEL_ONE_GPU_IN_PROCESS": "0"}, False),
    (dict(gpus=1), False, 1, {"LTXAV_PARALLEL_WORKERS_PER_GPU": "2"}, False),
])
def test_which_runs_sample_in_comfyuis_process(ps, monkeypatch, settings, cpu, devices, env, want):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert ps.plan.one_gpu_here(ps.plan.ParallelSettings(**settings), cpu, devices) is want


@pytest.mark.quick
def test_one_gpu_ksampler_runs_here_and_equals_stock(here, nodes_mod, tiny_model, tiny_model_f64, tiny_ckpt):
    cc = tiny_ckpt[1]["caption_channels"]
    got, ui = parallel_ksampler(nodes_mod, tiny_model, cc, gpus=1)
    assert HERE in ui.value
    assert here.POOL.group is None  # no worker started
    assert_equals_stock(got, tiny_model, tiny_model_f64, cc)


def test_one_gpu_comparison_sees_a_lost_input(here, nodes_mod, tiny_model, tiny_model_f64, tiny_ckpt, monkeypatch):
    """The twin: a run in this process that lost the cfg input (sampled at cfg 1) fails the same check."""
    jobs = __import__("ltxav_pack.jobs", fromlist=["x"])
    real = jobs.KSamplerJob.sample
    monkeypatch.setattr(jobs.KSamplerJob, "sample", lambda self, p, cb: real(dataclasses.replace(self, cfg=1.0), p, cb))
    cc = tiny_ckpt[1]["caption_channels"]
    got, _ = parallel_ksampler(nodes_mod, tiny_model, cc, gpus=1)
    assert mismatches(got, stock_ksampler(tiny_model, cc), stock_ksampler(tiny_model_f64, cc))


def test_one_gpu_custom_advanced_equals_stock(here, nodes_mod, tiny_model, tiny_model_f64, tiny_ckpt):
    """With its denoised_output (the last step's x0, from the callback as SamplerCustomAdvanced takes it)."""
    from helpers.numerics import assert_matches

    cc = tiny_ckpt[1]["caption_channels"]
    latent = make_latent(**LATENT)
    sigmas = ltxv_sigmas(latent)
    want = stock_custom_advanced("cfg", tiny_model, cc, latent, sigmas)
    reference = stock_custom_advanced("cfg", tiny_model_f64, cc, latent, sigmas)
    *got, ui = parallel_custom_advanced(nodes_mod, "cfg", tiny_model, cc, latent, sigmas, gpus=1)
    assert HERE in ui.value
    assert_matches(got[0], want[0], reference[0])
    assert_matches(got[1], want[1], reference[1])


def test_one_gpu_planner_refuses_what_does_not_fit(here, nodes_mod, tiny_model, tiny_ckpt, monkeypatch, caplog_info):
    """The planner checks the run against this process's GPU (within LTXAV_PARALLEL_MEMORY_CAP_GIB) and
    refuses before sampling, with the same message as for workers; with room it logs its plan."""
    cc = tiny_ckpt[1]["caption_channels"]
    monkeypatch.setenv("LTXAV_PARALLEL_MEMORY_CAP_GIB", "0.0001")
    with pytest.raises(ValueError, match=r"LTXAV Parallel Sampler: a 25-frame 128x96 video needs about .* GiB per "
                                         r"worker .*Shorten input 'latent_image' or raise input 'gpus'"):
        parallel_ksampler(nodes_mod, tiny_model, cc, gpus=1)
    monkeypatch.setenv("LTXAV_PARALLEL_MEMORY_CAP_GIB", "1000")
    parallel_ksampler(nodes_mod, tiny_model, cc, gpus=1, steps=1)
    assert "planned peak" in caplog_info.text and "in ComfyUI's process, one GPU" in caplog_info.text


def test_one_gpu_uses_the_lean_attention_only_where_the_clip_needs_it(here, nodes_mod, tiny_model, tiny_model_f64,
                                                                      tiny_ckpt, monkeypatch, caplog_info):
    """Where ComfyUI's own attention's plan leaves the card's edge allowance (``memory_plan.EDGE_BYTES``) the run
    is stock's forward, without the lean attention's wrapper; on a card (``LTXAV_PARALLEL_MEMORY_CAP_GIB``) where
    it would not, the run is lean (its wrapper runs every forward) and still equals stock. Both under inference
    mode, as ComfyUI runs nodes."""
    import re

    lean = __import__("ltxav_pack.lean_attention", fromlist=["x"])
    mp = __import__("ltxav_pack.memory_plan", fromlist=["x"])
    calls = []
    real = lean.diffusion_model_wrapper
    monkeypatch.setattr(lean, "diffusion_model_wrapper", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cc = tiny_ckpt[1]["caption_channels"]
    with torch.inference_mode():
        got, _ = parallel_ksampler(nodes_mod, tiny_model, cc, gpus=1)
    assert calls == [] and "one GPU, ComfyUI's attention;" in caplog_info.text
    assert_equals_stock(got, tiny_model, tiny_model_f64, cc)
    plain = float(re.search(r"planned peak (\d+\.\d+) GiB", caplog_info.text).group(1))
    caplog_info.clear()
    monkeypatch.setenv("LTXAV_PARALLEL_MEMORY_CAP_GIB", str(plain + mp.EDGE_BYTES / mp.GIB / 2))
    with torch.inference_mode():
        got, _ = parallel_ksampler(nodes_mod, tiny_model, cc, gpus=1)
    assert len(calls) >= 3 and "one GPU, lean attention (the clip needs it);" in caplog_info.text
    assert_equals_stock(got, tiny_model, tiny_model_f64, cc)


def test_one_gpu_out_of_memory_is_a_clear_error(here, nodes_mod, tiny_model, tiny_model_f64, tiny_ckpt, monkeypatch):
    """An out-of-memory error keeps its type (ComfyUI's executor frees its models on it) and says what to
    do; the next prompt works."""
    jobs = __import__("ltxav_pack.jobs", fromlist=["x"])

    def oom(self, patcher, callback):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore lines")

    cc = tiny_ckpt[1]["caption_channels"]
    with monkeypatch.context() as m:
        m.setattr(jobs.KSamplerJob, "sample", oom)
        with pytest.raises(torch.OutOfMemoryError, match=r"LTXAV Parallel Sampler: ran out of GPU memory during "
                                                         r"sampling on cpu \(CUDA out of memory\. Tried to allocate "
                                                         r"2\.00 GiB\)\. Use more GPUs \(input 'gpus'\).* The "
                                                         r"plan was \d+\.\d\d GiB of \d+\.\d\d GiB free"):
            parallel_ksampler(nodes_mod, tiny_model, cc, gpus=1)
    got, _ = parallel_ksampler(nodes_mod, tiny_model, cc, gpus=1)
    assert_equals_stock(got, tiny_model, tiny_model_f64, cc)


def test_one_gpu_interrupt_stops_and_the_next_prompt_works(here, nodes_mod, tiny_model, tiny_model_f64, tiny_ckpt):
    """Interrupt (ComfyUI's flag) stops the run as it stops stock sampling; the next prompt works."""
    import comfy.model_management
    import comfy.utils

    cc = tiny_ckpt[1]["caption_channels"]
    seen, box = [], {}
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, **kw: seen.append(value))

    def target():
        try:
            box["result"] = parallel_ksampler(nodes_mod, tiny_model, cc, gpus=1, steps=400)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            box["error"] = e

    t = threading.Thread(target=target)
    try:
        t.start()
        for _ in range(600):
            if len(seen) >= 2:
                break
            time.sleep(0.05)
        assert len(seen) >= 2, "sampling did not start"
        comfy.model_management.interrupt_current_processing(True)
        t.join(120)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert isinstance(box.get("error"), comfy.model_management.InterruptProcessingException)
    assert max(seen) < 400
    comfy.model_management.interrupt_current_processing(False)
    got, _ = parallel_ksampler(nodes_mod, tiny_model, cc, gpus=1)
    assert_equals_stock(got, tiny_model, tiny_model_f64, cc)


@pytest.mark.quick
@pytest.mark.parametrize("peak,want", [
    (None, "cuda:0 (NVIDIA X): 3.5 GiB allocated; weights on the GPU 0.0 GiB (streamed: DynamicVRAM)"),
    (12.5, "cuda:0 (NVIDIA X): peak 12.5 GiB above the sampling's start; 3.5 GiB allocated; weights on the GPU "
           "0.0 GiB (streamed: DynamicVRAM)"),
])
def test_one_gpu_summary_says_the_peak_only_when_counted(ps, peak, want):
    """The run's peak is counted only with memory logs on (resetting PyTorch's peak counters before
    sampling cost the card's edge: bench/README.md); without it the line keeps what was allocated."""
    jobs = __import__("ltxav_pack.jobs", fromlist=["x"])
    m = jobs.WorkerMemory(rank=0, peak_gib=peak, allocated_gib=3.5, weights_gib=0.0)
    info = {"device": "cuda:0 (NVIDIA X)", "dynamic_vram": True}
    text = ps.report.summary_here(info, m, {"sampling_s": 1.0, "s_per_step": 1.0})
    assert text.splitlines()[1].strip() == want
