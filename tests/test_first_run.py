"""A newcomer's first run (README "Try it"): the set-up finds the ComfyUI the pack sits in and keeps its venv
out of custom_nodes (a dev checkout keeps .venv), says which ComfyUI and venv it would use without
changing anything, gets ComfyUI with git only when asked; and the demo command's result."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.comfy_host import COMFYUI_PATH, ROOT

MARKER = Path("comfy/ldm/lightricks/av_model.py")


def script(path, *args, env=None, cwd=None, timeout=120):
    """``bash path args`` with ``env`` on top of this environment less the pack's own variables."""
    base = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "PACK_VENV", "LTXAV_FETCH_COMFYUI")}
    return subprocess.run(["bash", str(path), *args], env={**base, **(env or {})}, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def fake_comfyui(folder: Path, ltxav=True) -> Path:
    """A ComfyUI folder as the set-up looks at it: main.py, the LTXAV model file (or not), custom_nodes."""
    comfy = folder / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    (comfy / "main.py").write_text("")
    if ltxav:
        (comfy / MARKER).parent.mkdir(parents=True)
        (comfy / MARKER).write_text("")
    return comfy


@pytest.mark.quick
def test_the_install_layout_uses_the_enclosing_comfyui_and_a_venv_outside_it(tmp_path):
    comfy = fake_comfyui(tmp_path)
    pack = comfy / "custom_nodes" / "ComfyUI-LTXAV-Parallel"
    pack.symlink_to(ROOT, target_is_directory=True)  # as a clone there would be
    cache = tmp_path / "cache"
    env = {"LTXAV_HOST_CACHE": str(cache), "LTXAV_SYSTEM_COMFYUI": str(tmp_path / "none")}
    host = script(pack / ".ci" / "host.sh", env=env)
    assert host.returncode == 0 and host.stdout.strip() == str(comfy), host
    venv = script(pack / ".ci" / "venv.sh", env=env)
    assert venv.stdout.strip() == str(cache / "venv"), venv  # not under custom_nodes
    dry = script(pack / "tools" / "setup.sh", "--dry-run", env=env)
    assert dry.returncode == 0 and dry.stdout.splitlines() == [f"ComfyUI: {comfy}",
                                                               f"Python environment: {cache / 'venv'}"], dry
    assert not cache.exists() and sorted(p.name for p in (comfy / "custom_nodes").iterdir()) == [pack.name]
    # the twin: a checkout with no custom_nodes above it keeps its venv in .venv
    dev = tmp_path / "src" / "ComfyUI-LTXAV-Parallel"
    dev.parent.mkdir()
    dev.symlink_to(ROOT, target_is_directory=True)
    assert script(dev / ".ci" / "venv.sh", env=env).stdout.strip() == str(dev / ".venv")
    # an explicit COMFYUI_PATH wins; an enclosing ComfyUI without LTX-2 audio-video is named, not passed over
    assert script(pack / ".ci" / "host.sh", env={**env, "COMFYUI_PATH": str(COMFYUI_PATH)}).stdout.strip() == \
        str(COMFYUI_PATH)
    (comfy / MARKER).unlink()
    old = script(pack / ".ci" / "host.sh", env=env)
    assert old.returncode == 1 and f"the ComfyUI this pack sits in ({comfy}) has no LTX-2 audio-video" in old.stderr


@pytest.mark.quick
def test_comfyui_is_fetched_with_git_only_when_asked(tmp_path):
    """A checkout with no ComfyUI around it and no ../shared: the set-up says how to get one; with
    LTXAV_FETCH_COMFYUI=1 it clones it (here a stand-in repository, through git's own file transport) into
    the cache, once."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    origin = fake_comfyui(tmp_path / "upstream")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(origin)]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "ComfyUI"], ["tag", "v0.20.1"]):
        subprocess.run([*git, *cmd], check=True, capture_output=True)
    lone = tmp_path / "checkout"  # .ci/ alone: no ../shared beside it, no custom_nodes above
    shutil.copytree(ROOT / ".ci", lone / ".ci")
    cache = tmp_path / "cache"
    env = {"LTXAV_HOST_CACHE": str(cache), "LTXAV_SYSTEM_COMFYUI": str(tmp_path / "none"),
           "LTXAV_COMFYUI_GIT": origin.as_uri()}
    none = script(lone / ".ci" / "host.sh", env=env)
    assert none.returncode == 1 and "set LTXAV_FETCH_COMFYUI=1 to clone it with git" in none.stderr, none
    assert not cache.exists()
    env["LTXAV_FETCH_COMFYUI"] = "1"
    fetched = script(lone / ".ci" / "host.sh", env=env)
    want = cache / "ComfyUI-git-v0.20.1" / "ComfyUI"
    assert fetched.returncode == 0 and fetched.stdout.strip() == str(want), fetched
    assert (want / MARKER).is_file() and "cloned ComfyUI v0.20.1" in fetched.stderr
    again = script(lone / ".ci" / "host.sh", env=env)
    assert again.stdout.strip() == str(want) and "cloned" not in again.stderr  # once


def test_the_demo_command_equals_stock(comfy):
    """README step 2, as a newcomer runs it (tools/demo.sh, with the environment tests/run.sh set up):
    tiny LTX-2 and LTX-2.3 models, stock and the parallel sampler on 2 CPU workers, each result the same."""
    env = {"COMFYUI_PATH": str(COMFYUI_PATH), "PACK_VENV": str(Path(sys.executable).parent.parent)}
    run = script(ROOT / "tools" / "demo.sh", "--steps", "2", "--cpu", env=env, cwd=ROOT, timeout=600)
    out = run.stdout
    assert run.returncode == 0, f"{out}\n{run.stderr[-4000:]}"
    for name, split in (("LTX-2", "2 workers, Ulysses 2 x ring 1"), ("LTX-2.3", "2 workers, cfg 2 x Ulysses 1")):
        assert f"{name}: 25 frames 128x96 with audio, 2 steps" in out
        assert f"plan and run: {split}" in out
    assert out.count("SAME as stock") == 4 and "DIFFERENT" not in out, out
    assert out.rstrip().endswith("every result equals stock ComfyUI's (within its own rounding)")
