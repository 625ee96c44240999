"""The repository as shipped: what a wheel installs, and what its files refer to."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.name for p in (ROOT / "deepspeed_configs").glob("*.json"))


@pytest.mark.slow
def test_wheel_ships_the_deepspeed_configs_and_dsconfig_finds_them(tmp_path):
    """A non-editable install has no repository around it: the configs must be in the wheel,
    and dsconfig must find them inside the installed package."""
    src = tmp_path / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("ptv2", "launcher", "deepspeed_configs"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(src),
            "-w",
            str(tmp_path),
        ],
        check=True,
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("ptv2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        shipped = sorted(n.removeprefix("ptv2/deepspeed_configs/") for n in zf.namelist() if "deepspeed_configs/" in n)
        assert shipped == CONFIGS
        assert json.loads(zf.read("ptv2/deepspeed_configs/zero3.json")) == json.loads(
            (ROOT / "deepspeed_configs" / "zero3.json").read_text()
        )
        site = tmp_path / "site"
        zf.extractall(site)
    assert not (site / "ptv2" / "deepspeed_configs").is_symlink()
    probe = (
        "import json, ptv2, ptv2.dsconfig as d; "
        "names = sorted(p.name for p in d.CONFIG_DIR.glob('*.json')); "
        "print(json.dumps([ptv2.__file__, str(d.config_path('zero3.json')), names]))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}  # the checkout is not on the path
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=True
    )
    module, zero3, found = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(module).is_relative_to(site), module
    assert Path(zero3) == site / "ptv2" / "deepspeed_configs" / "zero3.json"
    assert found == CONFIGS


def test_the_checkout_finds_the_configs_through_the_package_link():
    from ptv2 import dsconfig

    assert dsconfig.config_path("zero3.json").resolve() == (ROOT / "deepspeed_configs" / "zero3.json").resolve()


def test_no_file_cites_notes_that_are_not_in_the_repository():
    """Code and documents cite public sources (papers, upstream repositories), not private notes."""
    notes = ["STACK" + ".md", "REFERENCE" + ".md", "MODELS_AND" + "_DATA", "shared/" + "notes"]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in tracked:
        path = ROOT / name
        if path.suffix in (".py", ".md", ".yaml", ".toml", ".sh", ".json", ".txt") and path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            hits += [f"{name}: {n}" for n in notes if re.search(re.escape(n), text)]
    assert hits == []
