"""The UI path in a real browser: ComfyUI's own front end (the comfyui-frontend-package the server serves)
in headless Chromium, driven by Playwright, against the shared headless server (conftest ``server``).

- the pack's nodes are in the node search under their display names and drag in from the Node Library;
- each UI-format example workflow opens the way a user opens it (dropped on the canvas, menu File > Open,
  the Templates browser) with no node missing or red and no error overlay, and its screenshot is the
  template thumbnail ``example_workflows/<name>.jpg`` (rewrite them with LTXAV_WRITE_SCREENSHOTS=1);
- with the model files swapped for the tiny checkpoints and inputs in the page, the Run button queues the
  workflow, the server's /history shows it succeeded, and the pack's own examples end in a video file
  (LTXAV Save Video on the sampler's workers) with every frame and its sound.

Skips, saying why, without the ComfyUI host, the Python package playwright or Debian's chromium.
"""
import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers.browser_ui import UI_SETTINGS, ComfyPage, launch, skip_reason
from helpers.comfy_server import PACK_FOLDER
from helpers.official_templates import files_of, write_audio
from helpers.tiny_vae import write_tiny_checkpoint
from helpers.video_files import read_video

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "example_workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))  # API-format copies are in api/, out of the Templates browser
CATEGORY = "LTXAV Multi-GPU"
DISPLAY_NAMES = {"LTXFFNChunker": "LTX FFN Chunker", "LTXAVParallelKSampler": "LTXAV Parallel KSampler",
                 "LTXAVParallelSamplerCustomAdvanced": "LTXAV Parallel SamplerCustomAdvanced",
                 "LTXAVSaveVideo": "LTXAV Save Video", "LTXAVDecodeVideo": "LTXAV Decode Video"}
WRITE_SCREENSHOTS = os.environ.get("LTXAV_WRITE_SCREENSHOTS", "") not in ("", "0")
THUMBNAIL_MAX_BYTES = 300_000
# Every input's tooltip says what it costs: one of these words (case-insensitive) shows it does
COST_WORDS = ("memory", "time", "cost", "slow", "fast", "longer", "second")

SKIP = skip_reason()
needs_browser = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")


def thumbnail(path: Path) -> Path:
    """Where ComfyUI's template browser looks for a custom node's example workflow image: beside the
    .json, same stem, .jpg (the front end's custom-node templates have mediaSubtype 'jpg' and fetch
    /api/workflow_templates/<pack folder>/<stem>.jpg)."""
    return path.with_suffix(".jpg")


@pytest.fixture(scope="module")
def info(server):
    return server.get("/object_info")


def pack_node_ids(pack):
    """The node ids the pack's ComfyExtension registers (in a thread of its own: Playwright's sync API
    keeps an event loop running in this one while the browser is up)."""
    if not hasattr(pack, "comfy_entrypoint"):
        # imported by a test module before the host was on sys.path: its __init__ registered nothing then
        pack.__spec__.loader.exec_module(pack)

    async def ids():
        nodes = await (await pack.comfy_entrypoint()).get_node_list()
        return [cls.define_schema().node_id for cls in nodes]

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, ids()).result()


def test_pack_nodes_display_names_and_input_tooltips(server, pack, info):
    ids = pack_node_ids(pack)
    assert sorted(ids) == sorted(DISPLAY_NAMES)
    assert sorted(k for k, v in info.items() if v["category"] == CATEGORY) == sorted(ids)
    no_tooltip, no_cost = [], []
    for node_id in ids:
        assert info[node_id]["display_name"] == DISPLAY_NAMES[node_id]
        for group in ("required", "optional"):
            for name, spec in info[node_id]["input"].get(group, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                tooltip = str(opts.get("tooltip", "")).strip()
                if not tooltip:
                    no_tooltip.append(f"{node_id}.{name}")
                elif not any(word in tooltip.lower() for word in COST_WORDS):
                    no_cost.append(f"{node_id}.{name}: {tooltip}")
    assert not no_tooltip, f"inputs without a tooltip: {no_tooltip}"
    assert not no_cost, "tooltips that do not say what the input costs (memory, time...):\n" + "\n".join(no_cost)


@pytest.fixture(scope="module")
def ui_server(server):
    """The shared server, plus what a user of the example workflows has and the test host lacks:
    placeholder files under the model names the workflows load (also inside the official templates'
    subgraphs; so the front end reports no missing model; the run swaps them for the tiny checkpoints),
    the images they load (example.png for the i2v LoadImage) and their audio. Front-end settings for a
    predictable page (UI_SETTINGS). Placeholders are removed afterwards."""
    status, _ = server.post("/settings", UI_SETTINGS)
    assert status == 200
    made = []
    for path in UI_FILES:
        for folder, names in files_of(json.loads(path.read_text())).items():
            made += [server.base / ("input" if folder == "input" else f"models/{folder}") / name for name in names]
    made = [p for p in dict.fromkeys(made) if not p.exists()]
    for p in made:
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".png":
            example_image().save(p)
        elif p.suffix == ".mp3":
            write_audio(p)
        else:
            p.write_bytes(b"")
    # the run gives the example workflows' LTXAV Save Video the VAEs of a tiny checkpoint
    server.vae_ckpt = "tiny_ltxav_vae_ui.safetensors"
    vae_file = server.base / "models" / "checkpoints" / server.vae_ckpt
    write_tiny_checkpoint(vae_file)
    made += [vae_file, vae_file.with_name(vae_file.name + ".dm")]  # .dm: its transformer, written first
    yield server
    for p in made:
        p.unlink(missing_ok=True)


def example_image(w=384, h=256):
    """A lighthouse at dusk, for the i2v workflow's LoadImage."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    for y in range(h):
        t = y / (h * 0.7)
        d.line([(0, y), (w, y)], fill=(int(250 - 150 * t), int(150 - 90 * t), int(90 + 60 * t)))
    d.rectangle([0, int(h * 0.7), w, h], fill=(20, 40, 70))
    d.polygon([(250, int(h * 0.72)), (262, 70), (278, 70), (290, int(h * 0.72))], fill=(235, 230, 220))
    d.rectangle([258, 55, 282, 70], fill=(255, 220, 120))
    return img


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


@pytest.fixture
def ui(browser, ui_server, tmp_path):
    page = ComfyPage(browser, ui_server).open()
    yield page
    print(f"\nlast view of the page: {page.screenshot(tmp_path / 'last_view.jpg')}")
    page.close()


def assert_clean(ui: ComfyPage, what: str):
    problems = ui.problems()
    bad = {k: v for k, v in problems.items() if k != "nodes" and v}
    assert not bad, f"{what}: the front end reports problems: {json.dumps(bad, indent=1)}"
    assert not ui.js_errors, f"{what}: JavaScript errors in the page: {ui.js_errors}"


@needs_browser
def test_pack_nodes_in_node_search_and_library(ui, info):
    ui.clear_graph()
    for node_id, name in DISPLAY_NAMES.items():
        assert info[node_id]["display_name"] == name
        titles = ui.search_titles(name)
        assert name in titles, f"node search for {name!r} lists {titles}"
    for i, (node_id, name) in enumerate(DISPLAY_NAMES.items()):
        ui.drag_from_library(CATEGORY, name, x=450 + 120 * i, y=150 + 200 * i)
        ui.page.wait_for_function("t => app.graph.nodes.some(n => n.type === t)", arg=node_id, timeout=10_000)
    assert sorted(ui.node_types()) == sorted(DISPLAY_NAMES)
    assert_clean(ui, "pack nodes dragged in from the Node Library")


@needs_browser
def test_missing_node_is_reported(ui):
    """The checks of the next tests see a missing node when there is one."""
    wf = json.loads(UI_FILES[0].read_text())
    next(n for n in wf["nodes"] if n["type"] == "LTXFFNChunker")["type"] = "LTXFFNChunkerNotInstalled"
    ui.load_graph_data(wf)
    problems = ui.problems()
    assert any("LTXFFNChunkerNotInstalled" in n for n in problems["unknown"]), problems
    assert any("missing" in t.lower() for t in problems["overlay"] + problems["missing_node_cards"]), problems


@needs_browser
@pytest.mark.parametrize("path, how", [(WORKFLOWS / "ltxav_t2v_parallel.json", "drop"),
                                       (WORKFLOWS / "ltxav_i2v_parallel.json", "open")],
                         ids=["t2v-dropped", "i2v-opened"])
def test_example_workflow_loads_clean_and_runs_from_the_run_button(ui, ui_server, path, how, tmp_path):
    assert path in UI_FILES
    (ui.drop_file if how == "drop" else ui.open_file)(path)
    assert ui.active_workflow() == path.stem
    types = ui.node_types()
    assert sorted(types) == sorted(n["type"] for n in json.loads(path.read_text())["nodes"])
    assert "LTXFFNChunker" in types and any(t.startswith("LTXAVParallel") for t in types)
    assert_clean(ui, f"{path.name} {how}")

    ui.frame_graph()
    shot = ui.screenshot(thumbnail(path) if WRITE_SCREENSHOTS else tmp_path / thumbnail(path).name)
    print(f"\n{path.name}: screenshot {shot}")
    assert shot.stat().st_size < THUMBNAIL_MAX_BYTES

    prefix = f"ui_{path.stem}"
    ui.swap_in_tiny_model("tiny_ltxav.safetensors", ui_server.vae_ckpt, ui_server.dataset, prefix)
    prompt_id = ui.click_run()
    entry = ui_server.wait(prompt_id, timeout=300)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:3000]

    summaries = [t for out in entry["outputs"].values() for t in out.get("text", [])]
    # cfg 4 and cfg_parallel auto: positive and negative on one worker each
    assert any(t.startswith("LTXAV Parallel Sampler: 2 workers, cfg 2 x Ulysses 1 x ring 1") for t in summaries), \
        summaries
    latents = ui_server.saved_latents(entry)
    shapes = sorted(tuple(t.shape) for t in latents.values())
    assert shapes == [(1, 8, 26, 16), (1, 128, 4, 3, 4)], shapes
    assert all(t.isfinite().all() for t in latents.values())
    # the workflow ends in a file: LTXAV Save Video on the same two workers, 25 frames with their sound
    (saved,) = [nid for nid, out in entry["outputs"].items() if out.get("animated")]
    item = entry["outputs"][saved]["images"][0]
    assert (item["type"], item["subfolder"]) == ("output", "video") and item["filename"].startswith(prefix)
    frames, rate, seconds, audio_s, _, decoded = read_video(ui_server.base / "output" / "video" / item["filename"])
    assert (frames, rate, tuple(decoded.shape)) == (25, 25, (25, 96, 128, 3)) and seconds == pytest.approx(1.0)
    assert audio_s == pytest.approx(1.0, abs=0.05)
    # the page got the results over its websocket, and shows no error
    ui.page.wait_for_function("ids => ids.every(id => app.nodeOutputs?.[id])", arg=[*latents, saved], timeout=15_000)
    shown = ui.node_outputs()
    assert all(shown[nid]["latents"] == entry["outputs"][nid]["latents"] for nid in latents), shown
    assert shown[saved]["images"] == entry["outputs"][saved]["images"], shown
    assert ui.last_execution_error() is None
    assert_clean(ui, f"{path.name} after the run")


# Opened from the Templates browser: the pack's own examples and one official template's parallel version
# (the others come from the same script, and tests/test_official_templates.py loads each into the page)
TEMPLATE_BROWSER_FILES = [p for p in UI_FILES if not p.stem.startswith("video_")] + [
    WORKFLOWS / "video_ltx2_3_t2v_parallel.json"]


@needs_browser
def test_template_browser_shows_thumbnails_and_opens_examples(ui):
    from PIL import Image

    for path in TEMPLATE_BROWSER_FILES:
        if not thumbnail(path).exists():
            pytest.fail(f"{thumbnail(path)} missing: run with LTXAV_WRITE_SCREENSHOTS=1")
        shown = ui.open_template(path.stem, len(json.loads(path.read_text())["nodes"]))
        url = f"/api/workflow_templates/{PACK_FOLDER}/{thumbnail(path).name}"
        got = [status for u, status in ui.responses if u.endswith(url)]
        assert got and got[-1] == 200, f"the page fetched {url}: {got}"
        with Image.open(thumbnail(path)) as img:  # the card shows this file, not the default image
            assert (shown["width"], shown["height"]) == img.size, (shown, img.size)
        assert_clean(ui, f"{path.name} from the Templates browser")


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_thumbnail_committed_beside_workflow(path):
    thumb = thumbnail(path)
    assert thumb.is_file(), f"{thumb} missing: LTXAV_WRITE_SCREENSHOTS=1 pytest tests/test_browser_ui.py writes it"
    assert 10_000 < thumb.stat().st_size < THUMBNAIL_MAX_BYTES
    assert thumb.read_bytes()[:3] == b"\xff\xd8\xff", f"{thumb} is not a JPEG"
