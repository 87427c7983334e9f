"""The LTX FFN Chunker in a real headless ComfyUI server, driven through POST /prompt."""
from helpers.comfy_server import t2v_prompt, t2v_reference
from helpers.numerics import assert_matches


def test_node_is_registered(server):
    info = server.get("/object_info/LTXFFNChunker")["LTXFFNChunker"]
    assert info["display_name"] == "LTX FFN Chunker"
    assert set(info["input"]["required"]) == {"model", "auto", "num_chunks"}


def test_chunked_prompt_equals_plain_prompt(server, tiny_model_f64):
    plain = server.run(t2v_prompt("tiny_ltxav.safetensors", server.dataset, prefix="plain"))
    assert plain["status"]["status_str"] == "success", plain["status"]
    chunker = {"class_type": "LTXFFNChunker", "inputs": {"auto": False, "num_chunks": 5}}
    chunked = server.run(t2v_prompt("tiny_ltxav.safetensors", server.dataset, model_node=chunker, prefix="chunked"))
    assert chunked["status"]["status_str"] == "success", chunked["status"]
    assert "Video FFN chunking active: 5 chunks (48 tokens)" in server.log()
    want, got = server.saved_latents(plain), server.saved_latents(chunked)
    assert set(got) == {"8", "9"}  # video and audio
    assert got["8"].shape == (1, 128, 4, 3, 4) and got["9"].shape == (1, 8, 26, 16)
    reference = t2v_reference(tiny_model_f64, server.base, server.dataset)
    for k in ("8", "9"):
        assert_matches(got[k], want[k], reference[k], f"SaveLatent {k}")


def test_bad_chunk_count_is_refused_by_validation(server):
    chunker = {"class_type": "LTXFFNChunker", "inputs": {"auto": False, "num_chunks": 0}}
    status, body = server.post("/prompt", {"prompt": t2v_prompt("tiny_ltxav.safetensors", server.dataset,
                                                                model_node=chunker)})
    assert status == 400
    assert "num_chunks" in str(body["node_errors"]["2"])
