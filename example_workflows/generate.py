"""Writes the example workflows in both formats from one description per workflow and ComfyUI's node
definitions: UI format for the editor (example_workflows/<name>.json, listed in the Templates browser) and
API format for POST /prompt (example_workflows/api/<name>_api.json); then the parallel versions of
ComfyUI's official LTX-2 templates (from_templates.py).

Usage: python example_workflows/generate.py OBJECT_INFO_JSON
(OBJECT_INFO_JSON: what GET /object_info of a ComfyUI with this pack returns.)
"""
import json
import sys
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
# API-format copies live one level down: ComfyUI's Templates browser lists every *.json directly in
# example_workflows/ (and only there), and an API-format file opens there as an empty workflow.
API_DIR = HERE / "api"
CKPT = "ltx-2-19b-dev-fp8.safetensors"
GEMMA = "gemma_3_12B_it_fp4_mixed.safetensors"
FRAMES, WIDTH, HEIGHT, FPS = 897, 768, 512, 25
NOTE = ("## LTXAV on several GPUs\n"
        "897 frames at 768x512 (36 s at 25 fps) with audio, split over all GPUs Ray sees.\n\n"
        "- **gpus** 0 = all; **ulysses_degree** 0 = gpus. Use **ring_degree** only when the GPU count does not "
        "divide 32 (3, 6 GPUs).\n"
        "- **cfg_parallel** auto: at cfg 4 the positive and negative passes run on separate halves of an even "
        "number of GPUs.\n"
        "- The first run starts the Ray workers and loads the model on each GPU; later runs reuse them.\n"
        "- **LTX FFN Chunker** (auto) lowers each GPU's peak memory at no measurable cost.\n"
        "- **LTXAV Save Video** decodes and writes the MP4 a few frames at a time, split over the same workers: "
        "on one GPU it held 1.5 GiB of host memory from 897 to 5,201 frames, where VAE Decode (Tiled) -> Create "
        "Video -> Save Video held 12.7 GiB at these 897 frames.\n"
        "- Models: checkpoints/" + CKPT + ", text_encoders/" + GEMMA + ".")


# LTXAV Save Video on every GPU, whole frames (its defaults): the clip decoded and written a few frames at a
# time, split over the sampler's workers
SAVE = {"gpus": 0, "tile_size": 0, "overlap": 64, "temporal_size": 0, "temporal_overlap": 8}


def L(node, slot=0):
    return ("link", node, slot)


def common(sampler_nodes):
    """Loader, text, latent and save nodes shared by both workflows; ``sampler_nodes`` adds the rest.
    Node 30 is the sampler whose output 0 is the AV latent, saved by LTXAV Save Video (node 35)."""
    nodes = {
        1: ("CheckpointLoaderSimple", {"ckpt_name": CKPT}, (0, 0)),
        2: ("LTXAVTextEncoderLoader", {"text_encoder": GEMMA, "ckpt_name": CKPT, "device": "default"}, (0, 200)),
        3: ("CLIPTextEncode", {"text": "A lighthouse keeper climbs a spiral staircase at dusk, wind howling outside, "
                                       "waves crashing far below; he hums an old sea shanty.", "clip": L(2)},
            (400, 200)),
        4: ("CLIPTextEncode", {"text": "blurry, low quality, still frame, watermark, subtitles", "clip": L(2)},
            (400, 450)),
        5: ("LTXVConditioning", {"positive": L(3), "negative": L(4), "frame_rate": float(FPS)}, (800, 250)),
        6: ("LTXFFNChunker", {"model": L(1), "auto": True, "num_chunks": 16}, (400, 0)),
        7: ("EmptyLTXVLatentVideo", {"width": WIDTH, "height": HEIGHT, "length": FRAMES, "batch_size": 1}, (0, 600)),
        8: ("LTXVAudioVAELoader", {"ckpt_name": CKPT}, (0, 800)),
        9: ("LTXVEmptyLatentAudio", {"frames_number": FRAMES, "frame_rate": FPS, "batch_size": 1, "audio_vae": L(8)},
            (400, 800)),
        35: ("LTXAVSaveVideo", {"latent": L(30), "vae": L(1, 2), "audio_vae": L(8), "fps": float(FPS),
                                "filename_prefix": "video/LTXAV-parallel", "format": "auto", "codec": "auto",
                                **SAVE}, (2050, 300)),
        40: ("MarkdownNote", {"text": NOTE}, (0, -350)),
    }
    nodes.update(sampler_nodes)
    return nodes


PARALLEL = {"gpus": 0, "ulysses_degree": 0, "ring_degree": 1, "ray_address": "local", "cfg_parallel": "auto"}

T2V = common({
    10: ("LTXVConcatAVLatent", {"video_latent": L(7), "audio_latent": L(9)}, (800, 650)),
    11: ("CFGGuider", {"model": L(6), "positive": L(5, 0), "negative": L(5, 1), "cfg": 4.0}, (1200, 0)),
    12: ("LTXVScheduler", {"steps": 20, "max_shift": 2.05, "base_shift": 0.95, "stretch": True, "terminal": 0.1,
                           "latent": L(10)}, (1200, 500)),
    13: ("KSamplerSelect", {"sampler_name": "euler"}, (1200, 250)),
    14: ("RandomNoise", {"noise_seed": 42}, (1200, 750)),
    30: ("LTXAVParallelSamplerCustomAdvanced", {"noise": L(14), "guider": L(11), "sampler": L(13), "sigmas": L(12),
                                                "latent_image": L(10), **PARALLEL}, (1600, 300)),
})

I2V = common({
    20: ("LoadImage", {"image": "example.png"}, (0, 1000)),
    21: ("LTXVPreprocess", {"image": L(20), "img_compression": 35}, (400, 1000)),
    22: ("LTXVImgToVideoInplace", {"vae": L(1, 2), "image": L(21), "latent": L(7), "strength": 1.0, "bypass": False},
         (800, 900)),
    10: ("LTXVConcatAVLatent", {"video_latent": L(22), "audio_latent": L(9)}, (1200, 650)),
    30: ("LTXAVParallelKSampler", {"model": L(6), "seed": 42, "steps": 20, "cfg": 4.0, "sampler_name": "euler",
                                   "scheduler": "simple", "positive": L(5, 0), "negative": L(5, 1),
                                   "latent_image": L(10), "denoise": 1.0, **PARALLEL}, (1600, 300)),
})

FRONTEND_ONLY = {"MarkdownNote": {"text": "STRING"}}
# Node sizes in the editor (it grows a node to fit its widgets); columns are 400 apart.
SIZES = {"MarkdownNote": [520, 260], "LTXAVParallelKSampler": [380, 120],
         "LTXAVParallelSamplerCustomAdvanced": [380, 120]}  # 380: the whole title shows
DEFAULT_SIZE = [320, 120]


def is_link(v):
    return isinstance(v, tuple) and v[0] == "link"


def widget_names(info, node_type):
    """(name, extra values after it) for each widget input of ``node_type``, in order."""
    if node_type in FRONTEND_ONLY:
        return [("text", [])]
    out = []
    spec = info[node_type]["input"]
    order = info[node_type].get("input_order", {})
    for group in ("required", "optional"):
        for name in order.get(group, spec.get(group, {}).keys()):
            kind, opts = (spec[group][name] + [{}])[:2]
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                extra = []
                if opts.get("control_after_generate"):
                    extra.append("fixed")
                if opts.get("image_upload"):
                    extra.append("image")
                out.append((name, extra))
    return out


def api(nodes):
    prompt = {}
    for nid, (ntype, inputs, _) in nodes.items():
        if ntype in FRONTEND_ONLY:
            continue
        prompt[str(nid)] = {"class_type": ntype,
                            "inputs": {k: [str(v[1]), v[2]] if is_link(v) else v for k, v in inputs.items()}}
    return prompt


def ui(nodes, info):
    links, out_links = [], {}
    ui_nodes = []
    for order, (nid, (ntype, inputs, pos)) in enumerate(sorted(nodes.items())):
        widgets = {name for name, _ in widget_names(info, ntype)}
        sockets = []
        for name, v in inputs.items():
            if not is_link(v):
                continue
            src_type = info[nodes[v[1]][0]]["output"][v[2]]
            link_id = len(links) + 1
            links.append([link_id, v[1], v[2], nid, len(sockets), src_type])
            out_links.setdefault((v[1], v[2]), []).append(link_id)
            entry = {"name": name, "type": src_type, "link": link_id}
            if name in widgets:
                entry["widget"] = {"name": name}
            sockets.append(entry)
        values = []
        for name, extra in widget_names(info, ntype):
            if name in inputs and not is_link(inputs[name]):
                values += [inputs[name], *extra]
        ui_nodes.append({"id": nid, "type": ntype, "pos": list(pos),
                         "size": list(SIZES.get(ntype, DEFAULT_SIZE)),
                         "flags": {}, "order": order, "mode": 0, "inputs": sockets, "outputs": [],
                         "properties": {"Node name for S&R": ntype}, "widgets_values": values})
    for n in ui_nodes:
        if n["type"] in FRONTEND_ONLY:
            continue
        names = info[n["type"]].get("output_name", info[n["type"]]["output"])
        n["outputs"] = [{"name": name, "type": t, "links": out_links.get((n["id"], i), []), "slot_index": i}
                        for i, (name, t) in enumerate(zip(names, info[n["type"]]["output"]))]
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, json.dumps(sorted(nodes)))), "revision": 0,
            "last_node_id": max(nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": view(ui_nodes)}, "version": 0.4}


def view(ui_nodes, screen_width=1920, left=90, top=110):
    """The editor's camera when the workflow opens: every column on a 1920-pixel-wide screen (right of the
    side bar, below the tabs). Screen = (canvas position + offset) * scale."""
    x0 = min(n["pos"][0] for n in ui_nodes)
    y0 = min(n["pos"][1] for n in ui_nodes) - 30  # title bar
    x1 = max(n["pos"][0] + n["size"][0] for n in ui_nodes)
    scale = min(0.6, int(100 * (screen_width - left - 30) / (x1 - x0)) / 100)
    return {"scale": scale, "offset": [round(left / scale - x0), round(top / scale - y0)]}


def main(object_info_path):
    info = json.loads(Path(object_info_path).read_text())
    API_DIR.mkdir(exist_ok=True)
    for name, nodes in (("ltxav_t2v_parallel", T2V), ("ltxav_i2v_parallel", I2V)):
        (HERE / f"{name}.json").write_text(json.dumps(ui(nodes, info), indent=1) + "\n")
        (API_DIR / f"{name}_api.json").write_text(json.dumps(api(nodes), indent=1) + "\n")
    import from_templates  # beside this file

    from_templates.main(object_info_path)


if __name__ == "__main__":
    main(sys.argv[1])
