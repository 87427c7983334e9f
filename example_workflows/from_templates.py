"""Writes the pack's parallel versions of ComfyUI's official LTX-2 / LTX-2.3 templates, from the templates
the installed ComfyUI brings (its requirement ``comfyui-workflow-templates`` installs them in the package
``comfyui_workflow_templates_media_video``), so that they follow the package: run it again when the package
changes (tests/test_example_workflows.py checks that the committed files are what it makes).

Each template is a workflow in the editor's format whose work sits in a subgraph. In that subgraph:

- every SamplerCustomAdvanced becomes an LTXAV Parallel SamplerCustomAdvanced (the same inputs and outputs);
- an LTX FFN Chunker (auto) goes right after the checkpoint loader's MODEL, before LoRAs and guiders;
- ``gpus`` and ``cfg_parallel`` become inputs of the subgraph, wired to every parallel sampler, so they
  show on the outer node beside the template's own settings.

The subgraph is renamed "... (parallel)" under a new id, a note says what changed, and the template's
thumbnail (the first frame of its .webp) becomes the .jpg the Templates browser shows beside each file.

Usage: python example_workflows/from_templates.py OBJECT_INFO_JSON
(OBJECT_INFO_JSON: what GET /object_info of a ComfyUI with this pack returns.)
"""
import copy
import io
import json
import sys
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = "comfyui_workflow_templates_media_video"
TEMPLATES = ("video_ltx2_3_t2v", "video_ltx2_3_i2v", "video_ltx2_3_flf2v", "video_ltx2_3_ia2v", "video_ltx2_3_id_lora",
             "video_ltx2_i2v_lora")
SUFFIX = "_parallel"
SAMPLER, PARALLEL_SAMPLER, CHUNKER = "SamplerCustomAdvanced", "LTXAVParallelSamplerCustomAdvanced", "LTXFFNChunker"
LOADER = "CheckpointLoaderSimple"
PARALLEL = {"gpus": 0, "ulysses_degree": 0, "ring_degree": 1, "ray_address": "local", "cfg_parallel": "auto"}
PROMOTED = ("gpus", "cfg_parallel")  # the parallel inputs shown on the outer node
CHUNKER_VALUES = {"auto": True, "num_chunks": 16}
SAMPLER_SIZE, CHUNKER_SIZE = [380, 290], [320, 110]
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/ComfyUI-LTXAV-Parallel/official-templates")
NOTE = ("## Parallel version (ComfyUI-LTXAV-Parallel)\n"
        "This is ComfyUI's official **{title}** template with its samplers on several GPUs: open the subgraph to "
        "see every node.\n\n"
        "- Both **SamplerCustomAdvanced** nodes are **LTXAV Parallel SamplerCustomAdvanced** (same result, the video "
        "split over the GPUs); an **LTX FFN Chunker** follows the checkpoint loader.\n"
        "- **gpus** (0 = every GPU Ray sees) and **cfg_parallel** are on this node, for both stages.\n"
        "- cfg 1 with the template's `*_cfg_pp` samplers runs two guidance passes a step: with `cfg_parallel` auto "
        "and an even number of GPUs, each half of them runs one.\n"
        "- The first run starts the workers and loads the model on each; the second stage and later runs reuse "
        "them, LoRAs included.")


def template_dir() -> Path:
    from importlib.resources import files

    return Path(str(files(PACKAGE))) / "templates"


def widget_names(info: dict, node_type: str) -> list[str]:
    """The widget inputs of ``node_type`` in the editor's order (required, then optional)."""
    spec, order = info[node_type]["input"], info[node_type].get("input_order", {})
    names = []
    for group in ("required", "optional"):
        for name in order.get(group, spec.get(group, {}).keys()):
            kind = spec[group][name][0]
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                names.append(name)
    return names


def widget_type(info: dict, node_type: str, name: str) -> str:
    spec = info[node_type]["input"]
    kind = {**spec.get("required", {}), **spec.get("optional", {})}[name][0]
    return "COMBO" if isinstance(kind, list) else kind


def new_id(name: str) -> str:
    return str(uuid.uuid5(NAMESPACE, name))


class Ids:
    """Node and link ids: one counter each over the whole workflow (root graph and subgraphs), as the editor
    keeps them."""

    def __init__(self, wf: dict):
        subgraphs = wf.get("definitions", {}).get("subgraphs", [])
        self.node = max([wf["last_node_id"]] + [sg["state"]["lastNodeId"] for sg in subgraphs]
                        + [n["id"] for g in [wf, *subgraphs] for n in g["nodes"]])
        self.link = max([wf["last_link_id"]] + [sg["state"]["lastLinkId"] for sg in subgraphs]
                        + [link["id"] if isinstance(link, dict) else link[0] for g in [wf, *subgraphs]
                           for link in g["links"]])

    def next_node(self) -> int:
        self.node += 1
        return self.node

    def next_link(self) -> int:
        self.link += 1
        return self.link


def free_spot(nodes: list, near: dict, size: list) -> list:
    """A position beside ``near`` where a node of ``size`` overlaps no other node."""
    x, y = near["pos"]
    w, h = near["size"]
    boxes = [(n["pos"][0], n["pos"][1] - 40, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in nodes]
    for pos in ([x, y + h + 60], [x, y - size[1] - 80], [x + w + 40, y], [x - size[0] - 40, y]):
        box = (pos[0], pos[1] - 40, pos[0] + size[0], pos[1] + size[1])
        if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
            return pos
    return [x, y + h + 60]


def convert(wf: dict, info: dict, name: str) -> dict:
    """The parallel version of one template (a new dict)."""
    wf = copy.deepcopy(wf)
    ids = Ids(wf)
    (sg,) = wf["definitions"]["subgraphs"]
    nodes = {n["id"]: n for n in sg["nodes"]}
    links = {link["id"]: link for link in sg["links"]}
    samplers = sorted(n["id"] for n in nodes.values() if n["type"] == SAMPLER)
    assert samplers, f"{name}: no {SAMPLER} in the template's subgraph"

    # the samplers: same inputs and outputs, the parallel widgets after them
    sampler_widgets = widget_names(info, PARALLEL_SAMPLER)
    assert set(sampler_widgets) == set(PARALLEL), sampler_widgets
    for nid in samplers:
        n = nodes[nid]
        n["type"] = PARALLEL_SAMPLER
        n["properties"] = {"Node name for S&R": PARALLEL_SAMPLER}
        n["widgets_values"] = [PARALLEL[w] for w in sampler_widgets]
        n["size"] = list(SAMPLER_SIZE)

    # the chunker between the checkpoint's MODEL and everything that took it
    (loader,) = [n for n in nodes.values() if n["type"] == LOADER]
    model_out = loader["outputs"][0]
    assert model_out["type"] == "MODEL", model_out
    chunker_id = ids.next_node()
    in_link = ids.next_link()
    chunker = {"id": chunker_id, "type": CHUNKER, "pos": free_spot(sg["nodes"], loader, CHUNKER_SIZE),
               "size": list(CHUNKER_SIZE), "flags": {}, "order": loader.get("order", 0), "mode": 0,
               "inputs": [{"localized_name": "model", "name": "model", "type": "MODEL", "link": in_link}],
               "outputs": [{"localized_name": "MODEL", "name": "MODEL", "type": "MODEL",
                            "links": list(model_out["links"])}],
               "properties": {"Node name for S&R": CHUNKER},
               "widgets_values": [CHUNKER_VALUES[w] for w in widget_names(info, CHUNKER)]}
    for link_id in model_out["links"]:
        links[link_id]["origin_id"], links[link_id]["origin_slot"] = chunker_id, 0
    model_out["links"] = [in_link]
    sg["links"].append({"id": in_link, "origin_id": loader["id"], "origin_slot": 0, "target_id": chunker_id,
                        "target_slot": 0, "type": "MODEL"})
    sg["nodes"].append(chunker)

    # gpus and cfg_parallel: subgraph inputs wired to every parallel sampler
    outer = next(n for n in wf["nodes"] if n["type"] == sg["id"])
    last_pos = sg["inputs"][-1].get("pos", sg["inputNode"]["bounding"][:2]) if sg["inputs"] else [0, 0]
    for k, widget in enumerate(PROMOTED):
        kind = widget_type(info, PARALLEL_SAMPLER, widget)
        slot = len(sg["inputs"])
        link_ids = []
        for nid in samplers:
            link_id = ids.next_link()
            n = nodes[nid]
            n["inputs"].append({"localized_name": widget, "name": widget, "type": kind, "widget": {"name": widget},
                                "link": link_id})
            sg["links"].append({"id": link_id, "origin_id": -10, "origin_slot": slot, "target_id": nid,
                                "target_slot": len(n["inputs"]) - 1, "type": kind})
            link_ids.append(link_id)
        sg["inputs"].append({"id": new_id(f"{name}/{widget}"), "name": widget, "type": kind, "linkIds": link_ids,
                             "pos": [last_pos[0], last_pos[1] + 20 * (k + 1)]})
        outer["inputs"].append({"name": widget, "type": kind, "widget": {"name": widget}, "link": None})
        outer.setdefault("properties", {}).setdefault("proxyWidgets", []).append([str(samplers[0]), widget])
    bounding = sg["inputNode"]["bounding"]
    bounding[3] = max(bounding[3], 20 * (len(sg["inputs"]) + 1) + 8)

    # a subgraph of its own (the editor keeps definitions by id), named for what it is
    old_id, sg["id"] = sg["id"], new_id(f"{name}/subgraph")
    sg["name"] = f"{sg['name']} (parallel)"
    for n in wf["nodes"]:
        if n["type"] == old_id:
            n["type"] = sg["id"]
    outer["size"] = [outer["size"][0], outer["size"][1] + 24 * len(PROMOTED)]

    note_id = ids.next_node()
    wf["nodes"].append({"id": note_id, "type": "MarkdownNote", "pos": [outer["pos"][0], outer["pos"][1] - 420],
                        "size": [outer["size"][0], 380], "flags": {}, "order": 0, "mode": 0, "inputs": [],
                        "outputs": [], "properties": {}, "widgets_values": [NOTE.format(title=sg["name"][:-11])],
                        "title": "Parallel version"})
    wf["id"] = new_id(name)
    wf["extra"].pop("prompt", None)  # the stock samplers' API prompt: not this workflow's
    wf["last_node_id"] = sg["state"]["lastNodeId"] = ids.node
    wf["last_link_id"] = sg["state"]["lastLinkId"] = ids.link
    return wf


def thumbnail(template: Path) -> bytes:
    """The template's thumbnail (the first frame of its .webp) as a JPEG for the Templates browser."""
    from PIL import Image

    with Image.open(template.with_name(f"{template.stem}-1.webp")) as img:
        img.seek(0)
        frame = img.convert("RGB")
    frame.thumbnail((640, 640))
    out = io.BytesIO()
    frame.save(out, "JPEG", quality=80, optimize=True)
    return out.getvalue()


def outputs(info: dict, templates: Path | None = None) -> dict[str, bytes]:
    """{file name in example_workflows/: content} for every template."""
    templates = templates or template_dir()
    out = {}
    for name in TEMPLATES:
        path = templates / f"{name}.json"
        out[f"{name}{SUFFIX}.json"] = workflow_file(json.loads(path.read_text()), info, name)
        out[f"{name}{SUFFIX}.jpg"] = thumbnail(path)
    return out


def workflow_file(template: dict, info: dict, name: str) -> bytes:
    """The parallel version of ``template`` as its file's bytes."""
    return (json.dumps(convert(template, info, name), indent=1, ensure_ascii=False) + "\n").encode()


def main(object_info_path):
    info = json.loads(Path(object_info_path).read_text())
    for file, data in outputs(info).items():
        (HERE / file).write_bytes(data)


if __name__ == "__main__":
    main(sys.argv[1])
