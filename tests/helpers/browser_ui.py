"""Driving ComfyUI's own front end (the comfyui-frontend-package the server serves) in headless Chromium
with Playwright, for tests/test_browser_ui.py.

Chromium is Debian's package (``/usr/bin/chromium``; ``.ci/setup_env.sh`` installs it when it can);
Playwright only drives it: no browser is downloaded (never ``playwright install``).
"""
import json
import os
import re
import shutil
from pathlib import Path

from .comfy_host import HOST_MISSING, host_available

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/lib/chromium/chromium")
VIEWPORT = {"width": 1920, "height": 1080}
# Server-side front-end settings for a predictable page: no first-run template browser, no minimap or
# side panel over the graph, no canvas statistics, and node text drawn at any zoom (screenshots).
UI_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.RightSidePanel.IsOpen": False,
               "Comfy.Graph.CanvasInfo": False, "LiteGraph.Canvas.MinFontSizeForLOD": 0}


def find_chromium():
    """Path of a Chromium binary: $LTXAV_CHROMIUM, Debian's /usr/bin/chromium, ..., or None."""
    for path in (os.environ.get("LTXAV_CHROMIUM"), *CHROMIUM_CANDIDATES, shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if path and os.access(path, os.X_OK):
            return path
    return None


def skip_reason():
    """Why the browser tests cannot run here (None when they can)."""
    if not host_available():
        return HOST_MISSING
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return ("Python package 'playwright' NOT INSTALLED in this venv: browser UI tests SKIPPED "
                "(pip install -r requirements-test.txt; no browser download is needed).")
    if find_chromium() is None:
        return ("Chromium NOT FOUND (looked for $LTXAV_CHROMIUM, " + ", ".join(CHROMIUM_CANDIDATES) + "): browser UI "
                "tests SKIPPED. Install Debian's package: apt-get install chromium (.ci/setup_env.sh does when run "
                "as root).")
    return None


def launch(playwright):
    return playwright.chromium.launch(
        executable_path=find_chromium(), headless=True,
        # root in CI: no user-namespace sandbox; small /dev/shm in containers
        args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])


# A file dropped on the canvas, as the browser delivers a drag from the desktop.
DROP_FILE = """async ({name, text}) => {
  const dt = new DataTransfer();
  dt.items.add(new File([text], name, {type: 'application/json'}));
  const canvas = document.getElementById('graph-canvas');
  const r = canvas.getBoundingClientRect();
  const init = {bubbles: true, cancelable: true, dataTransfer: dt,
                clientX: r.x + r.width / 2, clientY: r.y + r.height / 2};
  for (const type of ['dragenter', 'dragover', 'drop']) canvas.dispatchEvent(new DragEvent(type, init));
}"""

# What the page shows as wrong with the graph: red (has_errors) nodes, node types the front end does not
# know (missing nodes), and the error overlay / missing-node cards / error dialog with their text.
GRAPH_PROBLEMS = """() => {
  const visible = e => !!e && e.getClientRects().length > 0;
  const text = sel => Array.from(document.querySelectorAll(sel)).filter(visible).map(e => e.innerText.trim());
  const nodes = app.graph.nodes;
  return {
    nodes: nodes.length,
    red: nodes.filter(n => n.has_errors).map(n => `${n.id} ${n.type}`),
    unknown: nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => `${n.id} ${n.type}`),
    overlay: text('[data-testid=error-overlay]'),
    missing_node_cards: text('[data-testid=missing-node-card]'),
    dialogs: text('[data-testid=error-dialog], [data-testid=runtime-error-panel], .p-dialog'),
  };
}"""

# The example workflows name real LTX-2 model files (19B checkpoint, Gemma text encoder). To run one here,
# swap what needs those files for stock nodes on the tiny test inputs, as the API tests do
# (comfy_server.t2v_prompt): UNETLoader(tiny checkpoint) -> the workflow's LTX FFN Chunker; the dataset's
# conditioning -> LTXVConditioning (negative: ConditioningZeroOut); its audio latent -> LTXVConcatAVLatent;
# SaveLatent for the separated video/audio latents, instead of stock's VAE decoders or beside LTXAV Save
# Video (kept, with the VAEs of a tiny checkpoint: the workflow ends in a file); a small video; 2 steps; 2
# CPU workers. LTXVImgToVideoInplace (i2v) needs the video VAE: bypassed (Ctrl+B in the editor).
# Every other node of the workflow (the pack's sampler, chunker and save included) stays as loaded.
TINY_SWAP = """({unet, vae, dataset, prefix}) => {
  const g = app.graph;
  const all = t => g.nodes.filter(n => n.type === t);
  const one = t => {
    const a = all(t);
    if (a.length !== 1) throw new Error(`expected one ${t} node, found ${a.length}`);
    return a[0];
  };
  const set = (n, name, v) => {
    const w = (n.widgets || []).find(w => w.name === name);
    if (!w) throw new Error(`${n.type} has no widget ${name}`);
    w.value = v;
  };
  const add = (type, pos, values = {}) => {
    const n = LiteGraph.createNode(type);
    if (!n) throw new Error(`the front end cannot create ${type}`);
    n.pos = [...pos];
    g.add(n);
    for (const [k, v] of Object.entries(values)) set(n, k, v);
    return n;
  };
  const link = (src, slot, dst, name) => {
    const i = dst.findInputSlot(name);
    if (i < 0) throw new Error(`${dst.type} has no input ${name}`);
    if (!src.connect(slot, dst, i)) throw new Error(`cannot link ${src.type}[${slot}] -> ${dst.type}.${name}`);
  };
  const ckpt = one('CheckpointLoaderSimple'), te = one('LTXAVTextEncoderLoader');
  link(add('UNETLoader', ckpt.pos, {unet_name: unet}), 0, one('LTXFFNChunker'), 'model');
  const ds = add('LoadTrainingDataset', te.pos, {folder_name: dataset});
  const zero = add('ConditioningZeroOut', [te.pos[0], te.pos[1] + 120]);
  const cond = one('LTXVConditioning');
  link(ds, 1, cond, 'positive');
  link(ds, 1, zero, 'conditioning');
  link(zero, 0, cond, 'negative');
  link(ds, 0, one('LTXVConcatAVLatent'), 'audio_latent');
  const saves = all('LTXAVSaveVideo');
  let sep = all('LTXVSeparateAVLatent')[0];
  if (!sep) {  // the latent LTXAV Save Video saves, split and saved beside it
    const save = one('LTXAVSaveVideo'), i = save.findInputSlot('latent');
    sep = add('LTXVSeparateAVLatent', [save.pos[0], save.pos[1] + 400]);
    link(save.getInputNode(i), save.getInputLink(i).origin_slot, sep, 'av_latent');
  }
  link(sep, 0, add('SaveLatent', [sep.pos[0] + 300, sep.pos[1]], {filename_prefix: `latents/${prefix}_v`}), 'samples');
  link(sep, 1, add('SaveLatent', [sep.pos[0] + 300, sep.pos[1] + 150], {filename_prefix: `latents/${prefix}_a`}),
       'samples');
  const gone = ['LTXAVTextEncoderLoader', 'CLIPTextEncode', 'LTXVEmptyLatentAudio', 'VAEDecodeTiled',
                'LTXVAudioVAEDecode', 'CreateVideo', 'SaveVideo'];
  if (saves.length) {  // down to the file: the VAEs from the tiny checkpoint, the save on the sampler's workers
    set(ckpt, 'ckpt_name', vae);
    set(one('LTXVAudioVAELoader'), 'ckpt_name', vae);
    for (const n of saves) {
      set(n, 'gpus', 2);
      set(n, 'filename_prefix', `video/${prefix}`);
    }
  } else gone.push('CheckpointLoaderSimple', 'LTXVAudioVAELoader');
  for (const t of gone)
    for (const n of all(t)) g.remove(n);
  const video = one('EmptyLTXVLatentVideo');
  set(video, 'width', 128);
  set(video, 'height', 96);
  set(video, 'length', 25);
  for (const n of [...all('LTXVScheduler'), ...all('LTXAVParallelKSampler')]) set(n, 'steps', 2);
  for (const n of [...all('LTXAVParallelKSampler'), ...all('LTXAVParallelSamplerCustomAdvanced')]) set(n, 'gpus', 2);
  for (const n of all('LTXVImgToVideoInplace')) n.mode = 4;
  g.setDirtyCanvas(true, true);
  return g.nodes.map(n => n.type);
}"""


# Camera on the whole graph: screen = (canvas position + offset) * scale, in CSS pixels.
FRAME_GRAPH = """() => {
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of app.graph.nodes) {
    const [x, y, w, h] = n.boundingRect;
    x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
  }
  const el = app.canvas.canvas, ds = app.canvas.ds;
  const left = 90, top = 100, right = 30, bottom = 30;  // side bar; workflow tabs and Run bar
  const w = el.clientWidth - left - right, h = el.clientHeight - top - bottom;
  const s = Math.min(w / (x1 - x0), h / (y1 - y0), 1);
  ds.scale = s;
  ds.offset[0] = (left + (w - s * (x1 - x0)) / 2) / s - x0;
  ds.offset[1] = (top + (h - s * (y1 - y0)) / 2) / s - y0;
  app.canvas.setDirty(true, true);
}"""


class ComfyPage:
    """One browser tab on the server's front end, with what a user does there."""

    def __init__(self, browser, server):
        self.server = server
        self.context = browser.new_context(viewport=VIEWPORT)
        self.page = self.context.new_page()
        self.page.set_default_timeout(60_000)  # 2-core CI machines, Ray workers beside
        self.js_errors = []
        self.page.on("pageerror", lambda e: self.js_errors.append(str(e)))
        self.responses = []  # (url, status) of every HTTP response the page got
        self.page.on("response", lambda r: self.responses.append((r.url, r.status)))

    def open(self):
        self.page.goto(self.server.url)
        self.page.wait_for_function("() => window.app && app.graph && app.canvas && window.LiteGraph "
                                    "&& app.extensionManager?.workflow", timeout=60_000)
        self.page.wait_for_function("n => Object.keys(LiteGraph.registered_node_types).length >= n", arg=100)
        return self

    def close(self):
        self.context.close()

    def problems(self) -> dict:
        return self.page.evaluate(GRAPH_PROBLEMS)

    def active_workflow(self) -> str:
        return self.page.evaluate("() => app.extensionManager.workflow.activeWorkflow?.filename")

    def _wait_loaded(self, stem: str, node_count: int):
        self.page.wait_for_function(
            "([stem, n]) => app.extensionManager.workflow.activeWorkflow?.filename === stem "
            "&& app.graph.nodes.length === n", arg=[stem, node_count], timeout=30_000)
        self.settle()

    def settle(self, seconds=1.5):
        """Let the front end finish what a load starts (missing-model checks, overlays, redraws)."""
        self.page.wait_for_timeout(seconds * 1000)

    # --- the ways a user opens a workflow file -------------------------------------------------------------
    def drop_file(self, path: Path):
        """Drag the file from the desktop onto the canvas."""
        self.page.evaluate(DROP_FILE, {"name": path.name, "text": path.read_text()})
        self._wait_loaded(path.stem, len(json.loads(path.read_text())["nodes"]))
        self._drop_stuck_block_mask()

    def _drop_stuck_block_mask(self, timeout_ms: int = 5_000):
        """A drop shows the front end's full-screen BlockUI while it loads the file (the workspace's spinner).
        When the spinner goes off before the mask's animation ends, PrimeVue can leave the mask in the document,
        invisible, taking every click (primefaces/primevue#7817, #8376; it once held the Run button for 60 s in
        CI). Once the spinner is off, a mask still there after ``timeout_ms`` is that one: it is removed."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        self.page.wait_for_function("() => !app.extensionManager.spinner")
        try:
            self.page.wait_for_selector(".p-blockui-mask-document", state="detached", timeout=timeout_ms)
        except PlaywrightTimeout:
            self.page.evaluate("() => document.querySelectorAll('.p-blockui-mask-document').forEach(m => m.remove())")

    def open_file(self, path: Path):
        """ComfyUI menu (the logo) > File > Open, pick the file in the browser's file chooser."""
        self.page.locator(".comfyui-logo").click()
        self.page.get_by_role("menuitem", name="File").hover()
        with self.page.expect_file_chooser() as chooser:
            self.page.get_by_role("menuitem", name=re.compile(r"^Open")).click()
        chooser.value.set_files(str(path))
        self._wait_loaded(path.stem, len(json.loads(path.read_text())["nodes"]))

    def open_template(self, stem: str, node_count: int) -> dict:
        """Templates sidebar > search > the pack's card > open. Returns the card's image as shown (src,
        natural size); the front end fetches the thumbnail and shows it from a blob: URL."""
        self.page.get_by_role("button", name="Templates").click()
        self.page.get_by_placeholder("Search").first.fill(stem)
        card = self.page.locator(f"[data-testid=template-workflow-{stem}]")
        card.wait_for()
        img = card.locator("img").first
        img.wait_for()
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:  # the default image stands in until (unless) the thumbnail has loaded
            self.page.wait_for_function("e => e.complete && e.naturalWidth > 0 && !e.src.includes('default-template')",
                                        arg=img.element_handle(), timeout=15_000)
        except PlaywrightTimeout:
            pass  # the caller's checks say what was shown
        thumb = img.evaluate("e => ({src: e.src, width: e.naturalWidth, height: e.naturalHeight})")
        card.click()
        self._wait_loaded(stem, node_count)
        return thumb

    def load_graph_data(self, workflow: dict):
        """What the front end calls for a loaded file; for copies the test made."""
        self.page.evaluate("wf => app.loadGraphData(wf)", workflow)
        self.page.wait_for_function("n => app.graph.nodes.length === n", arg=len(workflow["nodes"]))
        self.settle()

    # --- nodes ---------------------------------------------------------------------------------------------
    def clear_graph(self):
        self.page.evaluate("() => { app.graph.clear(); app.graph.setDirtyCanvas(true, true); }")

    def search_titles(self, query: str) -> list[str]:
        """Double-click the empty canvas, type ``query`` in the node search box: the result titles."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        box = self.page.get_by_placeholder("Add a node...")
        for attempt in range(3):  # a double-click while the page is still busy (a loaded CI machine) can be lost
            self.page.mouse.dblclick(VIEWPORT["width"] * 0.6, VIEWPORT["height"] * 0.55)
            try:
                box.wait_for(timeout=15_000)
                break
            except PlaywrightTimeout:
                if attempt == 2:
                    raise
                self.settle()
        box.fill(query)
        options = self.page.locator("[role=option]")
        options.filter(has_text=query).first.wait_for()
        titles = [t.split("\n")[0].strip() for t in options.all_inner_texts()]
        self.page.keyboard.press("Escape")
        box.wait_for(state="hidden")
        return titles

    def drag_from_library(self, category: str, display_name: str, x: int, y: int):
        """Node Library sidebar > category > drag the node onto the canvas at (x, y)."""
        if not self.page.get_by_role("tree").first.is_visible():
            self.page.get_by_role("button", name="Node Library (n)").click()
        item = self.page.get_by_role("treeitem").filter(has_text=display_name).last
        if not item.is_visible():
            folder = self.page.get_by_role("treeitem").filter(has_text=category).first
            folder.scroll_into_view_if_needed()
            folder.click()
        item.scroll_into_view_if_needed()
        item.drag_to(self.page.locator("#graph-canvas"), target_position={"x": x, "y": y})

    def node_types(self) -> list[str]:
        return self.page.evaluate("() => app.graph.nodes.map(n => n.type)")

    # --- view ----------------------------------------------------------------------------------------------
    def frame_graph(self):
        """Zoom and pan so that all nodes fill the canvas between the side bar and the top bars (the
        front end's Fit View leaves wide margins)."""
        self.page.evaluate(FRAME_GRAPH)
        self.settle(0.5)

    def screenshot(self, path: Path, quality=80):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), type="jpeg", quality=quality)
        return path

    # --- running -------------------------------------------------------------------------------------------
    def swap_in_tiny_model(self, unet: str, vae: str, dataset: str, prefix: str) -> list[str]:
        """The model files swapped for the tiny ones, as a user would pick them: ``unet`` (models/diffusion_models)
        into the FFN Chunker, the dataset's conditioning and audio latent for Gemma's, 25 frames of 128x96, 2
        steps on 2 workers; the latents saved (SaveLatent); stock's decode chain removed, or LTXAV Save Video
        kept with its VAEs from ``vae`` (models/checkpoints) and its save on the 2 workers. The node types."""
        return self.page.evaluate(TINY_SWAP, {"unet": unet, "vae": vae, "dataset": dataset, "prefix": prefix})

    def click_run(self) -> str:
        """Click the Run button; the id of the prompt the page queued."""
        with self.page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as resp:
            self.page.locator("[data-testid=queue-button]").click()
        body = resp.value.json()
        assert resp.value.status == 200, f"the page's POST /prompt was refused ({resp.value.status}): {body}"
        return body["prompt_id"]

    def node_outputs(self) -> dict:
        """The outputs the page received over its websocket for the last run ({node id: ui output})."""
        return self.page.evaluate("() => JSON.parse(JSON.stringify(app.nodeOutputs || {}))")

    def last_execution_error(self):
        return self.page.evaluate("() => app.extensionManager.lastExecutionError || null")
