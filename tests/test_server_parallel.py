"""The parallel sampler in a real headless ComfyUI server (--cpu) with 2 CPU Ray workers, driven
through POST /prompt: same result as the stock KSampler, Interrupt, a killed worker, an existing
Ray head on loopback; every socket on loopback (also after a bad address), progress texts while
workers start, and SIGTERM / SIGINT ending every process the pack started."""
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from helpers.comfy_server import (
    ComfyServer,
    ProgressTexts,
    free_port,
    is_loopback,
    listening_sockets,
    non_loopback_ipv4,
    process_tree,
    t2v_prompt,
    t2v_reference,
    write_inputs,
)
from helpers.numerics import assert_matches


def parallel_prompt(server, steps=2, prefix="par", address="local", seed=42):
    p = t2v_prompt("tiny_ltxav.safetensors", server.dataset, steps=steps, prefix=prefix, seed=seed)
    p["6"] = {"class_type": "LTXAVParallelKSampler",
              "inputs": {**p["6"]["inputs"], "gpus": 2, "ulysses_degree": 0, "ring_degree": 1, "ray_address": address}}
    return p


def status_messages(entry):
    return {kind: data for kind, data in entry["status"]["messages"]}


def worker_pids(server):
    lines = [line for line in server.log().splitlines() if "LTXAV Parallel Sampler: started" in line]
    return [int(p) for p in re.findall(r"pid (\d+)", lines[-1])] if lines else []


def wait_for_log(server, text, count=1, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.log().count(text) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not logged {count}x:\n{server.log()[-3000:]}")


def test_parallel_prompt_equals_stock_prompt(server, tiny_model_f64):
    stock = server.run(t2v_prompt("tiny_ltxav.safetensors", server.dataset, steps=2, prefix="stock"))
    par = server.run(parallel_prompt(server))
    assert par["status"]["status_str"] == "success", par["status"]
    want, got = server.saved_latents(stock), server.saved_latents(par)
    reference = t2v_reference(tiny_model_f64, server.base, server.dataset)
    for k in ("8", "9"):
        assert_matches(got[k], want[k], reference[k], f"SaveLatent {k}")
    # cfg 3 with cfg_parallel left out of the prompt (an optional input: auto): one pass a worker
    assert "LTXAV Parallel Sampler: 2 workers, cfg 2 x Ulysses 1 x ring 1" in par["outputs"]["6"]["text"][0]


def test_a_malformed_address_is_refused_at_queue_time(server):
    """The node's queue-time check: POST /prompt answers 400 naming the input (no run, no traceback)."""
    status, body = server.post("/prompt", {"prompt": parallel_prompt(server, address="nowhere"), "client_id": "q"})
    assert status == 400, body
    details = [e["details"] for e in body["node_errors"]["6"]["errors"]]
    assert any("LTXAV Parallel Sampler: input 'ray_address' is 'nowhere'" in d for d in details), details
    assert "Traceback" not in str(body)


def test_interrupt_then_next_prompt(server):
    server.run(parallel_prompt(server, steps=1))  # workers up
    starts = server.log().count("LTXAV Parallel Sampler: started")
    pid = server.queue(parallel_prompt(server, steps=400, prefix="long"))
    time.sleep(3)
    server.post("/interrupt", {})
    entry = server.wait(pid)
    assert "execution_interrupted" in status_messages(entry), entry["status"]
    ok = server.run(parallel_prompt(server, prefix="after_interrupt"))
    assert ok["status"]["status_str"] == "success", ok["status"]
    assert server.log().count("LTXAV Parallel Sampler: started") == starts  # same workers


def test_killed_worker_is_an_error_and_the_next_prompt_works(server):
    server.run(parallel_prompt(server, steps=1))
    starts = server.log().count("LTXAV Parallel Sampler: started")
    pids = worker_pids(server)
    assert len(pids) == 2
    pid = server.queue(parallel_prompt(server, steps=400, prefix="killed"))
    time.sleep(3)
    os.kill(pids[1], signal.SIGKILL)
    entry = server.wait(pid)
    err = status_messages(entry).get("execution_error")
    assert err and "LTXAV Parallel Sampler: worker 1 (cpu) died during sampling" in err["exception_message"]
    assert err["node_type"] == "LTXAVParallelKSampler"
    ok = server.run(parallel_prompt(server, prefix="after_kill"))
    assert ok["status"]["status_str"] == "success", ok["status"]
    assert server.log().count("LTXAV Parallel Sampler: started") == starts + 1


def test_joins_an_existing_ray_head_on_loopback(comfy, tiny_ckpt, tiny_model_f64, tmp_path_factory):
    """A head `ray start` runs with token authentication, joined as the README says: ComfyUI started with
    RAY_AUTH_TOKEN set to the cluster's token."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    port = free_port()
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    # --block keeps `ray start` as the parent of the head's processes: killing its process group stops
    # this head only (`ray stop` would stop every Ray on the machine, the other tests' server's too)
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    srv = ComfyServer(tmp_path_factory.mktemp("comfy_join"), env={"RAY_AUTH_TOKEN": token})
    try:
        wait_for_port(port, head)
        shutil.copy(tiny_ckpt[0], srv.base / "models" / "diffusion_models" / "tiny_ltxav.safetensors")
        srv.dataset = write_inputs(srv.base, tiny_ckpt[1]["caption_channels"], length=25)
        srv.start()
        stock = srv.run(t2v_prompt("tiny_ltxav.safetensors", srv.dataset, steps=2, prefix="stock"))
        par = srv.run(parallel_prompt(srv, address=f"127.0.0.1:{port}"))
        assert par["status"]["status_str"] == "success", par["status"]
        assert f"joined the Ray cluster at 127.0.0.1:{port} (given in input 'ray_address'; token authentication " \
            "on, token from RAY_AUTH_TOKEN): 1 node, 0 GPUs, 2 CPU slots" in srv.log()
        want, got = srv.saved_latents(stock), srv.saved_latents(par)
        reference = t2v_reference(tiny_model_f64, srv.base, srv.dataset)
        for k in ("8", "9"):
            assert_matches(got[k], want[k], reference[k], f"SaveLatent {k}")
    finally:
        srv.stop()
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(30)
        shutil.rmtree(temp, ignore_errors=True)


def wait_for_port(port, proc, timeout=120):
    import socket

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "ray start --head exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no Ray head on port {port}")


def assert_all_on_loopback(srv):
    socks = listening_sockets(process_tree(srv.proc.pid))
    assert any(name.startswith("ray::") for _, name, *_ in socks), socks  # the workers are in the tree
    exposed = [s for s in socks if not is_loopback(s[2])]
    assert not exposed, f"listening beyond loopback (pid, name, address, port, kind): {exposed}"


def test_every_socket_is_on_loopback_after_a_parallel_prompt(server):
    ok = server.run(parallel_prompt(server, steps=1, prefix="sockets"))
    assert ok["status"]["status_str"] == "success", ok["status"]
    assert_all_on_loopback(server)


def fresh_server(tmp_path_factory, tiny_ckpt, name):
    srv = ComfyServer(tmp_path_factory.mktemp(name))
    shutil.copy(tiny_ckpt[0], srv.base / "models" / "diffusion_models" / "tiny_ltxav.safetensors")
    srv.dataset = write_inputs(srv.base, tiny_ckpt[1]["caption_channels"], length=25)
    return srv.start()


@pytest.fixture(scope="module")
def new_user(comfy, tiny_ckpt, tmp_path_factory):
    """A server of its own, that no parallel prompt has run in yet (the session's `server` has Ray up)."""
    srv = fresh_server(tmp_path_factory, tiny_ckpt, "comfy_new_user")
    yield srv
    srv.stop()


def test_bad_address_then_local_stays_on_loopback_and_says_what_it_does(new_user):
    lan = non_loopback_ipv4()
    if lan is None:
        pytest.skip("this machine has no address beyond loopback: nothing could listen there")
    with ProgressTexts(new_user.url) as progress:
        bad = new_user.run(parallel_prompt(new_user, address=f"{lan}:1", prefix="bad_address"))
        err = status_messages(bad).get("execution_error")
        assert err and f"cannot join the Ray cluster at {lan}:1 (given in input 'ray_address'): nothing answers " \
            "there" in err["exception_message"]
        ok = new_user.run(parallel_prompt(new_user, prefix="after_bad_address"))
        assert ok["status"]["status_str"] == "success", ok["status"]
        wanted = ["starting Ray (a private cluster on 127.0.0.1)", "starting 2 workers",
                  "loading the model on 2 workers", "sampling on 2 workers"]
        for _ in range(50):  # the texts went out before the prompt finished; the websocket may lag
            if ("6", wanted[-1]) in progress.texts:
                break
            time.sleep(0.2)
    assert_all_on_loopback(new_user)
    texts = [t for node, t in progress.texts if node == "6"]
    assert [t for t in texts if t in wanted] == wanted, progress.texts


def running(proc) -> bool:
    """Alive and not a zombie (a psutil.Process; the name is kept for the messages)."""
    import psutil

    try:
        proc.name()
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_signal_ends_every_process(srv, sig):
    ok = srv.run(parallel_prompt(srv, steps=1, prefix=f"before_{sig.name}"))
    assert ok["status"]["status_str"] == "success", ok["status"]
    procs = [p for p in process_tree(srv.proc.pid)[1:] if running(p)]
    folder = re.search(r"started a private Ray cluster on 127\.0\.0\.1 .*its token in (\S+)\)", srv.log()).group(1)
    assert os.path.isdir(folder)
    names = [p.name() for p in procs]
    assert "raylet" in names and any(n.startswith("ray::") for n in names), names
    os.kill(srv.proc.pid, sig)  # ComfyUI's process only, as `kill` or a service manager sends it
    deadline = time.monotonic() + 10
    alive = procs
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if running(p)]
    try:
        assert not alive, f"alive 10 s after {sig.name}: {[(p.pid, p.name()) for p in alive]}"
        # then ComfyUI's own handling: Ctrl-C's "Stopped server", or the default end by the signal
        code = srv.proc.wait(10)
        assert code == (0 if sig == signal.SIGINT else -sig), code
        assert f"LTXAV Parallel Sampler: {sig.name} received: stopping the workers and Ray" in srv.log()
        assert f"*** {sig.name} received" not in srv.log()  # Ray's crash handler's stack trace
        assert not os.path.exists(folder)  # Ray's session folder, sockets and the cluster's token
        if sig == signal.SIGINT:
            assert "Stopped server" in srv.log()
    finally:
        for p in alive:  # leave no strays for the other tests
            try:
                p.kill()
            except Exception:  # noqa: BLE001 - gone meanwhile
                pass


def test_sigterm_ends_every_process_the_pack_started(new_user):
    assert_signal_ends_every_process(new_user, signal.SIGTERM)


def test_sigint_ends_every_process_the_pack_started(comfy, tiny_ckpt, tmp_path_factory):
    srv = fresh_server(tmp_path_factory, tiny_ckpt, "comfy_sigint")
    try:
        assert_signal_ends_every_process(srv, signal.SIGINT)
    finally:
        srv.stop()
