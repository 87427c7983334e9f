"""The parallel-kind contract (``parallel_kinds``): the kinds a worker hosts (sequence parallel, CFG-parallel)
are parts with a degree, a ComfyUI wrapper and key, a reset, a report and a planner term, and a kind added by
its own module and one line in ``KINDS`` reaches the worker's parts, the patcher's wrappers, the keys the
driver never sends and the planner. The added kind here is a test one, registered as a kind module would be."""
import importlib

import pytest

from helpers.comfy_host import import_pack

import_pack()
kinds = importlib.import_module("ltxav_pack.parallel_kinds")
groups = importlib.import_module("ltxav_pack.sequence_parallel.groups")
passes_mod = importlib.import_module("ltxav_pack.guidance_passes")
workers = importlib.import_module("ltxav_pack.driver.workers")

pytestmark = pytest.mark.quick


class CountingPart:
    """A test kind: counts the forwards it wraps; its degree rides on Ulysses' (it splits nothing)."""

    KIND = "counting"
    WRAPPER = "DIFFUSION_MODEL"
    WRAPPER_KEY = "ltxav_test_counting"

    @classmethod
    def for_rank(cls, rank):
        return cls(rank)

    @staticmethod
    def degree(degrees):
        return 1

    @staticmethod
    def plan_terms(degrees, passes):
        return {"nccl_peers": 3}  # a term the planner takes

    def __init__(self, rank):
        self.rank, self.calls = rank, 0

    def wrapper(self, executor, *args, **kwargs):
        self.calls += 1
        return executor(*args, **kwargs)

    def reset(self):
        self.calls = 0

    def report(self):
        return {"counting_calls": self.calls}


def test_the_kinds_keep_the_contract(comfy):
    import comfy.patcher_extension

    names = [k.KIND for k in kinds.KINDS]
    assert names == ["sequence", "cfg"]
    assert len(set(kinds.own_keys())) == len(kinds.KINDS)
    for kind in kinds.KINDS:
        assert hasattr(comfy.patcher_extension.WrappersMP, kind.WRAPPER), kind
        for attr in ("for_rank", "degree", "plan_terms", "wrapper", "reset", "report"):
            assert callable(getattr(kind, attr)), (kind, attr)
        assert kind.WRAPPER_KEY in workers.own_keys()
    d = groups.Degrees(ulysses=2, ring=2, cfg=3)
    assert kinds.degrees_of(d) == {"sequence": 4, "cfg": 3}
    p = passes_mod.Passes.of(3)
    assert kinds.plan_terms(d, p) == {"world": 4, "ring": 2, "share": 1}


def test_an_added_kind_reaches_parts_wrappers_keys_and_plan(monkeypatch, comfy):
    import comfy.patcher_extension
    import torch

    monkeypatch.setattr(kinds, "KINDS", (*kinds.KINDS, CountingPart))  # the kind module's one registry line
    # the worker's parts: made for every kind (the test builds only the added one: the others need groups)
    parts = kinds.make_parts(1, kinds=(CountingPart,))
    assert isinstance(parts["counting"], CountingPart) and parts["counting"].rank == 1
    # its wrapper on the job's patcher (as held_model.job adds it), run around a forward as ComfyUI runs wrappers
    patcher = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))
    for (kind, key), fn in kinds.wrappers(parts).items():
        patcher.add_wrapper_with_key(kind, key, fn)
    found = patcher.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL)
    assert parts["counting"].wrapper in found
    executor = comfy.patcher_extension.WrapperExecutor.new_executor(lambda x: x + 1, found)
    assert executor.execute(1) == 2 and kinds.report(parts) == {"counting_calls": 1}
    kinds.reset(parts)
    assert kinds.report(parts) == {"counting_calls": 0}
    # never sent with the MODEL's options
    assert CountingPart.WRAPPER_KEY in workers.own_keys()
    # the planner takes its term
    d = groups.Degrees(ulysses=2)
    terms = kinds.plan_terms(d, passes_mod.Passes.of(1))
    assert terms["nccl_peers"] == 3 and terms["world"] == 2


def test_a_kind_not_in_the_registry_reaches_nothing(comfy):
    """The twin: without its line in ``KINDS`` the kind is no key the driver keeps back and no planner term."""
    assert CountingPart.WRAPPER_KEY not in workers.own_keys()
    assert "nccl_peers" not in kinds.plan_terms(groups.Degrees(ulysses=2), passes_mod.Passes.of(1))
