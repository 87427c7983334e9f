"""The Ray cluster the samplers run on (ray_cluster.py): a cluster of two nodes on loopback with Ray's
token authentication, joined with the documented setting and sampling equal to stock with a worker on
each node; every failed join naming its cause; and the private ``local`` cluster that another
process cannot join, whose folder goes when it stops."""
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading

import pytest

from helpers.comfy_host import ROOT
from helpers.comfy_server import free_port
from helpers.numerics import mismatches
from helpers.sampler_cases import assert_equals_stock, parallel_ksampler, stock_ksampler, worker_infos

pytestmark = pytest.mark.usefixtures("ray_stopped_after_module")
RAY_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_TMPDIR")


@pytest.fixture(scope="module")
def two_nodes(comfy):
    """(GCS address, token): two Ray nodes on 127.0.0.1, one CPU slot each, token authentication on with a
    token of the test's (tests/helpers/ray_nodes.py in a process of its own)."""
    import ray

    if ray.is_initialized():  # an earlier module's Ray: this module joins other clusters
        ray.shutdown()
    temp = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "helpers" / "ray_nodes.py"), "--nodes", "2",
                             "--cpus", "1", "--temp", temp], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    box = {}
    reader = threading.Thread(target=lambda: box.setdefault("line", proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(180)
    try:
        assert re.fullmatch(r"127\.0\.0\.1:\d+\n", box.get("line", "")), f"no Ray nodes started: {box}"
        yield box["line"].strip(), token, proc
    finally:
        proc.stdin.close()  # the helper stops its nodes
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(30)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A home folder without Ray's default token, and none of Ray's address or token variables."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for k in RAY_VARS:
        monkeypatch.delenv(k, raising=False)
    return tmp_path / "home"


def refused(ps, address, pattern):
    """The join fails with a message matching ``pattern`` and leaves nothing behind (Ray not connected,
    this process's environment as it was)."""
    import ray

    environ = dict(os.environ)
    with pytest.raises(ValueError, match=pattern):
        ps.POOL.connect(address)
    assert not ray.is_initialized()
    assert dict(os.environ) == environ


def test_failed_joins_name_their_cause(ps, two_nodes, home, monkeypatch, tmp_path):
    import ray._private.utils

    address, token, _ = two_nodes
    at = rf"cannot join the Ray cluster at {re.escape(address)} \(given in input 'ray_address'\)"
    refused(ps, address, at + r": it requires Ray's token authentication and this ComfyUI has no token "
                              r"\(RAY_AUTH_MODE=disabled; .*`ray get-auth-token` on the head prints it")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))  # the user's own token, another cluster's
    refused(ps, address, at + r": it refused this ComfyUI's token \(from .*/home/\.ray/auth_token\), which is not "
                              r"the cluster's: start ComfyUI with RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    refused(ps, address, at + r": it refused this ComfyUI's token \(from RAY_AUTH_TOKEN\)")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    refused(ps, address, at + r": it requires Ray's token authentication and this ComfyUI has no token "
                              r"\(RAY_AUTH_MODE=disabled")
    # settings Ray itself would end ComfyUI's process on (a fatal check in its token loader)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (home / ".ray" / "auth_token").unlink()
    refused(ps, address, r"RAY_AUTH_MODE=token but this ComfyUI has no token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    refused(ps, address, r"RAY_AUTH_TOKEN_PATH='.*/missing' cannot be read \(No such file or directory\)")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)  # the right token, but another Ray in this process
    python = ray._private.utils.compute_version_info()[1]
    monkeypatch.setattr(ray._private.utils, "compute_version_info", lambda: ("2.0.0", python))
    refused(ps, address, at + rf": it runs Ray {re.escape(ray.__version__)} on Python {re.escape(python)}, this "
                              rf"ComfyUI Ray 2\.0\.0 on Python {re.escape(python)}; every node and ComfyUI need the "
                              r"same Ray and Python")
    monkeypatch.undo()
    dead = f"127.0.0.1:{free_port()}"
    refused(ps, dead, rf"cannot join the Ray cluster at {dead} \(given in input 'ray_address'\): nothing answers "
                      r"there \(ConnectionRefusedError: .*\)\. Start the head with `ray start --head --port=\d+`")
    with socket.create_server(("127.0.0.1", 0)) as other:  # something listens, but no Ray
        busy = f"127.0.0.1:{other.getsockname()[1]}"
        refused(ps, busy, rf"cannot join the Ray cluster at {busy} .*: something listens there, but no Ray GCS "
                          r"answered within 5 s")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # `ray start` wrote no address file there
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    refused(ps, "auto", r"input 'ray_address' is 'auto', but there is no Ray cluster to join: RAY_ADDRESS is unset "
                        r"and `ray start` has started none on this machine")
    refused(ps, "ray://127.0.0.1:10001", r"input 'ray_address' is 'ray://127\.0\.0\.1:10001'")


def test_a_two_node_cluster_with_a_token_equals_stock(ps, nodes_mod, two_nodes, home, monkeypatch, tiny_model,
                                                      tiny_model_f64, tiny_ckpt, caplog_info):
    """The README's setting (RAY_AUTH_TOKEN: the cluster's token) and `auto` with RAY_ADDRESS: one worker on
    each node, the result equal to stock; the cluster's nodes outlive the pack's stop."""
    import ray

    address, token, nodes = two_nodes
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    monkeypatch.setenv("RAY_ADDRESS", address)
    cc = tiny_ckpt[1]["caption_channels"]
    got, ui = parallel_ksampler(nodes_mod, tiny_model, cc, address="auto", cfg_parallel="off")
    assert "2 workers, Ulysses 2 x ring 1" in ui.value
    assert_equals_stock(got, tiny_model, tiny_model_f64, cc)
    # the twin: a result of other inputs (the conditionings swapped) fails the same check
    assert mismatches(stock_ksampler(tiny_model, cc, swap=True), stock_ksampler(tiny_model, cc),
                      stock_ksampler(tiny_model_f64, cc))
    infos = worker_infos(ps)
    assert len({i["node_id"] for i in infos}) == 2, infos  # one worker on each node
    assert re.search(rf"joined the Ray cluster at {re.escape(address)} \(from RAY_ADDRESS; token authentication on, "
                     r"token from RAY_AUTH_TOKEN\): 2 nodes, 0 GPUs, 2 CPU slots; Ray \d", caplog_info.text)
    started = [line for line in caplog_info.text.splitlines() if "LTXAV Parallel Sampler: started 2 workers" in line]
    for i in infos:  # each worker's line names its node: host, address and Ray's node id
        assert f"{i['rank']}: cpu pid {i['pid']} on {i['host']} (127.0.0.1, Ray node {i['node_id'][:8]})" in started[-1]
    ps.POOL.shutdown("the test is done")
    assert not ray.is_initialized() and nodes.poll() is None  # the pack stopped only what it started


JOIN = """
import ray
try:
    ray.init(address="auto", configure_logging=False, log_to_driver=False)
    print("JOINED", ray.get_runtime_context().gcs_address, flush=True)
except Exception as e:
    print("FAILED", type(e).__name__, flush=True)
"""


def test_another_process_cannot_join_the_private_cluster(ps, home, tmp_path):
    """Another process that finds the pack's cluster (RAY_ADDRESS pointing at it, as Ray's `auto` finds any
    GCS on the machine) does not join it, with no token or with the user's own; with the cluster's token (the
    twin) it would. The folder with Ray's files and the token (0700, 0600) goes when the cluster stops."""
    import ray

    ps.POOL.connect("local")
    folder = ps.POOL.cluster.folder
    token = os.path.join(folder, "auth_token")
    try:
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700 and stat.S_IMODE(os.stat(token).st_mode) == 0o600
        assert ray._private.worker._global_node.get_session_dir_path().startswith(folder + os.sep)
        assert not [k for k in os.environ if k.startswith("RAY_AUTH")]  # nothing of it in ComfyUI's environment
        base = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_gcs_server_port_wait_time_s": "2"}
        (home / ".ray").mkdir()
        (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))  # the user's own token
        runs = {"no token": {"HOME": str(tmp_path)}, "the user's token": {"RAY_AUTH_MODE": "token"},
                "the cluster's token (twin)": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token}}
        procs = {name: subprocess.Popen([sys.executable, "-c", JOIN], env={**base, **env}, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True) for name, env in runs.items()}
        out = {name: p.communicate(timeout=240)[0] for name, p in procs.items()}
    finally:
        ps.POOL.shutdown("the test is done")
    assert "JOINED" not in out["no token"] and "JOINED" not in out["the user's token"], out
    assert "JOINED" in out["the cluster's token (twin)"], out
    assert not os.path.exists(folder)
