"""A headless ComfyUI server on loopback with this pack installed, for POST /prompt tests; the
sockets its processes listen on, and the progress texts it sends."""
import asyncio
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file

from .comfy_host import COMFYUI_PATH, ROOT

PACK_FOLDER = "ComfyUI-LTXAV-Parallel"
FLOAT64_NODES = Path(__file__).resolve().parent / "float64_nodes"  # a test-only custom node


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list:
    """The process ``pid`` and every process below it (psutil.Process objects)."""
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def listening_sockets(procs) -> list[tuple]:
    """(pid, process name, address, port, kind) for every TCP socket listening and every UDP socket
    bound, in ``procs``."""
    import psutil

    out = []
    for p in procs:
        try:
            name = p.name()
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr):
                    out.append((p.pid, name, c.laddr.ip, c.laddr.port, c.type.name))
        except psutil.NoSuchProcess:
            pass
    return out


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.0.0.1); not the wildcards 0.0.0.0 / ::."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine that is not loopback (None when it has none)."""
    import psutil

    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not is_loopback(a.address):
                return a.address
    return None


class ProgressTexts:
    """Listens on a server's websocket (in a thread) and keeps the progress texts it sends, as
    (node id, text) in order of arrival."""

    def __init__(self, url: str):
        self.url = url.replace("http://", "ws://") + "/ws?clientId=progress-texts"
        self.texts: list[tuple[str, str]] = []
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True)

    def __enter__(self):
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError(f"no websocket at {self.url}")
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    async def _listen(self):
        import aiohttp

        async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as ws:
            self._ready.set()
            while not self._stop.is_set():
                try:
                    msg = await ws.receive(timeout=0.5)
                except asyncio.TimeoutError:
                    continue
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    return
                if msg.type == aiohttp.WSMsgType.BINARY and struct.unpack(">I", msg.data[:4])[0] == 3:  # TEXT
                    n = struct.unpack(">I", msg.data[4:8])[0]
                    self.texts.append((msg.data[8:8 + n].decode(), msg.data[8 + n:].decode()))


class ComfyServer:
    """``python main.py --cpu`` in a private base directory: models, input, output, custom_nodes."""

    def __init__(self, base: Path, extra_args=(), env=None):
        self.base = Path(base)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        for d in ("custom_nodes", "models/diffusion_models", "models/loras", "input", "output", "user", "temp"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_FOLDER
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
        self.log_path = self.base / "server.log"
        self.extra_args = list(extra_args)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = None

    def start(self, timeout=120):
        cmd = [sys.executable, str(COMFYUI_PATH / "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--base-directory", str(self.base), "--disable-auto-launch",
               "--disable-api-nodes", "--preview-method", "none", "--database-url", "sqlite:///:memory:",
               *self.extra_args]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=str(COMFYUI_PATH), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited ({self.proc.returncode}):\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI server did not answer in {timeout}s:\n{self.log()[-4000:]}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(30)
        if self.proc:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path, payload):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def queue(self, prompt: dict) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
        if status != 200:
            raise AssertionError(f"POST /prompt refused ({status}): {json.dumps(body)[:2000]}")
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout=300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                if hist[prompt_id]["status"]["status_str"] in ("success", "error"):
                    return hist[prompt_id]
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI server died:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log()[-4000:]}")

    def run(self, prompt: dict, timeout=300) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def saved_latents(self, entry: dict) -> dict[str, torch.Tensor]:
        """{node_id: latent tensor} for every SaveLatent output of a finished prompt."""
        out = {}
        for node_id, outputs in entry["outputs"].items():
            for item in outputs.get("latents", []):
                path = self.base / "output" / item["subfolder"] / item["filename"]
                out[node_id] = load_file(str(path))["latent_tensor"]
        return out


def write_inputs(base: Path, caption_channels: int, length: int, folder="tiny_cond", seed=1):
    """What the workflows load with stock nodes: an LTXAV conditioning (as LTXVConditioning would
    give, without Gemma) and an empty audio latent, as a LoadTrainingDataset folder."""
    from .comfy_host import make_conditioning

    d = Path(base) / "output" / folder
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"latents": [{"samples": torch.zeros(1, 8, length + 1, 16), "type": "audio"}],
                "conditioning": [make_conditioning(caption_channels, seed=seed)]}, d / "shard_000.pkl")
    return folder


def t2v_prompt(unet_name, dataset, width=128, height=96, length=25, seed=42, steps=2, model_node=None,
               extra=None, prefix="t2v"):
    """API-format LTXAV text-to-video: UNETLoader -> [model_node] -> KSampler -> SaveLatent (video, audio)."""
    p = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        "3": {"class_type": "LoadTrainingDataset", "inputs": {"folder_name": dataset}},
        "4": {"class_type": "EmptyLTXVLatentVideo", "inputs": {"width": width, "height": height, "length": length,
                                                             "batch_size": 1}},
        "5": {"class_type": "LTXVConcatAVLatent", "inputs": {"video_latent": ["4", 0], "audio_latent": ["3", 0]}},
        "10": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 1]}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": 3.0,
                                                  "sampler_name": "euler", "scheduler": "simple",
                                                  "positive": ["3", 1], "negative": ["10", 0],
                                                  "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "LTXVSeparateAVLatent", "inputs": {"av_latent": ["6", 0]}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"latents/{prefix}_v"}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 1], "filename_prefix": f"latents/{prefix}_a"}},
    }
    if model_node is not None:
        p["2"] = {**model_node, "inputs": {"model": ["1", 0], **model_node["inputs"]}}
        p["6"]["inputs"]["model"] = ["2", 0]
    p.update(extra or {})
    return p


def t2v_reference(model, base: Path, dataset: str, width=128, height=96, length=25, seed=42, steps=2):
    """What ``t2v_prompt`` computes, in this process with the stock nodes' own functions, on ``model``
    (e.g. the float64 reference model): {"8": video, "9": audio} like ``saved_latents``."""
    import nodes
    from comfy_extras.nodes_lt import EmptyLTXVLatentVideo, LTXVConcatAVLatent

    data = torch.load(Path(base) / "output" / dataset / "shard_000.pkl", weights_only=False)
    positive = data["conditioning"][0]
    negative = nodes.ConditioningZeroOut().zero_out(positive)[0]
    video = EmptyLTXVLatentVideo.execute(width, height, length, 1)[0]
    latent = LTXVConcatAVLatent.execute(video, data["latents"][0])[0]
    out = nodes.common_ksampler(model, seed, steps, 3.0, "euler", "simple", positive, negative, latent)[0]
    v, a = out["samples"].unbind()
    return {"8": v, "9": a}
