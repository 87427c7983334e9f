"""Joining a Ray cluster the user runs (``ray_address`` ``auto`` or ``host:port``), and, when a join fails,
what failed: the address (``auto``: RAY_ADDRESS, else the cluster ``ray start`` last started on this machine;
never one found by scanning processes, which may be another process's private cluster); Ray's own token
settings (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token: token authentication is on when one is
there, unless RAY_AUTH_MODE says otherwise); then a probe of the head that answers within seconds and names
what fails: nothing listening, no Ray head there, no token, a token the cluster refuses, another Ray or
Python version. ``ray_cluster`` connects (``ray.init``) only after that probe.
"""
from __future__ import annotations

import dataclasses
import os
import threading

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


def refresh_ray_auth() -> None:
    """Make Ray in this process read its authentication settings again (its mode is cached from the
    environment when Ray is imported, its token on first use), as ray.init does when it turns token
    authentication on. Before ray.init only: a connected process keeps what it started with."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication (< 2.52)
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


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
