"""LTX FFN Chunker through the real ComfyUI model, loader, sampler and LoRA path."""
import importlib

import pytest
import torch

from helpers.comfy_host import make_conditioning, make_latent
from helpers.numerics import assert_matches, mismatches
from helpers.tiny_ltxav import context_width

pytestmark = pytest.mark.quick  # the whole module is in the fast subset


@pytest.fixture(scope="module")
def fc(pack):
    return importlib.import_module("ltxav_pack.ffn_chunking")


@pytest.fixture(scope="module")
def node(pack):
    return importlib.import_module("ltxav_pack.nodes_ltx_ffn_chunker").LTXFFNChunker


@pytest.fixture
def spy(fc, monkeypatch):
    """Counts chunked FFN calls per chunk count."""
    calls = []
    real = fc.chunked_forward

    def counting(ff, x, num_chunks):
        calls.append((x.shape[1], num_chunks))
        return real(ff, x, num_chunks)

    monkeypatch.setattr(fc, "chunked_forward", counting)
    return calls


def sample(model, ckpt, audio=True, seed=42, steps=2, **latent):
    """Stock KSampler on ``model``; ``ckpt``: its (path, config), for the conditioning's width."""
    import nodes

    cc = context_width(ckpt[1])
    lat = make_latent(audio=audio, **latent)
    out = nodes.common_ksampler(model, seed, steps, 3.0, "euler", "simple",
                                make_conditioning(cc, seed=1), make_conditioning(cc, seed=2), lat)[0]["samples"]
    return out.unbind() if getattr(out, "is_nested", False) else [out]


def chunk(node, model, n=5, auto=False):
    return node.execute(model, auto, n)[0]


LATENT = dict(width=128, height=96, length=25)  # 4 x 3 x 4 = 48 video tokens, 26 audio tokens


@pytest.mark.parametrize("audio", [True, False], ids=["audio", "no-audio"])
@pytest.mark.parametrize("n", [4, 5], ids=["divides", "does-not-divide"])
def test_chunked_equals_unchunked(node, ltx, spy, audio, n):
    model, model_f64, _, config = ltx  # LTX-2 and LTX-2.3
    ckpt = (None, config)
    plain = sample(model, ckpt, audio=audio, **LATENT)
    reference = sample(model_f64, ckpt, audio=audio, **LATENT)
    assert not spy
    chunked = sample(chunk(node, model, n), ckpt, audio=audio, **LATENT)
    layers = 2
    assert (48, n) in spy and len([c for c in spy if c[0] == 48]) == layers * 2  # 2 steps, cond+uncond batched
    if audio:
        assert (26, n) in spy
    assert_matches(chunked, plain, reference)


def _break_one_chunk(fc, monkeypatch, how):
    """``chunked_forward`` with its second chunk's rows shifted by one token, or scaled by 1 + 2^-10."""
    real = fc.chunked_forward

    def broken(ff, x, num_chunks):
        out = real(ff, x, num_chunks)
        b = fc._chunk_bounds(x.shape[1], num_chunks)
        rows = out[:, b[1]:b[2]]
        rows.copy_(rows.roll(1, dims=1) if how == "shifted" else rows * (1 + 2 ** -10))
        return out

    monkeypatch.setattr(fc, "chunked_forward", broken)


@pytest.mark.parametrize("how", ["shifted", "scaled"])
def test_broken_chunk_is_caught(fc, node, tiny_model, tiny_model_f64, tiny_ckpt, monkeypatch, how):
    """The twin of the test above: one chunk's rows shifted by a token, or off by 2^-10 in scale, fail it."""
    plain = sample(tiny_model, tiny_ckpt, **LATENT)
    reference = sample(tiny_model_f64, tiny_ckpt, **LATENT)
    _break_one_chunk(fc, monkeypatch, how)
    assert mismatches(sample(chunk(node, tiny_model, 5), tiny_ckpt, **LATENT), plain, reference)


def test_auto_chunks_long_sequences(fc, node, tiny_model, tiny_model_f64, tiny_ckpt, spy, monkeypatch, caplog_info):
    memory_plan = importlib.import_module("ltxav_pack.memory_plan")
    plain = sample(tiny_model, tiny_ckpt, **LATENT)
    monkeypatch.setattr(memory_plan, "FFN_MAX_TOKENS_PER_CHUNK", 10)  # the tiny clip counts as "long"
    got = sample(chunk(node, tiny_model, 1, auto=True), tiny_ckpt, **LATENT)
    assert (48, 5) in spy and (26, 3) in spy
    assert "Video FFN chunking active: 5 chunks" in caplog_info.text
    assert_matches(got, plain, sample(tiny_model_f64, tiny_ckpt, **LATENT))


def test_auto_follows_the_patchers_free_memory(comfy, node, tiny_model, tiny_ckpt, spy, monkeypatch):
    """auto sizes chunks from what the model's patcher counts as free for activations (with DynamicVRAM
    that includes the weights comfy-aimdo can page out), not from the allocator's free memory alone:
    48 video tokens x 3,072 bytes (float32, 4x width 96, twice) and 26 audio tokens x 1,536 bytes, a
    chunk within 1/8 of the free memory."""
    import comfy.model_management
    import comfy.model_patcher

    real = comfy.model_management.get_free_memory

    def plenty(dev=None, torch_free_too=False):  # the allocator's view: not what counts
        return (1 << 40, 1 << 40) if torch_free_too else 1 << 40

    monkeypatch.setattr(comfy.model_management, "get_free_memory", plenty)
    video = 48 * 3072 * 8
    for free, want in ((video // 4, [(48, 4), (26, 2)]), (video // 2, [(48, 2)])):
        monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "get_free_memory", lambda self, device, f=free: f)
        spy.clear()
        sample(chunk(node, tiny_model, 1, auto=True), tiny_ckpt, steps=1, **LATENT)
        assert sorted(set(spy), reverse=True) == want, (free, spy)
    monkeypatch.setattr(comfy.model_management, "get_free_memory", real)


def test_auto_leaves_short_sequences_alone(node, tiny_model, tiny_ckpt, spy):
    sample(chunk(node, tiny_model, 1, auto=True), tiny_ckpt, **LATENT)
    assert not spy


def test_bf16_model(comfy, node, tiny_ckpt, tiny_model_f64):
    model = comfy.sd.load_diffusion_model(str(tiny_ckpt[0]), model_options={"dtype": torch.bfloat16})
    plain = sample(model, tiny_ckpt, steps=1, **LATENT)
    chunked = sample(chunk(node, model, 5), tiny_ckpt, steps=1, **LATENT)
    assert_matches(chunked, plain, sample(tiny_model_f64, tiny_ckpt, steps=1, **LATENT), dtype=torch.bfloat16)


def test_log_once_per_run(node, tiny_model, tiny_ckpt, caplog_info):
    m = chunk(node, tiny_model, 4)
    for _ in range(2):
        caplog_info.clear()
        sample(m, tiny_ckpt, steps=3, **LATENT)
        lines = [r.getMessage() for r in caplog_info.records if "FFN chunking active" in r.getMessage()]
        assert lines == ["Video FFN chunking active: 4 chunks (48 tokens)",
                         "Audio FFN chunking active: 4 chunks (26 tokens)"]


def test_one_chunk_fixed_is_off(fc, node, tiny_model):
    m = chunk(node, tiny_model, 1)
    assert fc.CHUNKING_KEY not in m.model_options["transformer_options"]
    assert not m.get_wrappers("diffusion_model", fc.WRAPPER_KEY)


def test_clone_isolation(fc, node, tiny_model, tiny_ckpt, spy):
    before = sample(tiny_model, tiny_ckpt, **LATENT)
    chunked = chunk(node, tiny_model, 4)
    assert chunked is not tiny_model
    assert fc.CHUNKING_KEY not in tiny_model.model_options.get("transformer_options", {})
    sample(chunked, tiny_ckpt, **LATENT)
    assert spy
    dm = tiny_model.model.diffusion_model
    assert all("forward" not in b.ff.__dict__ and "forward" not in b.audio_ff.__dict__ for b in dm.transformer_blocks)
    spy.clear()
    after = sample(tiny_model, tiny_ckpt, **LATENT)  # the same loaded model, without the node
    assert not spy
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_applying_twice_keeps_one_wrapper(fc, node, tiny_model, tiny_ckpt, spy):
    m = chunk(node, chunk(node, tiny_model, 4), 6)
    assert len(m.get_wrappers("diffusion_model", fc.WRAPPER_KEY)) == 1
    sample(m, tiny_ckpt, **LATENT)
    assert {n for _, n in spy} == {6}


@pytest.fixture
def lora_name(comfy, tiny_ckpt, tmp_path):
    """A LoRA on the FFNs and attention of block 0, in the models/loras folder ComfyUI searches."""
    import folder_paths

    from helpers.tiny_ltxav import write_lora

    write_lora(tiny_ckpt[0], ("transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
                              "transformer_blocks.0.audio_ff.net.0.proj", "transformer_blocks.0.attn1.to_q"),
               tmp_path / "tiny_lora.safetensors")
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    return "tiny_lora.safetensors"


def test_lora_with_and_without_chunking(node, tiny_model, tiny_model_f64, tiny_ckpt, lora_name, spy):
    import nodes

    def lora(m):
        return nodes.LoraLoaderModelOnly().load_lora_model_only(m, lora_name, 1.0)[0]

    plain = sample(tiny_model, tiny_ckpt, **LATENT)
    with_lora = sample(lora(tiny_model), tiny_ckpt, **LATENT)
    reference = sample(lora(tiny_model_f64), tiny_ckpt, **LATENT)
    assert mismatches(plain, with_lora, reference)  # the LoRA really changes the output: the check sees it
    lora_then_chunk = sample(chunk(node, lora(tiny_model), 5), tiny_ckpt, **LATENT)
    chunk_then_lora = sample(lora(chunk(node, tiny_model, 5)), tiny_ckpt, **LATENT)
    assert spy
    assert_matches(lora_then_chunk, with_lora, reference)
    assert_matches(chunk_then_lora, with_lora, reference)


def test_non_ltx_model_is_refused(comfy, node):
    from helpers.tiny_ltxav import non_ltx_patcher

    with pytest.raises(ValueError, match=r"LTX FFN Chunker: input 'model' is a Linear model, not an LTX-2 model"):
        node.execute(non_ltx_patcher(), False, 4)


@pytest.mark.parametrize("n", [0, 129])
def test_chunk_count_out_of_range(node, tiny_model, n):
    with pytest.raises(ValueError, match=r"LTX FFN Chunker: input 'num_chunks' is .*use 1 \(off\) to 128"):
        node.execute(tiny_model, False, n)


def test_node_schema(node):
    schema = node.define_schema()
    assert schema.display_name == "LTX FFN Chunker"
    assert all(i.tooltip for i in schema.inputs)
