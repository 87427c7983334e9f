"""Models and patches from other node packs on 2 CPU workers (real Ray actors, gloo), against the stock
samplers on the same inputs: ComfyUI-GGUF's loaders (Q8_0 and Q4_0, LTX-2 and LTX-2.3, LoRA, file and
model reuse), Lightricks' ComfyUI-LTXVideo (MultimodalGuider with STG and modality guidance, STGGuider,
the per-step statistics normalisation) and a stand-in pack whose patch cannot be rebuilt on a worker;
and both packs in a headless ComfyUI server through POST /prompt. The node packs are the test host's
(installed by .ci/setup_env.sh), loaded as ComfyUI loads them."""
import importlib
import logging
import re
import uuid

import pytest
import torch

from helpers.comfy_host import ROOT, make_latent
from helpers.lean_ranges import values_recorded
from helpers.node_packs import GGUF, LTXVIDEO, load_node_pack, not_installed, submodule, write_standin_pack
from helpers.numerics import assert_matches, mismatches
from helpers.sampler_cases import (
    LATENT,
    assert_equals_stock,
    conds,
    ltxv_sigmas,
    multimodal,
    parallel_ksampler,
    stock_ksampler,
    worker_infos,
)

pytestmark = pytest.mark.usefixtures("ray_stopped_after_module")
STEPS = 2


def node_pack(name):
    pack = load_node_pack(name)
    if pack is None:
        pytest.skip(not_installed(name))
    return pack


@pytest.fixture(scope="module")
def gguf_pack(comfy, pack):
    return node_pack(GGUF)


@pytest.fixture(scope="module")
def ltxvideo(comfy, pack):
    return node_pack(LTXVIDEO)


@pytest.fixture(scope="module")
def gguf_files(gguf_pack, tiny_ckpts, tmp_path_factory):
    """Tiny GGUF checkpoints in a folder ComfyUI's diffusion_models list holds (the workers are not told:
    they find it from the file's path): {(version, quant): (file name, path, config)}."""
    import folder_paths

    from helpers.tiny_gguf import write_tiny_gguf

    folder = tmp_path_factory.mktemp("gguf")
    out = {}
    for version, quant in (("2", "Q8_0"), ("2.3", "Q4_0")):
        name = f"tiny_ltxav_{version}_{quant}.gguf"
        write_tiny_gguf(tiny_ckpts[version][0], folder / name, quant)
        out[version, quant] = (name, folder / name, tiny_ckpts[version][1])
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    return out


def lora_for(config_path, tmp_path, name):
    import folder_paths

    from helpers.tiny_ltxav import write_lora

    write_lora(config_path, ("transformer_blocks.0.ff.net.0.proj", "transformer_blocks.1.attn1.to_q"),
               tmp_path / name)
    folder_paths.add_model_folder_path("loras", str(tmp_path))


def with_lora(model, name, strength=1.0):
    import nodes

    return nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]


# --------------------------------------------------------------------------- ComfyUI-GGUF

@pytest.mark.parametrize("version,quant,advanced",
                         [("2", "Q8_0", None), ("2.3", "Q4_0", ("float32", "float32", False))],
                         ids=["ltx2-q8_0", "ltx23-q4_0-advanced"])
def test_gguf_model_equals_stock_with_lora_and_reuse(ps, nodes_mod, gguf_pack, gguf_files, tiny_ckpts, tmp_path,
                                                     version, quant, advanced):
    """UnetLoaderGGUF (Q8_0, LTX-2) and UnetLoaderGGUFAdvanced (Q4_0, LTX-2.3, float32 dequant and patch dtypes)
    on 2 workers equal stock GGUF; the same file loaded again is not read again; a LoRA is applied on the
    loaded weights without reading the file, and its removal puts the original weights back."""
    from helpers.tiny_gguf import float64_twin, load_gguf
    from helpers.tiny_ltxav import context_width

    gguf_nodes = submodule(gguf_pack, "nodes")
    name, path, config = gguf_files[version, quant]
    loader = gguf_nodes.UnetLoaderGGUFAdvanced if advanced else gguf_nodes.UnetLoaderGGUF
    model = load_gguf(loader, name, *(advanced or ()))
    assert model.cached_patcher_init is None  # ComfyUI-GGUF records no recipe: the pack finds file and options
    reference_model = float64_twin(model, path)
    cc = context_width(config)
    got, ui = parallel_ksampler(nodes_mod, model, cc, steps=STEPS)
    want, reference = stock_ksampler(model, cc, steps=STEPS), stock_ksampler(reference_model, cc, steps=STEPS)
    assert_matches(got, want, reference)
    # the twin: workers that loaded the unquantized checkpoint instead would fail the check
    plain = importlib.import_module("comfy.sd").load_diffusion_model(str(tiny_ckpts[version][0]))
    assert mismatches(stock_ksampler(plain, cc, steps=STEPS), want, reference)
    assert "(read from file;" in ui.value
    start = worker_infos(ps)
    assert {i["patcher"] for i in start} == {"GGUFModelPatcher"}  # ComfyUI-GGUF's own model on the workers

    again = load_gguf(loader, name, *(advanced or ()))  # ComfyUI ran the loader again: a new MODEL, same file
    got, ui = parallel_ksampler(nodes_mod, again, cc, steps=STEPS)
    assert_matches(got, want, reference)
    assert "(kept;" in ui.value and worker_infos(ps) == start

    lora_for(tiny_ckpts[version][0], tmp_path, f"gguf_lora_{version}.safetensors")
    patched = with_lora(model, f"gguf_lora_{version}.safetensors")
    lora_want = stock_ksampler(patched, cc, steps=STEPS)
    lora_ref = stock_ksampler(with_lora(reference_model, f"gguf_lora_{version}.safetensors"), cc, steps=STEPS)
    assert mismatches(want, lora_want, lora_ref)  # the LoRA matters
    got, ui = parallel_ksampler(nodes_mod, patched, cc, steps=STEPS)
    assert_matches(got, lora_want, lora_ref)
    assert "(patches re-applied, file not read;" in ui.value
    got, _ = parallel_ksampler(nodes_mod, model, cc, steps=STEPS)  # the LoRA removed
    assert_matches(got, want, reference)
    infos = worker_infos(ps)
    assert [i["loads"] for i in infos] == [i["loads"] for i in start]  # the file was read once
    assert [i["repatches"] for i in infos] == [i["repatches"] + 2 for i in start]


@pytest.mark.quick
def test_gguf_recipe_names_file_and_options(pack, gguf_pack, gguf_files):
    """The recipe of a GGUF MODEL: ComfyUI-GGUF's loader class, the file, and the Advanced loader's options
    as the model holds them; a file moved out of the folders the loader lists is an error naming the node."""
    import folder_paths

    from helpers.tiny_gguf import load_gguf

    recipes = importlib.import_module("ltxav_pack.model_recipes")
    gguf_nodes = submodule(gguf_pack, "nodes")
    name, path, _ = gguf_files["2.3", "Q4_0"]
    model = load_gguf(gguf_nodes.UnetLoaderGGUFAdvanced, name, "bfloat16", "target", True)
    fn, args = recipes.recipe_of(model, "Node")
    assert fn is recipes.load_gguf and args == (gguf_nodes.UnetLoaderGGUF, str(path), "bfloat16", "target", True)
    name8, path8, _ = gguf_files["2", "Q8_0"]
    model8 = load_gguf(gguf_nodes.UnetLoaderGGUF, name8)  # the same file kind, another file: told apart
    assert recipes.recipe_of(model8, "Node")[1][1:] == (str(path8), "default", "default", None)
    folders = folder_paths.folder_names_and_paths["diffusion_models"][0]
    folders.remove(str(path.parent))
    try:
        recipes._GGUF_FILES.clear()
        with pytest.raises(ValueError, match=r"Node: the MODEL comes from ComfyUI-GGUF's Unet Loader \(GGUF\), but "
                                             r"none of the \d+ .gguf files that loader lists holds its weights"):
            recipes.recipe_of(model, "Node")
    finally:
        folders.append(str(path.parent))


@pytest.mark.quick
def test_planner_counts_gguf_weights_as_stored_and_casts_by_elements(pack, gguf_pack, gguf_files, tiny_ckpts):
    """ModelDims of a Q4_0 GGUF model: weights as stored (half a byte and a scale per element), casts of
    its quantized linears by their logical elements (compute dtype plus ComfyUI-GGUF's float16 dequantized
    copy), not by their stored bytes (44% under a bf16 cast for Q4_0)."""
    import comfy.sd

    from helpers.tiny_gguf import load_gguf

    mp = importlib.import_module("ltxav_pack.memory_plan")
    name, _, _ = gguf_files["2.3", "Q4_0"]
    q4 = load_gguf(submodule(gguf_pack, "nodes").UnetLoaderGGUF, name).model.diffusion_model
    plain = comfy.sd.load_diffusion_model(str(tiny_ckpts["2.3"][0])).model.diffusion_model
    linear = q4.transformer_blocks[0].ff.net[2]  # 384 -> 96, quantized
    assert mp.gguf_quantized(linear.weight) and linear.weight.numel() == 96 * 384 // 32 * 18
    assert mp.cast_bytes(linear.weight, torch.bfloat16, 2) == 96 * 384 * (2 + 2)
    family = importlib.import_module("ltxav_pack.models").family_of(plain, "test")
    dims, dims_plain = family.plan_dims(q4, torch.bfloat16), family.plan_dims(plain, torch.bfloat16)
    assert dims.blocks_bytes < dims_plain.blocks_bytes / 4  # the blocks: float32 against mostly Q4_0
    assert dims.cast_bytes == 2 * dims_plain.cast_bytes  # the largest linear: bf16 cast plus the float16 copy


# --------------------------------------------------------------------------- ComfyUI-LTXVideo

@pytest.fixture
def ltx23(comfy, tiny_ckpts):
    import comfy.sd

    from helpers.tiny_ltxav import context_width

    path, config = tiny_ckpts["2.3"]
    return (comfy.sd.load_diffusion_model(str(path)),
            comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float64}), context_width(config))


def multimodal_guider(ltxvideo, model, cc, stg=1.0):
    """MultimodalGuider as its LTX-2.3 example workflows set it: cfg, STG on block 1 (perturbed self
    attention) and modality guidance, for video and audio."""
    return multimodal(model, cc, video=(3.0, stg, 2.0), audio=(2.0, stg, 1.5))


def stg_guider(ltxvideo, model, cc, stg=1.0):
    """LTXVApplySTG (block 1) then STGGuider, as ComfyUI-LTXVideo's STG workflows chain them."""
    stg_mod = submodule(ltxvideo, "stg")
    model = stg_mod.LTXVApplySTG().apply_stg(model, "1")[0]
    pos, neg = conds(cc)
    return stg_mod.STGGuiderNode().get_guider(model, pos, neg, 3.0, stg, 0.0)[0]


def custom_advanced(nodes_mod, guider, latent, sigmas, parallel=True, gpus=2):
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    sampler = comfy.samplers.sampler_object("euler")
    if parallel:
        out = nodes_mod.LTXAVParallelSamplerCustomAdvanced.execute(Noise_RandomNoise(5), guider, sampler, sigmas,
                                                                   latent, gpus, 0, 1, "local", "off")
        return out.args[0], out.ui
    return SamplerCustomAdvanced.execute(Noise_RandomNoise(5), guider, sampler, sigmas, latent).args[0]


@pytest.mark.parametrize("make", [multimodal_guider, stg_guider], ids=["multimodal-guider", "stg-guider"])
def test_ltxvideo_guiders_equal_stock(ps, nodes_mod, ltxvideo, ltx23, make):
    """ComfyUI-LTXVideo's guiders on 2 workers equal stock: their block patches (STG) and the guider travel
    in one pickle, so the flag the guider sets is the one its patches read (the test below checks how)."""
    model, model_f64, cc = ltx23
    latent = make_latent(**LATENT)
    sigmas = ltxv_sigmas(latent, steps=STEPS)
    guider = make(ltxvideo, model, cc)
    want = custom_advanced(nodes_mod, guider, latent, sigmas, parallel=False)
    reference = custom_advanced(nodes_mod, make(ltxvideo, model_f64, cc), latent, sigmas, parallel=False)
    # the twin: STG that never skips attention (a flag copied apart from the guider's) gives this
    assert mismatches(custom_advanced(nodes_mod, make(ltxvideo, model, cc, stg=0.0), latent, sigmas, parallel=False),
                      want, reference)
    got, ui = custom_advanced(nodes_mod, make(ltxvideo, model, cc), latent, sigmas)
    assert_matches(got, want, reference)
    assert "2 workers" in ui.value


@pytest.mark.quick
def test_options_and_job_share_objects_and_refer_to_the_workers_blocks(pack, ltxvideo, ltx23):
    """As a worker rebuilds them (a clone of its own model, ``loads`` with its references): MultimodalGuider's
    STG block patches read the flag of the guider that comes in the same pickle, and hold the worker's own
    transformer blocks; each block patch alone is small. The twin: pickled apart, the flag comes back as two."""
    model, _, cc = ltx23
    transfer = importlib.import_module("ltxav_pack.model_transfer")
    jobs = importlib.import_module("ltxav_pack.jobs")
    guider = multimodal_guider(ltxvideo, model, cc)
    spec = transfer.model_spec(guider.model_patcher)
    latent = make_latent(**LATENT)
    job = jobs.GuiderJob(noise=None, latent=latent["samples"], noise_mask=None, seed=5, guider=guider, sampler=None,
                         sigmas=ltxv_sigmas(latent, steps=STEPS))
    payload = spec.job_payload(job)
    worker_model = importlib.import_module("comfy.sd").load_diffusion_model(str(model.cached_patcher_init[1][0]))
    clone = worker_model.clone()
    refs = transfer.model_refs(clone)
    parts = transfer.loads(payload, refs)
    for option in parts["options"]:
        option.apply(clone)
    replaced = clone.model_options["transformer_options"]["patches_replace"]["dit"]
    blocks = clone.model.diffusion_model.transformer_blocks
    assert [replaced["double_block", i].block for i in range(len(blocks))] == list(blocks)
    assert all(replaced["double_block", i].flag is parts["job"].guider.stg_flag for i in range(len(blocks)))
    assert parts["job"].guider.model_patcher is clone
    block_bytes = sum(p.numel() * p.element_size() for p in blocks.parameters())
    patches = {name: data for name, data in spec.check_parts().items() if "patches_replace" in name}
    assert len(payload) < block_bytes / 10 and len(patches) == 2 and all(len(d) < 4096 for d in patches.values())
    apart = transfer.loads(spec.check_parts()["transformer option patches_replace/dit/('double_block', 0)"], refs)
    assert apart.flag is not transfer.loads(transfer.dumps(job, spec.refs), refs).guider.stg_flag


def test_ltxvideo_stat_norm_patcher_equals_stock(ps, nodes_mod, ltxvideo, ltx23):
    """LTXVPerStepStatNormPatcher (a post-CFG function closing over its step counter) on 2 workers equals
    stock, with its counter starting where the driver's stands."""
    model, model_f64, cc = ltx23
    norm = submodule(ltxvideo, "latent_norm").LTXVPerStepStatNormPatcher()

    def patched(m):
        return norm.patch_model(m, "0.9, 0.5", 0.0, 1.0, 100.0, False)[0]

    want, reference = stock_ksampler(patched(model), cc, steps=STEPS), stock_ksampler(patched(model_f64), cc,
                                                                                      steps=STEPS)
    assert mismatches(stock_ksampler(model, cc, steps=STEPS), want, reference)  # the patch matters
    got, _ = parallel_ksampler(nodes_mod, patched(model), cc, steps=STEPS)
    assert_matches(got, want, reference)


# --------------------------------------------------------------------------- the lean attention on their models

HERE = "in ComfyUI's process (one GPU: no workers)"


def test_gguf_model_lean_in_comfyuis_process_equals_stock(lean_here, nodes_mod, gguf_pack, gguf_files, small_ranges):
    """gpus=1 on one GPU samples in ComfyUI's process with the lean attention; its ranges shrunk so every range
    path runs, a GGUF Q4_0 LTX-2.3 model (gated attention, ComfyUI-GGUF's layers) under inference mode, as
    ComfyUI runs nodes, equals stock GGUF, with self-attention's values in their input's buffer. The twin: the
    gate read after the value overwrote its input fails the check."""
    from helpers.tiny_gguf import float64_twin, load_gguf
    from helpers.tiny_ltxav import context_width

    lean = importlib.import_module("ltxav_pack.lean_attention")
    name, path, config = gguf_files["2.3", "Q4_0"]
    model = load_gguf(submodule(gguf_pack, "nodes").UnetLoaderGGUF, name)
    cc = context_width(config)
    want, reference = stock_ksampler(model, cc, steps=STEPS), stock_ksampler(float64_twin(model, path), cc,
                                                                            steps=STEPS)
    with torch.inference_mode(), values_recorded(lean) as values:
        got, ui = parallel_ksampler(nodes_mod, model, cc, steps=STEPS, gpus=1)
    assert HERE in ui.value and values and all(values)
    assert_matches(got, want, reference)
    with torch.inference_mode(), values_recorded(lean, keep_gate=False) as values:
        twin, _ = parallel_ksampler(nodes_mod, model, cc, steps=STEPS, gpus=1)
    assert values and all(values)
    assert mismatches(twin, want, reference)


def gguf_projection(gguf_pack, width=64, seed=0):
    """A square output projection as ComfyUI's LTX attention has one (``Sequential(Linear, Dropout)``), its
    Linear ComfyUI-GGUF's with a Q8_0 weight (quantized by the ``gguf`` package) and an F32 bias, loaded as
    its loader loads a layer's tensors."""
    import gguf
    import numpy as np

    ops = submodule(gguf_pack, "ops")
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(width, width, generator=g) * 0.05
    q8 = gguf.GGMLQuantizationType.Q8_0
    blocks = torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(weight.numpy(), q8)))
    linear = ops.GGMLOps.Linear(width, width)
    linear.load_state_dict({"weight": ops.GGMLTensor(blocks, tensor_type=q8, tensor_shape=torch.Size([width, width])),
                            "bias": torch.randn(width, generator=g) * 0.05})
    assert linear.is_ggml_quantized()
    return torch.nn.Sequential(linear, torch.nn.Dropout(0.0)).eval()


def dequantizations(monkeypatch, gguf_pack) -> list:
    """Each ``dequantize_tensor`` call ComfyUI-GGUF's layers make, by the shape of what they dequantize."""
    ops, calls = submodule(gguf_pack, "ops"), []
    real = ops.dequantize_tensor
    monkeypatch.setattr(ops, "dequantize_tensor", lambda tensor, *a, **k: calls.append(
        tuple(getattr(tensor, "tensor_shape", tensor.shape))) or real(tensor, *a, **k))
    return calls


@pytest.mark.quick
def test_gguf_projection_by_ranges_dequantizes_once(gguf_pack, small_ranges, monkeypatch):
    """The lean attention's output projection over a long input, a range of tokens at a time into the input's
    buffer, dequantizes a GGUF weight (and its bias) once per call, as the call on the whole input does,
    not once a range, and again at the next call; its output equals ComfyUI-GGUF's own forward range by range,
    to the bit, under inference mode; the layer has no instance attribute left. The twin: ranges without it
    dequantize every range."""
    from helpers.lean_ranges import LONG

    lean = importlib.import_module("ltxav_pack.lean_attention")
    ffn_chunking = importlib.import_module("ltxav_pack.ffn_chunking")
    proj = gguf_projection(gguf_pack)
    calls = dequantizations(monkeypatch, gguf_pack)
    tokens = 4 * LONG + 3
    x = torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(1))
    n_ranges = -(-tokens // LONG)
    with torch.inference_mode():
        proj(x)
        whole = list(calls)
        calls.clear()
        run = lean.projecting_in_place(proj)
        got = run(x.clone())
        once = list(calls)
        calls.clear()
        run(x.clone())  # the next call (the next step, a LoRA changed meanwhile) dequantizes again
        again = list(calls)
        calls.clear()
        want = ffn_chunking.chunked_forward(proj, x.clone(), n_ranges, whole_view=True)  # the same ranges
        every_range = list(calls)
    assert whole == [(64,), (64, 64)]  # the bias, then the weight
    assert once == whole == again and torch.equal(got, want)
    assert "cast_bias_weight" not in vars(proj[0])
    assert every_range == whole * n_ranges != once


def test_ltxvideo_guider_lean_in_comfyuis_process_equals_stock(lean_here, nodes_mod, ltxvideo, ltx23, small_ranges,
                                                              monkeypatch):
    """MultimodalGuider with STG at gpus=1 in ComfyUI's process, the lean attention's ranges shrunk, under
    inference mode: equals stock; its STG block patches (``patches_replace``) keep self-attention's values in
    a buffer of their own. The twin: STG that never skips attention gives another result."""
    model, model_f64, cc = ltx23
    lean = importlib.import_module("ltxav_pack.lean_attention")
    rope = importlib.import_module("ltxav_pack.models.ltx_rope")
    rotate, rotations = rope.RotaryTable.rotate, []
    monkeypatch.setattr(rope.RotaryTable, "rotate", lambda table, x, norm=None: rotations.append(x.shape[1])
                        or rotate(table, x, norm))
    latent = make_latent(**LATENT)
    sigmas = ltxv_sigmas(latent, steps=STEPS)
    want = custom_advanced(nodes_mod, multimodal_guider(ltxvideo, model, cc), latent, sigmas, parallel=False)
    reference = custom_advanced(nodes_mod, multimodal_guider(ltxvideo, model_f64, cc), latent, sigmas, parallel=False)
    assert mismatches(custom_advanced(nodes_mod, multimodal_guider(ltxvideo, model, cc, stg=0.0), latent, sigmas,
                                      parallel=False), want, reference)
    with torch.inference_mode(), values_recorded(lean) as values:
        got, ui = custom_advanced(nodes_mod, multimodal_guider(ltxvideo, model, cc), latent, sigmas, gpus=1)
    assert HERE in ui.value and not values and rotations  # the lean forward ran, values in their own buffer
    assert_matches(got, want, reference)


# --------------------------------------------------------------------------- a patch no worker can rebuild

@pytest.fixture
def standin(comfy, pack):
    """A stand-in node pack loaded as ComfyUI loads it, then its ``gone`` module deleted, as a pack missing
    where a worker runs."""
    import shutil

    name = f"ltxav_standin_{uuid.uuid4().hex[:8]}"
    folder = write_standin_pack(name)
    try:
        module = load_node_pack(name)
        (folder / "gone.py").unlink()
        yield module
    finally:
        shutil.rmtree(folder)


def test_patch_no_worker_can_rebuild_is_dropped_with_a_warning(ps, nodes_mod, standin, tiny_model, tiny_model_f64,
                                                               tiny_ckpt, caplog_info):
    """A stand-in pack's post-CFG function travels (its ``patches`` module imports on the workers, the pack's
    __init__ and its side effect do not run there); its APPLY_MODEL wrapper, from a module the workers
    cannot import, is found before sampling and dropped with a warning naming the pack and the option: the
    run completes without it and the workers stay. A guider of that module is refused before sampling, the
    workers still stay, and the next prompt runs."""
    import os

    import comfy.patcher_extension
    import comfy.samplers

    cc = tiny_ckpt[1]["caption_channels"]
    scale = submodule(standin, "patches").Scale
    gone = submodule(standin, "gone")
    pack_folder = standin.__name__.rsplit("/", 1)[-1]

    def patched(m, shift=True):
        m = m.clone()
        m.set_model_sampler_post_cfg_function(scale(0.8))
        if shift:
            m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "standin", gone.shift)
        return m

    parallel_ksampler(nodes_mod, tiny_model, cc, steps=1)  # workers up
    pids = [i["pid"] for i in worker_infos(ps)]
    got, _ = parallel_ksampler(nodes_mod, patched(tiny_model), cc, steps=STEPS)
    want, reference = (stock_ksampler(patched(m, shift=False), cc, steps=STEPS) for m in (tiny_model, tiny_model_f64))
    assert_matches(got, want, reference)  # the post-CFG function travelled, the wrapper did not
    assert mismatches(got, stock_ksampler(tiny_model, cc, steps=STEPS), stock_ksampler(tiny_model_f64, cc, steps=STEPS))
    assert mismatches(got, stock_ksampler(patched(tiny_model), cc, steps=STEPS),
                      stock_ksampler(patched(tiny_model_f64), cc, steps=STEPS))
    warning = [r.getMessage() for r in caplog_info.records
               if r.levelno == logging.WARNING and "dropped" in r.getMessage()]
    assert len(warning) == 1 and re.search(rf"LTXAV Parallel Sampler: dropped on the workers \({pack_folder} cannot "
                                           r"be rebuilt there: ModuleNotFoundError: .*\): wrapper apply_model/standin; "
                                           r"the run goes on without them", warning[0]), warning
    assert [i["pid"] for i in worker_infos(ps)] == pids
    folder = os.path.dirname(standin.__file__)
    assert sorted(f for f in os.listdir(folder) if f.startswith("init_ran_in_")) == [f"init_ran_in_{os.getpid()}"]

    guider = gone.StandinGuider(tiny_model)
    pos, neg = conds(cc)
    guider.set_conds(pos, neg)
    guider.set_cfg(3.0)
    latent = make_latent(**LATENT)
    with pytest.raises(ValueError, match=rf"LTXAV Parallel Sampler: the workers cannot rebuild the sampler's inputs "
                                         rf"\(they refer to {pack_folder}\): ModuleNotFoundError"):
        custom_advanced(nodes_mod, guider, latent, ltxv_sigmas(latent, steps=STEPS))
    assert [i["pid"] for i in worker_infos(ps)] == pids
    got, _ = parallel_ksampler(nodes_mod, tiny_model, cc, steps=STEPS)
    assert_equals_stock(got, tiny_model, tiny_model_f64, cc, steps=STEPS)


PACK_INIT = """\
import os

from .sub import InSub  # noqa: F401

open(os.path.join(os.path.dirname(__file__), f"init_ran_in_{os.getpid()}"), "w").close()
NODE_CLASS_MAPPINGS = {}


class InInit:
    pass
"""
UNPICKLE = """\
import importlib, sys
from helpers.comfy_host import import_pack
import_pack(run_init=False)
transfer = importlib.import_module("ltxav_pack.model_transfer")
print(type(transfer.loads(open(sys.argv[1], "rb").read(), {})).__name__)
"""


@pytest.mark.quick
def test_a_worker_imports_a_pack_under_comfyuis_name_running_its_init_only_when_needed(comfy, pack, tmp_path):
    """In a fresh process, as in a worker: an object of a node pack's submodule unpickles under the module
    name ComfyUI gave the pack, without running the pack's __init__; one defined in the __init__ runs it."""
    import os
    import shutil
    import subprocess
    import sys

    from helpers.node_packs import CUSTOM_NODES

    transfer = importlib.import_module("ltxav_pack.model_transfer")
    name = f"ltxav_init_{uuid.uuid4().hex[:8]}"
    folder = CUSTOM_NODES / name
    folder.mkdir()
    try:
        (folder / "__init__.py").write_text(PACK_INIT)
        (folder / "sub.py").write_text("class InSub:\n    pass\n")
        module = load_node_pack(name)
        assert transfer.modules_of(transfer.dumps(module.InInit(), {})) == [name]
        seen = []
        for obj, kind in ((submodule(module, "sub").InSub(), "InSub"), (module.InInit(), "InInit")):
            (tmp_path / "obj.pkl").write_bytes(transfer.dumps(obj, {}))
            out = subprocess.run([sys.executable, "-c", UNPICKLE, str(tmp_path / "obj.pkl")], capture_output=True,
                                 text=True, cwd=str(ROOT / "tests"),
                                 env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})
            assert out.returncode == 0 and out.stdout.strip() == kind, out.stderr[-2000:]
            seen.append(sorted(f for f in os.listdir(folder) if f.startswith("init_ran_in_")))
        assert len(seen[0]) == 1 and len(seen[1]) == 2  # the test process's; then the second process's too
    finally:
        shutil.rmtree(folder)


@pytest.mark.quick
def test_model_without_load_recipe_is_refused(pack, tiny_model, tiny_ckpt):
    """A MODEL built from a state dict by a loader that records nothing: the error names the node and
    the loaders that work."""
    import json

    import comfy.sd

    transfer = importlib.import_module("ltxav_pack.model_transfer")
    sd = tiny_model.model.diffusion_model.state_dict()
    built = comfy.sd.load_diffusion_model_state_dict(sd, metadata={"config": json.dumps({"transformer": tiny_ckpt[1]})})
    with pytest.raises(ValueError, match=r"Node: the MODEL has no load recipe: .*'Load Diffusion Model'.*"
                                         r"ComfyUI-GGUF's 'Unet Loader \(GGUF\)'.*gpus=1"):
        transfer.model_spec(built, node="Node")


# --------------------------------------------------------------------------- POST /prompt

def test_gguf_and_ltxvideo_patch_through_post_prompt(gguf_pack, ltxvideo, gguf_files, tiny_ckpts,
                                                     tmp_path_factory):
    """A headless ComfyUI with both packs in its custom_nodes: UnetLoaderGGUF (Q8_0) -> the statistics
    normalisation patch -> LTXAV Parallel KSampler (2 workers) through POST /prompt equals the same
    workflow with the stock KSampler; nothing dropped."""
    import os
    import shutil

    from helpers.comfy_server import ComfyServer, t2v_prompt, t2v_reference, write_inputs
    from helpers.node_packs import CUSTOM_NODES
    from helpers.tiny_gguf import float64_twin, load_gguf

    name, path, config = gguf_files["2", "Q8_0"]
    srv = ComfyServer(tmp_path_factory.mktemp("comfy_packs"))
    for folder in (GGUF, LTXVIDEO):
        os.symlink(CUSTOM_NODES / folder, srv.base / "custom_nodes" / folder, target_is_directory=True)
    shutil.copy(path, srv.base / "models" / "diffusion_models" / name)
    srv.dataset = write_inputs(srv.base, config["caption_channels"], length=25)
    norm = {"class_type": "LTXVPerStepStatNormPatcher",
            "inputs": {"factors": "0.9, 0.5", "target_mean": 0.0, "target_std": 1.0, "percentile": 100.0,
                       "clip_outliers": False}}
    loader = {"1": {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": name}}}
    try:
        srv.start()
        stock = srv.run(t2v_prompt(name, srv.dataset, steps=STEPS, model_node=norm, extra=loader, prefix="stock"))
        prompt = t2v_prompt(name, srv.dataset, steps=STEPS, model_node=norm, extra=loader, prefix="par")
        prompt["6"] = {"class_type": "LTXAVParallelKSampler",
                       "inputs": {**prompt["6"]["inputs"], "gpus": 2, "ulysses_degree": 0, "ring_degree": 1,
                                  "ray_address": "local", "cfg_parallel": "off"}}
        par = srv.run(prompt)
        assert stock["status"]["status_str"] == par["status"]["status_str"] == "success", (stock["status"],
                                                                                          par["status"])
        log = srv.log()
    finally:
        srv.stop()
    assert "dropped on the workers" not in log and "not reproduced on the workers" not in log
    patch = submodule(ltxvideo, "latent_norm").LTXVPerStepStatNormPatcher()
    model = load_gguf(submodule(gguf_pack, "nodes").UnetLoaderGGUF, name)
    reference_model = patch.patch_model(float64_twin(model, path), "0.9, 0.5", 0.0, 1.0, 100.0, False)[0]
    reference = t2v_reference(reference_model, srv.base, srv.dataset, steps=STEPS)
    want, got = srv.saved_latents(stock), srv.saved_latents(par)
    for k in ("8", "9"):
        assert_matches(got[k], want[k], reference[k], f"SaveLatent {k}")
