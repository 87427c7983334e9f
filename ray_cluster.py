"""The Ray cluster the parallel samplers run on: the pack's private cluster on this machine, or one the
user joins; and, when a join fails, what failed.

``local``: ``ray.init`` starts a cluster on 127.0.0.1 in a folder of its own (``ltxav-ray-*``, mode 0700,
where Ray keeps its temp files: under RAY_TMPDIR, TMPDIR or /tmp), with Ray's token authentication on and a
token made for this start (a 0600 file in that folder that Ray's processes read; not ~/.ray/auth_token,
which every process of the user reads). Another process that finds the cluster (Ray's ``auto`` scans the
machine's processes for a GCS) cannot attach: it has no token for it. Nothing listens beyond loopback.
When the cluster stops, the folder goes (Ray's session logs and sockets, the token).

Joining (``auto`` or ``host:port``): ``ray_join`` finds the address and Ray's token settings and probes
the head within seconds, naming what fails; only then ``ray.init``, which would retry for 20 s or more and
say only ``ConnectionError``.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable

from .ray_join import (
    check_join,
    first_line,
    join_auth,
    refresh_ray_auth,
    target,
)

log = logging.getLogger(__name__)
STOP_S = 5.0  # the time Ray's processes get to end (a failed start, SIGTERM/SIGINT) before those left are killed


@contextlib.contextmanager
def environment(values: dict):
    """``os.environ`` with ``values`` (None: removed) inside the ``with``; put back after."""
    before = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def node_address(loopback: bool):
    """Ray's choice of this node's address during one ``ray.init``. Ray swaps a loopback node address
    for the machine's network address, and its processes then listen on every interface, unless its
    cluster mode is off; it reads that mode from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is
    first imported, so whatever imported Ray first (a failed attempt at another address, another custom
    node) would decide. The mode is set here for this attempt only and put back after it."""
    import ray._private.ray_constants as ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    if loopback:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


@contextlib.contextmanager
def without_crash_handler():
    """No Ray crash handler in ComfyUI's process: Ray's driver installs one that takes SIGTERM for a
    crash and logs a stack trace for it. Ray reads the setting when ray.init makes this process's
    core worker; Ray's own processes and the workers keep theirs."""
    import ray._private.ray_constants as ray_constants

    before = ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER
    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    try:
        yield
    finally:
        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = before


def loopback_interface() -> str:
    """The name of the network interface that holds 127.0.0.1 (``lo`` on Linux)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == "127.0.0.1" for a in addrs):
            return name
    return "lo"


def descendants(procs) -> list:
    """``procs`` and all their children, those still running."""
    import psutil

    out = {}
    for p in procs:
        try:
            if p.is_running():
                out[p.pid] = p
                out.update((c.pid, c) for c in p.children(recursive=True))
        except psutil.Error:
            pass
    return list(out.values())


def reap(procs, timeout: float) -> None:
    """Wait up to ``timeout`` s for ``procs`` to end, then kill those left."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=2.0)


def private_folder() -> tuple[str, str]:
    """A new folder for a private cluster (mode 0700), where Ray keeps its temp files (in ``ray/``, which Ray
    makes mode 0777: the folder above keeps other users out) beside the token file (mode 0600, a fresh
    random token): (folder, token path)."""
    from ray._common.utils import get_default_system_temp_dir

    folder = tempfile.mkdtemp(prefix="ltxav-ray-", dir=get_default_system_temp_dir())
    token_path = os.path.join(folder, "auth_token")
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return folder, token_path


def describe_resources(resources: dict, nodes: int) -> str:
    """A cluster's size as the log says it: nodes, GPUs and CPU slots."""
    return (f"{nodes} node{'s' if nodes != 1 else ''}, {int(resources.get('GPU', 0))} GPUs, "
            f"{int(resources.get('CPU', 0))} CPU slots")


class Cluster:
    """This process's Ray connection: the private cluster it started (its processes and folder), or the
    cluster it joined."""

    def __init__(self, node: str, status: Callable[[str], None]):
        self.node, self.status = node, status
        self.address: str | None = None  # the ray_address it connected with
        self.loopback = True
        self.processes: list = []  # the processes ray.init started here (a private cluster's roots)
        self.folder: str | None = None  # a private cluster's folder (Ray's temp files, its token)
        self.stopping: str | None = None  # why Ray is being stopped (a run then fails saying so)
        self._lock = threading.Lock()  # one shutdown at a time (a signal may arrive during another)
        self._at_exit = False

    def connect(self, address: str, num_gpus: int, num_cpus: int) -> None:
        """Connect this process to the cluster ``address`` names (``num_gpus``/``num_cpus``: a private
        cluster's resources); a message naming the cause when it cannot."""
        import psutil
        import ray

        t = target(address, self.node)
        if t.address is None:
            self.status("starting Ray (a private cluster on 127.0.0.1)")
            folder, token = private_folder()
            env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token, "RAY_AUTH_TOKEN": None}
            kwargs = dict(_temp_dir=os.path.join(folder, "ray"), num_gpus=num_gpus, num_cpus=num_cpus)
        else:
            self.status(f"joining the Ray cluster at {t.address} ({t.source})")
            folder, auth = None, join_auth(self.node)
            env = auth.env
            kwargs = {}
        # no job-wide env: each worker group gets the LTXAV_PARALLEL_* etc. variables of its own start
        kwargs.update(address=t.address or "local", include_dashboard=False, configure_logging=False,
                      log_to_driver=True)
        if t.loopback:
            kwargs["_node_ip_address"] = "127.0.0.1"
        me = psutil.Process()
        children = {p.pid for p in me.children()}
        environ = dict(os.environ)
        t0 = time.perf_counter()
        try:
            # Ray's processes inherit the environment of ray.init (a private cluster's token file); this
            # process keeps what Ray read then, and its environment is put back after
            with environment(env), node_address(t.loopback):
                refresh_ray_auth()
                metadata = None if t.address is None else check_join(t, auth, self.node)
                with without_crash_handler():
                    ray.init(**kwargs)
        except Exception as e:  # noqa: BLE001 - ray raises ConnectionError, ValueError, RuntimeError...
            self._undo_init([p for p in me.children() if p.pid not in children], environ, folder)
            if isinstance(e, ValueError) and str(e).startswith(self.node):
                raise
            where = "start a private Ray cluster" if t.address is None else f"join the Ray cluster at {t.address} " \
                f"({t.source})"
            raise ValueError(f"{self.node}: cannot {where}: {first_line(e)}. Use 'local' for a private cluster on "
                             "this machine, 'auto' for the one `ray start` made here, or the head's host:port.") \
                from None
        self.address, self.loopback, self.stopping, self.folder = address, t.loopback, None, folder
        self.processes = [p for p in me.children() if p.pid not in children] if t.address is None else []
        if not self._at_exit:  # before Ray's own exit hook (registered when Ray was imported): ours runs first
            atexit.register(self.shutdown, "ComfyUI is exiting")
            self._at_exit = True
        gcs = ray.get_runtime_context().gcs_address
        resources = describe_resources(ray.cluster_resources(), sum(1 for n in ray.nodes() if n.get("Alive")))
        if t.address is None:
            log.info("%s: started a private Ray cluster on 127.0.0.1 in %.1f s (GCS %s; token authentication, "
                     "its token in %s): %s", self.node, time.perf_counter() - t0, gcs, folder, resources)
        else:
            tokens = f"on, token from {auth.token}" if auth.on else "off"
            versions = f"; Ray {metadata['ray_version']}, Python {metadata['python_version']}" if metadata else ""
            log.info("%s: joined the Ray cluster at %s (%s; token authentication %s): %s%s", self.node, gcs,
                     t.source, tokens, resources, versions)

    def _undo_init(self, started: list, environ: dict, folder: str | None) -> None:
        """After a failed ray.init: leave nothing that would change the next attempt (Ray's globals,
        the variables it set in this process's environment, processes it started, a private folder)."""
        import ray

        procs = descendants(started)
        with contextlib.suppress(Exception):
            ray.shutdown()
        for k in set(os.environ) - set(environ):
            del os.environ[k]
        os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})
        for p in procs:
            with contextlib.suppress(Exception):
                p.terminate()
        reap(procs, STOP_S)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)

    def shutdown(self, why: str, stop_workers: Callable[[], None] | None = None) -> None:
        """Stop Ray in this process (``stop_workers`` first); when the pack started a private cluster, every
        process of it (within about STOP_S seconds: Ray's own stop first, then what is left is killed), and
        its folder."""
        ray = sys.modules.get("ray")
        connected = ray is not None and ray.is_initialized()
        if not (connected or self.folder or self.processes) or not self._lock.acquire(blocking=False):
            return
        try:
            self.stopping = why
            procs = descendants(self.processes)
            if not connected:  # Ray was stopped without the pack (ray.shutdown()): what it left of the cluster
                reap(procs, STOP_S)
                self.processes = []
                self._remove_folder()
                return
            log.info("%s: %s: stopping the workers and Ray (%d processes started here)", self.node, why, len(procs))

            def stop():
                if stop_workers is not None:
                    with contextlib.suppress(Exception):
                        stop_workers()
                ray.shutdown()

            # a thread: the signal may have interrupted this thread inside a Ray call; Ray's stop is bounded
            deadline = time.monotonic() + STOP_S
            t = threading.Thread(target=stop, name="ltxav-ray-stop", daemon=True)
            t.start()
            t.join(STOP_S)
            reap(procs, max(0.5, deadline - time.monotonic()))
            self.processes = []
            self._remove_folder()
        finally:
            self._lock.release()

    def _remove_folder(self) -> None:
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
