"""Every node type, link and widget in example_workflows/ (UI format) and example_workflows/api/ (API
format) exists in this pack or stock ComfyUI (as the running server reports them in /object_info), and the
server's Templates list offers the UI-format ones only."""
import json
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parent.parent / "example_workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))  # the Templates browser lists every *.json here, one level deep
API_FILES = sorted((WORKFLOWS / "api").glob("*_api.json"))
FRONTEND_ONLY = {"MarkdownNote", "Note"}  # editor-only nodes, not in /object_info
USER_FILES = {"ckpt_name", "text_encoder", "image", "unet_name", "lora_name"}  # combos of the user's model files
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


@pytest.fixture(scope="module")
def info(server):
    return server.get("/object_info")


def input_specs(info, node_type):
    spec = info[node_type]["input"]
    return {**spec.get("required", {}), **spec.get("optional", {})}


def widget_count(info, node_type):
    n = 0
    for kind, *rest in input_specs(info, node_type).values():
        opts = rest[0] if rest else {}
        if isinstance(kind, list) or kind in WIDGET_KINDS:
            n += 1 + bool(opts.get("control_after_generate")) + bool(opts.get("image_upload"))
    return n


def test_examples_exist():
    assert {p.name for p in UI_FILES} == {"ltxav_t2v_parallel.json", "ltxav_i2v_parallel.json"}
    assert {p.stem.removesuffix("_api") for p in API_FILES} == {p.stem for p in UI_FILES}
    for path in UI_FILES:  # an API-format file here would open from the Templates browser as an empty graph
        assert "nodes" in json.loads(path.read_text()), f"{path.name} is not UI format: move it to api/"


def test_templates_list_only_ui_workflows(server):
    from helpers.comfy_server import PACK_FOLDER

    assert sorted(server.get("/workflow_templates").get(PACK_FOLDER, [])) == sorted(p.stem for p in UI_FILES)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_nodes_and_links_exist(info, path):
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {link[0]: link for link in wf["links"]}
    assert wf["last_link_id"] >= max(links) and wf["last_node_id"] >= max(nodes)
    assert any(n["type"].startswith("LTXAVParallel") for n in nodes.values())
    for n in nodes.values():
        if n["type"] in FRONTEND_ONLY:
            continue
        assert n["type"] in info, f"{path.name}: node {n['id']} type {n['type']} is not registered"
        specs = input_specs(info, n["type"])
        assert len(n["widgets_values"]) == widget_count(info, n["type"]), (path.name, n["type"])
        for slot, inp in enumerate(n["inputs"]):
            assert inp["name"] in specs, (path.name, n["type"], inp["name"])
            link = links[inp["link"]]
            _, src, src_slot, dst, dst_slot, kind = link
            assert (dst, dst_slot) == (n["id"], slot)
            src_types = info[nodes[src]["type"]]["output"]
            assert src_types[src_slot] == kind == inp["type"] == specs[inp["name"]][0], (path.name, link)
            assert link[0] in nodes[src]["outputs"][src_slot]["links"]
        for out in n["outputs"]:
            for link_id in out["links"]:
                assert links[link_id][1] == n["id"] and links[link_id][2] == out["slot_index"]


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.name)
def test_api_workflow_inputs_exist(info, path):
    prompt = json.loads(path.read_text())
    for nid, node in prompt.items():
        ntype = node["class_type"]
        assert ntype in info, f"{path.name}: node {nid} type {ntype} is not registered"
        specs = input_specs(info, ntype)
        required = info[ntype]["input"].get("required", {})
        assert set(required) <= set(node["inputs"]), (path.name, ntype, set(required) - set(node["inputs"]))
        for name, value in node["inputs"].items():
            assert name in specs, (path.name, ntype, name)
            kind = specs[name][0]
            if isinstance(value, list):  # a link: [node id, output slot]
                src = prompt[value[0]]["class_type"]
                assert info[src]["output"][value[1]] == kind, (path.name, ntype, name)
            elif isinstance(kind, list) and name not in USER_FILES:
                assert value in kind, (path.name, ntype, name, value)
            elif kind == "COMBO" and name not in USER_FILES:
                assert value in specs[name][1]["options"], (path.name, ntype, name, value)
