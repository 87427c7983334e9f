"""The pack's Ray worker group (kept alive across prompts): the Ray connection, starting and stopping the
workers, their process groups, and waiting on their calls while watching them (heartbeats, stalls,
Interrupt), their results or, from a method that yields (a Ray streaming generator), its items as they
come. A worker that dies, fails or stops answering ends the wait with an error within seconds; the
whole group is then killed (its peers would wait in collectives forever) and the next prompt starts a
new one."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from .. import (
    comfy_host,
    envs,
    ffn_chunking,
    log_relay,
    parallel_kinds,
    ray_cluster,
    ray_join,
    ray_worker,
)
from ..errors import clause
from ..sequence_parallel.groups import Degrees
from .plan import NODE
from .report import StepProgress, node_label

log = logging.getLogger(__name__)
POLL_S = 0.25
# Ray CPU slots of a local cluster: each worker takes one, and CPU workers (ComfyUI on --cpu) may outnumber
# the cores (slow, but they run)
LOCAL_CPU_SLOTS = 8


def own_keys() -> tuple[str, ...]:
    """The pack's own wrappers: not sent with the MODEL's options (each worker adds its own)."""
    return (ffn_chunking.WRAPPER_KEY, *parallel_kinds.own_keys())


class WorkerFault(RuntimeError):
    """A worker died, failed or stopped answering; the group has been stopped."""


class _TaskFailed(Exception):
    def __init__(self, rank, error):
        super().__init__(rank, error)
        self.rank, self.error = rank, error


@dataclasses.dataclass
class _Group:
    actors: list
    world: int
    degrees: Degrees | None  # None: started, process groups not set yet (``Workers.set_degrees``)
    address: str
    cpu: bool
    infos: list
    per_gpu: int = 1  # workers sharing each GPU (envs.WORKERS_PER_GPU)
    file_key: str | None = None
    model_key: str | None = None
    started: float = 0.0  # when its workers were started (perf_counter)


def _executing_node_id() -> str | None:
    from comfy_execution.utils import get_executing_context

    ctx = get_executing_context()
    return ctx.node_id if ctx is not None else None


def cpu_mode() -> bool:
    import comfy.model_management as mm

    return mm.cpu_state == mm.CPUState.CPU or not torch.cuda.is_available()


def free_gpu_for_workers(keep=None) -> None:
    """ComfyUI's models off its GPU before the workers run on it (GPU 0 is also a worker's), but the
    ModelPatcher ``keep``, which stays loaded: the audio VAE a save has just used, as LTXVAudioVAEDecode leaves
    it (unloading it would copy its weights, memory-mapped from the file, into host memory, and the next save
    would load it again). Without ``keep``: ComfyUI's ``unload_all_models``."""
    import comfy.model_management as mm

    mm.free_memory(1e30, mm.get_torch_device(), keep_loaded=[m for m in mm.current_loaded_models if m.model is keep])
    mm.soft_empty_cache()


def _host_args() -> dict:
    import comfy.cli_args

    return {k: v for k, v in vars(comfy.cli_args.args).items() if isinstance(v, (bool, int, float, str, type(None)))}


def _passthrough_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith(envs.PASSTHROUGH)}


def _cause(err: BaseException) -> BaseException:
    return getattr(err, "cause", None) or err


class Workers:
    """The pack's one Ray worker group (per ComfyUI process) and its Ray connection."""

    def __init__(self):
        self.group: _Group | None = None
        self.cluster = ray_cluster.Cluster(NODE, self.status)
        self._remote_cls = None

    def status(self, text: str) -> None:
        """Tell the user what the node is doing: on the node (ComfyUI's progress text) and in the log."""
        log.info("%s: %s", NODE, text)
        server = sys.modules.get("server")  # ComfyUI's server module, when a server runs this process
        instance = getattr(getattr(server, "PromptServer", None), "instance", None)
        node_id = _executing_node_id()
        if instance is not None and node_id is not None:
            try:
                instance.send_progress_text(text, node_id)
            except Exception:  # noqa: BLE001 - a message never stops a run (e.g. the server's loop has ended)
                log.debug("%s: progress text not sent", NODE, exc_info=True)

    # -- Ray --------------------------------------------------------------------
    @property
    def address(self) -> str | None:
        """The ``ray_address`` this process connected with (None before the first run)."""
        return self.cluster.address

    def connect(self, address: str) -> None:
        """This process in the Ray cluster ``address`` names (``ray_cluster``): once; another address later
        needs a restart (Ray cannot move a process to another cluster)."""
        address = (address or "local").strip()
        ray = sys.modules.get("ray")  # not imported before it is needed: a bad address never imports it
        connected = ray is not None and ray.is_initialized()
        if connected and self.address == address:
            return
        if address not in ("local", "auto"):  # a malformed or dead address says so first, without importing Ray
            ray_join.reachable(ray_join.target(address, NODE), NODE)
        if connected:
            raise ValueError(f"{NODE}: input 'ray_address' changed from {self.address!r} to {address!r}, but this "
                             "ComfyUI process is already part of a Ray cluster and Ray cannot move it to another "
                             "one: restart ComfyUI to use the new address, or set it back.")
        num_gpus = 0 if cpu_mode() else torch.cuda.device_count()
        self.cluster.connect(address, num_gpus, max(os.cpu_count() or 1, LOCAL_CPU_SLOTS, num_gpus))

    def shutdown(self, why: str) -> None:
        """Stop the workers and Ray in this process; a private cluster's processes and folder too."""
        self.cluster.shutdown(why, self.stop_group)

    def _worker_class(self):
        if self._remote_cls is None:
            import ray
            from ray import cloudpickle

            cloudpickle.register_pickle_by_value(sys.modules[ray_worker.__name__])
            self._remote_cls = ray.remote(ray_worker.LTXAVWorker)
        return self._remote_cls

    def available(self, cpu: bool) -> int:
        """Workers the cluster offers: its CPU slots on CPU, else its GPUs times the workers a GPU holds."""
        import ray

        resources = ray.cluster_resources()
        return int(resources.get("CPU" if cpu else "GPU", 0)) * (1 if cpu else envs.workers_per_gpu())

    # -- the worker group ---------------------------------------------------------
    def ensure_group(self, world: int, cpu: bool) -> tuple[_Group, float]:
        """The group of ``world`` workers: the one running when it answers, else new ones (their process
        groups set later by ``set_degrees``); and the seconds it took."""
        import comfy.model_management

        g = self.group
        per_gpu = 1 if cpu else envs.workers_per_gpu()
        if g and (g.world, g.address, g.cpu, g.per_gpu) == (world, self.address, cpu, per_gpu):
            try:
                _heartbeat_of(g, "start")
                return g, 0.0
            except (WorkerFault, _TaskFailed):  # a dead or frozen worker: start over
                log.warning("%s: a worker of the previous group is gone; starting new workers", NODE)
        self.stop_group()
        self.status(f"starting {world} workers")
        t0 = time.perf_counter()
        comfy_path = os.path.dirname(os.path.dirname(os.path.abspath(comfy.model_management.__file__)))
        pack_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        pack_name = __package__.rpartition(".")[0]
        resources = {"num_cpus": 1, "num_gpus": 0 if cpu else 1 / per_gpu}  # a fraction: workers share a GPU
        cls = self._worker_class()
        # actors see all GPUs of their node and pick Ray's one (ray_worker._select_gpu): NCCL needs that
        # to use NVLink / peer-to-peer between workers
        # the allocator the ComfyUI process runs (main.py picks cudaMallocAsync unless --disable-cuda-malloc):
        # comfy-aimdo pages weights out when that allocator runs short, so DynamicVRAM needs the same one
        # in the workers; without a setting, expandable segments: long videos allocate large, varying
        # blocks, and the caching allocator would fragment below what the planner (and the cap) allow
        # the pack's own variables are set explicitly ("" = unset): Ray's processes may have inherited
        # values from when Ray started
        alloc = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "expandable_segments:True"
        env = {"env_vars": {"PYTORCH_CUDA_ALLOC_CONF": alloc,
                            **{k: "" for k in envs.WORKER_VARS}, **_passthrough_env(),
                            "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
        if self.cluster.loopback:
            # a cluster on loopback: gloo's and NCCL's own sockets there too (by default they take the
            # address the host name resolves to, or the first network interface)
            lo = ray_cluster.loopback_interface()
            env["env_vars"].update(GLOO_SOCKET_IFNAME=lo, NCCL_SOCKET_IFNAME=lo)
        actors = [cls.options(max_concurrency=2, runtime_env=env, **resources).remote(
            rank, world, comfy_path, pack_dir, pack_name, _host_args(), comfy_host.dynamic_vram_enabled())
            for rank in range(world)]
        group = _Group(actors, world, None, self.address, cpu, infos=[], per_gpu=per_gpu, started=t0)
        self.group = group
        group.infos = self._wait([a.info.remote() for a in actors], "start", envs.START_S.number(), heartbeat=False)
        return group, time.perf_counter() - t0

    def set_degrees(self, group: _Group, degrees: Degrees) -> float:
        """The workers' process groups for ``degrees`` (the plan's), once a run: new workers join them;
        workers that hold other ones regroup (their model stays loaded). The seconds it took."""
        if group.degrees == degrees:
            return 0.0
        t0 = time.perf_counter()
        timeout = envs.START_S.number()
        if group.degrees is None:
            host, port = self._wait([group.actors[0].rendezvous.remote()], "start", timeout, heartbeat=False)[0]
            self._wait([a.init_groups.remote(host, port, degrees) for a in group.actors], "start", timeout,
                       heartbeat=False)
            group.degrees = degrees  # the infos ensure_group read still hold: joining groups changes none
            log.info("%s: started %d workers (%s) in %.1f s: %s", NODE, group.world, degrees.describe(),
                     time.perf_counter() - group.started,
                     ", ".join(f"{i['rank']}: {i['device']} pid {i['pid']} on {node_label(i)}" for i in group.infos))
            return time.perf_counter() - t0
        self._wait([a.regroup.remote(degrees) for a in group.actors], "start", timeout)
        seconds = time.perf_counter() - t0
        log.info("%s: regrouped %d workers from %s to %s in %.2f s (the model stays loaded)", NODE, group.world,
                 group.degrees.describe(), degrees.describe(), seconds)
        group.degrees = degrees
        return seconds

    def stop_group(self) -> None:
        """Kill the workers (frees their GPU memory); the next run starts new ones."""
        g, self.group = self.group, None
        if not g:
            return
        import ray

        for a in g.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def _wait(self, refs, what, stall_s, heartbeat=True, progress: StepProgress | None = None, node=NODE,
              on_item: Callable[[int, Any], Any] | None = None):
        """Results of ``refs`` (one per worker, in rank order), watching the workers meanwhile; errors
        name ``node``. A ref may be a streaming generator (a worker method that yields): its items are taken
        as they arrive (at most one a worker each round; each freed from Ray's object store once taken) and
        its result is its last item. ``on_item(rank, item)``, given every result and item as it arrives,
        returns what to keep as the rank's result (one that stores a stream's items elsewhere keeps none)."""
        import comfy.model_management
        import ray

        group = self.group
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results = [None] * len(refs)
        step, moved, interrupted = 0, time.monotonic(), False
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_S)
                for ref in done:
                    rank = pending.pop(ref)
                    if _arrived(ref, rank, results, on_item):
                        pending[ref] = rank  # a stream with more to come
                if not pending:
                    break
                if heartbeat:
                    steps = _heartbeat_of(group, what)
                    if steps[0] != step:
                        step, moved = steps[0], time.monotonic()
                        if progress is not None:
                            progress.to(step)
                if time.monotonic() - moved > stall_s:
                    raise WorkerFault(f"no progress for {stall_s:.0f} s during {what} (at step {step})")
                if not interrupted and comfy.model_management.processing_interrupted():
                    interrupted = True
                    for a in group.actors:
                        a.interrupt.remote()
        except Exception as e:
            if self.cluster.stopping:  # the workers are gone because ComfyUI is stopping, not by a fault
                raise RuntimeError(f"{node}: stopped during {what}: {self.cluster.stopping}, ComfyUI is shutting "
                                   "down.") from None
            if isinstance(e, _TaskFailed):
                rank, error = _root_cause(group, e.rank, e.error)
                self.stop_group()
                raise RuntimeError(f"{node}: {_describe(error, rank, what, group)}. The workers were stopped; the "
                                   "next prompt starts new ones.") from None
            self.stop_group()
            if isinstance(e, WorkerFault):
                raise RuntimeError(f"{node}: {e}. The workers were stopped; the next prompt starts new "
                                   "ones.") from None
            raise
        except BaseException:
            self.stop_group()  # never leave workers running a job nobody waits for
            raise
        _relay_logs(group)
        return results


def _arrived(ref, rank, results, on_item) -> bool:
    """What a ready ``ref`` holds (a task's result, or a streaming generator's next item) into
    ``results[rank]``, through ``on_item``; True when ``ref`` is a stream that may yield more."""
    import ray

    stream = isinstance(ref, ray.ObjectRefGenerator)
    try:
        item = ray.get(next(ref) if stream else ref)
    except StopIteration:  # the stream's end
        return False
    except ray.exceptions.RayError as e:
        raise _TaskFailed(rank, e) from None
    results[rank] = item if on_item is None else on_item(rank, item)
    return stream


def _heartbeat_of(group, what):
    """Every worker's step, answered by its second thread (its log lines since the last poll go to this
    process's log); raises for a dead or silent worker."""
    import ray

    refs = [a.poll.remote() for a in group.actors]
    heartbeat_s = envs.HEARTBEAT_S.number()
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=heartbeat_s)
    steps = []
    for rank, ref in enumerate(refs):
        if ref not in ready:
            raise WorkerFault(f"worker {rank} stopped answering for {heartbeat_s:.0f} s during {what} "
                              "(hung, frozen or overloaded)")
        try:
            step, lines = ray.get(ref)
        except ray.exceptions.RayError as e:
            raise _TaskFailed(rank, e) from None
        log_relay.replay(rank, lines)
        steps.append(step)
    return steps


def _relay_logs(group) -> None:
    """The workers' log lines not yet taken (a wait's last ones), as far as they answer within 2 s."""
    import ray

    refs = [a.poll.remote() for a in group.actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=2.0)
    for rank, ref in enumerate(refs):
        if ref in ready:
            with contextlib.suppress(ray.exceptions.RayError):
                log_relay.replay(rank, ray.get(ref)[1])


def _root_cause(group, rank, error):
    """When one worker dies its peers fail too (their collectives lose a member): name the dead one."""
    import ray

    if isinstance(error, ray.exceptions.RayActorError):
        return rank, error
    refs = [a.progress.remote() for a in group.actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=2.0)
    for r, ref in enumerate(refs):
        if ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as e:
                return r, e
    return rank, error


def _describe(err, rank, what, group) -> str:
    import ray

    cause = _cause(err)
    device = group.infos[rank]["device"] if group and len(group.infos) > rank else "its device"
    who = f"worker {rank} ({device})"
    if isinstance(err, ray.exceptions.RayActorError):
        log.warning("%s: %s died: %s", NODE, who, str(err)[:2000])
        return f"{who} died during {what} (its process was killed, crashed, or ran out of host memory)"
    if isinstance(cause, torch.OutOfMemoryError) or "OutOfMemoryError" in type(cause).__name__:
        return (f"{who} ran out of GPU memory during {what}: {clause(cause, 300).partition(': ')[2]}. Use more "
                "GPUs, the LTX FFN Chunker, or a shorter or smaller video")
    return f"{who} failed during {what}: {clause(cause)}"

