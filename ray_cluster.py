"""The Ray cluster the parallel samplers run on: the pack's private cluster on this machine, or one the
user joins; and, when a join fails, what failed.

``local``: ``ray.init`` starts a cluster on 127.0.0.1 in a folder of its own (``ltxav-ray-*``, mode 0700,
where Ray keeps its temp files: under RAY_TMPDIR, TMPDIR or /tmp), with Ray's token authentication on and a
token made for this start (a 0600 file in that folder that Ray's processes read; not ~/.ray/auth_token,
which every process of the user reads). Another process that finds the cluster (Ray's ``auto`` scans the
machine's processes for a GCS) cannot attach: it has no token for it. Nothing listens beyond loopback.
When the cluster stops, the folder goes (Ray's session logs and sockets, the token).

Joining (``auto`` or ``host:port``): the address (``auto``: RAY_ADDRESS, else the cluster ``ray start``
last started on this machine; never one found by scanning processes, which may be another process's
private cluster); Ray's own token settings (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token:
token authentication is on when one is there, unless RAY_AUTH_MODE says otherwise); then a probe of the
head that answers within seconds and names what fails: nothing listening, no Ray head there, no token,
a token the cluster refuses, another Ray or Python version. Only then ``ray.init``, which would retry
for 20 s or more and say only ``ConnectionError``.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)
STOP_S = 5.0  # the time Ray's processes get to end (a failed start, SIGTERM/SIGINT) before those left are killed
PROBE_S = 5.0  # a join's probe of the head: TCP, then Ray's GCS (its client gives up on a non-Ray port late)
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
HOW_TO_TOKEN = ("start ComfyUI with RAY_AUTH_TOKEN set to the cluster's token (`ray get-auth-token` on the head "
                "prints it), or with RAY_AUTH_TOKEN_PATH naming a file that holds it")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where ``ray_address`` leads: ``address`` None starts the private cluster; ``source`` says where a
    join's address came from (for the messages); ``loopback``: every node on this machine's loopback."""

    address: str | None
    source: str
    loopback: bool


@dataclasses.dataclass(frozen=True)
class Auth:
    """Ray's token settings for a join: ``env`` what this process's environment gets for it (None:
    removed), ``token`` where the token comes from (None: no token)."""

    env: dict
    token: str | None

    @property
    def on(self) -> bool:
        return self.env.get("RAY_AUTH_MODE") == "token"


def is_loopback(address: str) -> bool:
    """``local`` or a head on this machine's loopback: the cluster stays on 127.0.0.1."""
    host = address.rpartition(":")[0]
    return address == "local" or host == "localhost" or host.startswith("127.")


def target(address: str, node: str) -> Target:
    """The cluster ``ray_address`` names. ``auto``: RAY_ADDRESS, else the address `ray start` wrote on this
    machine (Ray's ray_current_cluster file); a message when neither is there."""
    if address == "local":
        return Target(None, "a private cluster on 127.0.0.1", True)
    if address == "auto":
        from ray._private.utils import get_ray_address_file, read_ray_address

        if os.environ.get("RAY_ADDRESS"):
            found, source = os.environ["RAY_ADDRESS"], "from RAY_ADDRESS"
        else:
            found = read_ray_address()
            source = f"from {get_ray_address_file(None)}, written by `ray start`"
        if not found or found in ("auto", "local"):
            raise ValueError(f"{node}: input 'ray_address' is 'auto', but there is no Ray cluster to join: RAY_ADDRESS "
                             f"is unset and `ray start` has started none on this machine ({get_ray_address_file(None)} "
                             "is missing). Start one with `ray start --head`, give the head's host:port, or use "
                             "'local' for a private cluster.")
        address = found
    else:
        source = "given in input 'ray_address'"
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        raise ValueError(f"{node}: input 'ray_address' is {address!r} ({source}); use 'local' for a private cluster "
                         "on this machine, 'auto' for the one `ray start` made here, or the head's host:port (its GCS "
                         "port, 6379 unless `ray start --head --port` said otherwise; Ray Client's ray:// addresses "
                         "do not work).")
    return Target(address, source, is_loopback(address))


def _default_token_file() -> str:
    """Where Ray looks for a token when neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set."""
    return os.path.join(os.path.expanduser("~"), ".ray", "auth_token")


def join_auth(node: str) -> Auth:
    """The token settings a join uses: Ray's own (RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, then
    ~/.ray/auth_token); token authentication when RAY_AUTH_MODE=token, or when it is unset and a token is
    there (Ray's ``ray.init`` does that only for ``auto``); RAY_AUTH_MODE=disabled joins without. A message
    for settings Ray would end ComfyUI's process on (token mode without a token; a token file it cannot read)."""
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    token = None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        token = "RAY_AUTH_TOKEN"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = os.environ["RAY_AUTH_TOKEN_PATH"]
        try:
            with open(os.path.expanduser(path)) as f:
                readable = bool(f.read().strip())
        except OSError as e:
            raise ValueError(f"{node}: RAY_AUTH_TOKEN_PATH={path!r} cannot be read ({e.strerror}); point it at the "
                             f"file that holds the cluster's token, or unset it.") from None
        if not readable:
            raise ValueError(f"{node}: RAY_AUTH_TOKEN_PATH={path!r} is empty; put the cluster's token in it "
                             "(`ray get-auth-token` on the head prints it), or unset it.")
        token = f"RAY_AUTH_TOKEN_PATH={path}"
    elif os.path.isfile(_default_token_file()) and os.path.getsize(_default_token_file()):
        token = _default_token_file()
    if mode == "token" and token is None:
        raise ValueError(f"{node}: RAY_AUTH_MODE=token but this ComfyUI has no token (RAY_AUTH_TOKEN, "
                         f"RAY_AUTH_TOKEN_PATH and {_default_token_file()} are unset or missing): {HOW_TO_TOKEN}.")
    if not mode:
        mode = "token" if token else "disabled"
    elif mode != "token":
        token = None  # disabled (or a mode of Ray's this pack does not set up): sent without a token of ours
    return Auth({"RAY_AUTH_MODE": mode}, token)


def _refresh_ray_auth() -> None:
    """Make Ray in this process read its authentication settings again (its mode is cached from the
    environment when Ray is imported, its token on first use), as ray.init does when it turns token
    authentication on. Before ray.init only: a connected process keeps what it started with."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication (< 2.52)
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


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


def reachable(t: Target, node: str) -> None:
    """A message, within PROBE_S seconds, when nothing listens at a join's address (ray.init would retry it
    for minutes)."""
    import socket

    host, _, port = t.address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_S):
            pass
    except (OSError, ValueError) as e:
        raise ValueError(f"{node}: cannot join the Ray cluster at {t.address} ({t.source}): nothing answers there "
                         f"({first_line(e)}). Start the head with `ray start --head --port={port}`, check the address "
                         "and the firewall, or use 'local' for a private cluster on this machine.") from None


def _gcs_metadata(address: str, timeout: float) -> dict | None:
    """Ray's cluster metadata (its Ray and Python versions) from the GCS at ``address``, asked with this
    process's authentication settings; raises Ray's error (AuthenticationError for a missing or refused
    token), or TimeoutError when no Ray GCS answers within ``timeout`` s (the client's own wait on a port
    that is not Ray's is longer: it is left to end in a thread of its own)."""
    from ray._common.usage.usage_lib import get_cluster_metadata
    from ray._raylet import InnerGcsClient

    box = {}

    def ask():
        try:
            box["metadata"] = get_cluster_metadata(InnerGcsClient.standalone(address, None, int(timeout * 1000)))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=ask, name="ltxav-ray-probe", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"no answer from a Ray GCS within {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["metadata"]


def first_line(e: BaseException) -> str:
    """An exception as a clause inside a sentence: its type and first line, without a closing period."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text.rstrip('.')}" if text else type(e).__name__


def check_join(t: Target, auth: Auth, node: str) -> dict | None:
    """Probe the head at ``t`` within seconds; a message naming the cause when this process cannot join:
    nothing listening, no Ray there, no token or a refused one, another Ray or Python version. Returns the
    cluster's metadata (None when this Ray cannot ask)."""
    where = f"the Ray cluster at {t.address} ({t.source})"
    reachable(t, node)
    try:
        import ray.exceptions

        metadata = _gcs_metadata(t.address, PROBE_S)
    except ImportError:  # an older Ray: ray.init's own checks
        return None
    except TimeoutError:
        raise ValueError(f"{node}: cannot join {where}: something listens there, but no Ray GCS answered within "
                         f"{PROBE_S:.0f} s: give the port of the head's GCS (`ray start --head --port=...`, default "
                         "6379).") from None
    except ray.exceptions.AuthenticationError:
        if auth.token is None:
            raise ValueError(f"{node}: cannot join {where}: it requires Ray's token authentication and this ComfyUI "
                             f"has no token (RAY_AUTH_MODE={auth.env['RAY_AUTH_MODE']}; RAY_AUTH_TOKEN, "
                             f"RAY_AUTH_TOKEN_PATH and {_default_token_file()} unset or missing): {HOW_TO_TOKEN}.") \
                from None
        raise ValueError(f"{node}: cannot join {where}: it refused this ComfyUI's token (from {auth.token}), which is "
                         f"not the cluster's: {HOW_TO_TOKEN}.") from None
    except Exception as e:  # noqa: BLE001 - any other failure of the GCS call, named
        raise ValueError(f"{node}: cannot join {where}: its GCS did not answer ({first_line(e)}).") from None
    if metadata:
        from ray._private.utils import check_version_info

        try:
            check_version_info(metadata, "this ComfyUI")
        except Exception as e:  # noqa: BLE001 - Ray's own comparison; its message lists both versions
            raise ValueError(f"{node}: cannot join {where}: it runs Ray {metadata.get('ray_version')} on Python "
                             f"{metadata.get('python_version')}, this ComfyUI {_versions()}; every node and ComfyUI "
                             f"need the same Ray and Python ({first_line(e)}).") from None
    return metadata


def _versions() -> str:
    from ray._private.utils import compute_version_info

    ray_version, python_version = compute_version_info()
    return f"Ray {ray_version} on Python {python_version}"


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
                _refresh_ray_auth()
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
