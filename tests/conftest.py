import logging
import os

import pytest

from helpers.comfy_host import HOST_MISSING, host_available, import_host, import_pack

# In CI (CI=true) nothing may skip: a missing host, browser or package is a broken set-up, not a pass.
SKIP_IS_FAILURE = os.environ.get("CI") == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if SKIP_IS_FAILURE and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI=true), which counts as a failure: {reason}"


def pytest_report_header(config):
    from helpers.comfy_host import COMFYUI_PATH
    return [f"ComfyUI host: {COMFYUI_PATH} ({'found' if host_available() else 'MISSING: host tests will skip'})"]


@pytest.fixture(scope="session")
def comfy():
    """The ComfyUI host, imported in CPU mode; skips (loudly) when it is absent."""
    if not host_available():
        pytest.skip(HOST_MISSING)
    import_host()
    import comfy.sd

    return comfy


@pytest.fixture(scope="session")
def pack(comfy):
    return import_pack()


@pytest.fixture(scope="session")
def tiny_ckpts(comfy, tmp_path_factory):
    """{version: (path, config)}: a tiny LTX-2 and a tiny LTX-2.3 checkpoint (tests/helpers/tiny_ltxav.py)."""
    from helpers.tiny_ltxav import VERSIONS, write_tiny_ltxav

    folder = tmp_path_factory.mktemp("ckpt")
    return {v: (folder / f"tiny_ltxav_{v}.safetensors", write_tiny_ltxav(folder / f"tiny_ltxav_{v}.safetensors",
                                                                          version=v)) for v in VERSIONS}


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_ckpts):
    return tiny_ckpts["2"]


@pytest.fixture
def tiny_model(comfy, tiny_ckpt):
    """A fresh ModelPatcher from ComfyUI's own loader (the UNETLoader path)."""
    return comfy.sd.load_diffusion_model(str(tiny_ckpt[0]))


@pytest.fixture
def tiny_model_f64(comfy, tiny_ckpt):
    """The same checkpoint loaded in float64: the reference every float32 equality test is measured
    against (tests/helpers/numerics.py)."""
    import torch

    return comfy.sd.load_diffusion_model(str(tiny_ckpt[0]), model_options={"dtype": torch.float64})


@pytest.fixture(params=["2", "2.3"], ids=["ltx2", "ltx23"])
def ltx(request, comfy, tiny_ckpts):
    """Each tiny checkpoint in turn: (float32 model, float64 model, raw conditioning width, config)."""
    import torch

    from helpers.tiny_ltxav import context_width

    path, config = tiny_ckpts[request.param]
    load = comfy.sd.load_diffusion_model
    return load(str(path)), load(str(path), model_options={"dtype": torch.float64}), context_width(config), config


@pytest.fixture(scope="session")
def server(comfy, tiny_ckpt, tmp_path_factory):
    """One headless ComfyUI (--cpu) on 127.0.0.1 with this pack in custom_nodes (and the test-only float64
    loader), the tiny checkpoint in models/diffusion_models and the conditioning/audio-latent dataset the
    test workflows load."""
    import shutil

    from helpers.comfy_server import FLOAT64_NODES, ComfyServer, write_inputs

    srv = ComfyServer(tmp_path_factory.mktemp("comfy_base"))
    # the test-only loader of whole-workflow float64 references (tests/helpers/float64_nodes)
    (srv.base / "custom_nodes" / "ltxav_test_float64_nodes").symlink_to(FLOAT64_NODES, target_is_directory=True)
    shutil.copy(tiny_ckpt[0], srv.base / "models" / "diffusion_models" / "tiny_ltxav.safetensors")
    srv.dataset = write_inputs(srv.base, tiny_ckpt[1]["caption_channels"], length=25)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ps(pack):
    """The parallel sampler's driver package (its POOL is the one worker group of this process)."""
    import importlib

    return importlib.import_module("ltxav_pack.driver")


@pytest.fixture(scope="module")
def nodes_mod(pack):
    import importlib

    return importlib.import_module("ltxav_pack.nodes_parallel_sampler")


@pytest.fixture(scope="module")
def ray_stopped_after_module(ps):
    """After the module's tests: the workers and Ray stopped, a private cluster's folder removed (the next
    module starts its own)."""
    yield
    import ray

    ps.POOL.shutdown("the test module is done")
    if ray.is_initialized():  # joined with ray.init of the test's own
        ray.shutdown()


@pytest.fixture
def here(ps, monkeypatch):
    """The driver as on a machine with a GPU: the one-GPU decision applies (gpus=1 samples in this process);
    no workers left running."""
    ps.POOL.stop_group()
    monkeypatch.setattr(ps.workers, "cpu_mode", lambda: False)
    return ps


@pytest.fixture
def lean_here(here, monkeypatch):
    """``here``, with gpus=1 runs taking the lean attention as for a clip that needs it (the tiny models' clips
    fit ComfyUI's own attention; the decision itself: tests/test_one_gpu_in_process.py)."""
    monkeypatch.setattr(here.in_process, "needs_lean_attention", lambda *a, **kw: True)
    return here


@pytest.fixture
def small_ranges(pack, monkeypatch):
    """The lean attention's ranges of a few tokens (the tiny model's clips have 96), so every range path runs."""
    import importlib

    from helpers.lean_ranges import shrink

    lean = importlib.import_module("ltxav_pack.lean_attention")
    rope = importlib.import_module("ltxav_pack.models.ltx_rope")
    shrink(lean, rope, monkeypatch.setattr)
    monkeypatch.setattr(rope, "_LAYOUT_OK", {})


@pytest.fixture
def caplog_info(caplog):
    caplog.set_level(logging.INFO)
    return caplog
