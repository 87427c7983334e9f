"""ComfyUI's official LTX-2 / LTX-2.3 templates, as a user runs them: each one and the pack's parallel
version of it (example_workflows/*_parallel.json) loaded into ComfyUI's own front end in headless
Chromium and turned into an API prompt there (``app.graphToPrompt``: subgraphs expanded, the promoted
``gpus`` set on the outer node), then run on the shared server with tiny stand-ins under the templates'
file names (tests/helpers/official_templates.py): stock, stock with the diffusion model in float64 (the
reference), and parallel on 2 CPU workers.

Checked per template: each stage's video and audio latents equal stock's under the float64-reference
rule; the guidance passes the driver counted are those the workers ran (no mismatch logged) and the
degrees follow from them (cfg-parallel on the LTX-2.3 templates' two passes a step); the second stage
keeps the LoRA stack on the workers where the template gives both stages the same one.

Skips, saying why, without the ComfyUI host, Playwright or Chromium.
"""
import re

import pytest
import torch

from helpers.browser_ui import UI_SETTINGS, ComfyPage, launch, skip_reason
from helpers.numerics import assert_matches, mismatches
from helpers.official_templates import from_templates, load_json, stages, tiny, version_of, write_stand_ins

NODE = "LTXAV Parallel Sampler"
GEN = from_templates()
SKIP = skip_reason()
pytestmark = [pytest.mark.skipif(SKIP is not None, reason=SKIP or ""),
              pytest.mark.usefixtures("ray_stopped_after_module")]

# per template, per stage: (degrees, guidance passes, what the workers did with the model)
TWO_PASSES = "cfg 2 x Ulysses 1 x ring 1; 2 guidance passes a step"
ONE_PASS = "Ulysses 2 x ring 1; 1 guidance pass a step"
EXPECTED = {
    "video_ltx2_3_t2v": [(TWO_PASSES, None), (TWO_PASSES, "kept")],
    "video_ltx2_3_i2v": [(TWO_PASSES, None), (TWO_PASSES, "kept")],
    "video_ltx2_3_flf2v": [(ONE_PASS, None)],  # one stage, SamplerEulerAncestral at cfg 1: one pass
    "video_ltx2_3_ia2v": [(TWO_PASSES, None), (TWO_PASSES, "kept")],
    # stage 1: the ID LoRA and LTXVReferenceAudio's identity pass in a call of its own; stage 2: without them
    "video_ltx2_3_id_lora": [("Ulysses 2 x ring 1; 3 guidance passes a step (calls of 2 + 1)", None),
                             (TWO_PASSES, "patches re-applied")],
    # the two stages stack the same LoRAs in the other order: another patch set, as in stock ComfyUI
    "video_ltx2_i2v_lora": [(ONE_PASS, None), (ONE_PASS, "patches re-applied")],
}
assert set(EXPECTED) == set(GEN.TEMPLATES)


@pytest.fixture(scope="module")
def templates():
    return {name: load_json(GEN.template_dir() / f"{name}.json") for name in GEN.TEMPLATES}


@pytest.fixture(scope="module")
def stand_ins(server, templates, tmp_path_factory):
    status, _ = server.post("/settings", UI_SETTINGS)
    assert status == 200
    made = write_stand_ins(server.base, list(templates.values()), tmp_path_factory.mktemp("stand_ins"))
    yield server
    for path in made:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def page(stand_ins):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        ui = ComfyPage(browser, stand_ins).open()
        yield ui
        ui.close()
        browser.close()


def api_prompt(page, workflow: dict, gpus=None) -> dict:
    """What the front end queues for ``workflow``: loaded as a file is, the outer node's ``gpus`` set as a
    user sets it, converted by ``app.graphToPrompt``."""
    page.load_graph_data(workflow)
    if gpus is not None:
        page.page.evaluate("""gpus => {
          const outer = app.graph.nodes.find(n => n.isSubgraphNode?.());
          const w = outer.widgets.find(w => w.name === 'gpus');
          if (!w) throw new Error('no gpus widget on the outer node');
          w.value = gpus;
        }""", gpus)
    problems = {k: v for k, v in page.problems().items() if k != "nodes" and v}
    assert not problems and not page.js_errors, (problems, page.js_errors)
    return page.page.evaluate("async () => (await app.graphToPrompt()).output")


def run(server, prompt):
    start = len(server.log())
    entry = server.run(prompt, timeout=600)
    assert entry["status"]["status_str"] == "success", str(entry["status"])[:3000]
    return entry, server.log()[start:]


def stage_latents(server, entry, count):
    saved = server.saved_latents(entry)
    return [[saved[f"save{i}v"], saved[f"save{i}a"]] for i in range(count)]


@pytest.mark.parametrize("name", GEN.TEMPLATES)
def test_template_parallel_equals_stock(stand_ins, page, templates, name):
    server = stand_ins
    version = version_of(templates[name])
    stock_api = api_prompt(page, templates[name])
    parallel_api = api_prompt(page, load_json(GEN.HERE / f"{name}{GEN.SUFFIX}.json"), gpus=2)
    order = stages(parallel_api)
    assert [parallel_api[k]["class_type"] for k in order] == ["LTXAVParallelSamplerCustomAdvanced"] * len(order)
    assert all(parallel_api[k]["inputs"]["gpus"] == 2 for k in order)  # the outer node's widget reached both
    assert stages(stock_api) == order  # the same nodes, under the same ids

    # stock and the reference only up to the latents; the parallel version to the video file
    stock, _ = run(server, tiny(stock_api, version, f"{name}_stock", decode=False))
    reference, _ = run(server, tiny(stock_api, version, f"{name}_f64", float64=True, decode=False))
    parallel, log = run(server, tiny(parallel_api, version, f"{name}_parallel"))
    assert parallel["outputs"][next(k for k, v in parallel_api.items() if v["class_type"] == "SaveVideo")]
    want, ref, got = (stage_latents(server, e, len(order)) for e in (stock, reference, parallel))
    for i in range(len(order)):
        for part, kind in enumerate(("video", "audio")):
            what = f"{name} stage {i + 1} {kind}"
            if torch.equal(want[i][part], ref[i][part]):  # a latent the template keeps (ia2v: the given audio)
                assert torch.equal(got[i][part], want[i][part]), what
            else:
                assert_matches(got[i][part], want[i][part], ref[i][part], what)
        # the twin: the video with its rows shifted by one (a sequence shard put back in the wrong place)
        assert mismatches(torch.roll(got[i][0], 1, dims=3), want[i][0], ref[i][0])

    assert "were counted" not in log and "could not count" not in log, log[-3000:]
    for i, (nid, (setting, action)) in enumerate(zip(order, EXPECTED[name], strict=True)):
        summary = parallel["outputs"][nid]["text"][0]
        assert summary.startswith(f"{NODE}: 2 workers, {setting}; sampling"), summary
        passes = [int(n) for n in re.findall(r"; (\d+) model passes", summary)]
        assert len(passes) == 2 and passes[0] == passes[1] > 0, summary
        if action:
            assert f"({action}" in summary, f"stage {i + 1}: {summary}"
    if [a for _, a in EXPECTED[name]][1:] == ["kept"]:
        assert "applying the MODEL's changed" not in log.split("sampling on 2 workers", 1)[1], log[-3000:]
