"""Run sequence-parallel cases on W CPU processes (gloo), one process per rank."""
import os
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _rank_main(rank, world, ulysses, ring, ckpts, init_file, out_dir, jobs, env, sp_attrs):
    os.environ.update(env)
    torch.set_num_threads(1)
    from .comfy_host import import_host, import_pack

    import_host()
    pack = import_pack()
    import logging

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger(pack.__name__).addHandler(handler)
    logging.getLogger(pack.__name__).setLevel(logging.INFO)
    import comfy.patcher_extension
    import comfy.sd

    from .sp_cases import recording_shapes, run_case

    sp_mod = __import__(f"{pack.__name__}.xdit_context_parallel", fromlist=["x"])
    for name, value in sp_attrs.items():
        if callable(value):
            value(sp_mod, rank)
        else:
            setattr(sp_mod, name, value)
    groups = __import__(f"{pack.__name__}.sequence_parallel.groups", fromlist=["x"])
    groups.init_process_groups(rank, world, groups.Degrees(ulysses, ring), "gloo", f"file://{init_file}")
    try:
        sp = sp_mod.SequenceParallel()
        dmw = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
        to = {"wrappers": {dmw: {sp_mod.WRAPPER_KEY: [sp.wrapper]}}}
        patchers = {}
        for version, path in ckpts.items():
            patchers[version] = comfy.sd.load_diffusion_model(path)
            patchers[version].add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                   sp_mod.WRAPPER_KEY, sp.wrapper)
        results = {}
        for job in jobs:
            version, case, shape = job
            patcher = patchers[version]
            with recording_shapes(patcher.model.diffusion_model) as seen:
                outs = run_case(patcher, case, shape, to)
            results[job] = {"outs": outs, "seen": seen}
        results["log"] = lines
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        groups.destroy_process_groups()


def run_parallel(world, ulysses, ring, ckpts, jobs, env=None, sp_attrs=None):
    """Run ``jobs`` [(version, case, shape)] on ``world`` processes with the checkpoints ``ckpts``
    {version: path}; returns each rank's {job: result}. ``sp_attrs``: module settings of
    ``xdit_context_parallel`` for the ranks (e.g. HEAD_GROUPS), or callables of (module, rank) that
    change it (the tests that show a broken forward is caught)."""
    ckpts = {v: str(p) for v, p in ckpts.items()}
    with tempfile.TemporaryDirectory() as tmp:
        init_file = Path(tmp) / "init"
        mp.start_processes(_rank_main, args=(world, ulysses, ring, ckpts, str(init_file), tmp, jobs, env or {},
                                             sp_attrs or {}), nprocs=world, join=True, start_method="spawn")
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]
