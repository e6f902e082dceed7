"""The wheel installs one package, ``rome``: the repository's top-level folders (pipeline/, modules/, datamodules/,
recipes/, configs/) land inside it, nothing named ``pipeline`` or ``modules`` lands in site-packages, and the
installed copy runs on its own (its defaults found inside it, the ``rome`` command's help), away from the
checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("pipeline", "modules", "datamodules", "recipes", "configs")
SOURCES = (*FOLDERS, "rome", "train.py", "pyproject.toml", "README.md")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (no build/ or egg-info left in the checkout)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."]
    subprocess.run(build, cwd=src, check=True, capture_output=True, timeout=300)
    (found,) = out.glob("rome_lightning-*.whl")
    return found


def test_the_wheel_holds_one_package_with_every_file_of_the_folders(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"rome", f"{wheel.name.split('-py')[0]}.dist-info"}
    expected = {f"rome/{p.relative_to(ROOT).as_posix()}" for f in FOLDERS for p in (ROOT / f).rglob("*.py")}
    expected |= {f"rome/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / "configs").rglob("*.yaml")}
    expected |= {f"rome/{p.name}" for p in (ROOT / "rome").glob("*.py")}
    assert expected - set(names) == set()  # a new subfolder missing from pyproject.toml's packages fails here
    entry_points = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py')[0]}.dist-info/entry_points.txt").decode()
    assert "rome = rome.cli:cli" in entry_points


def test_the_installed_package_runs_away_from_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "rome"]
    probe = (
        "import rome, rome.pipeline.config as config, rome.cli as cli\n"
        "print(rome.__path__, config.CONFIG_DIR, config.CONFIG_DIR.is_dir(), callable(rome.edit))\n"
        "cli.main(['--help'])\n"
        "import importlib.util\n"
        "print('top-level pipeline:', importlib.util.find_spec('pipeline'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    first, *rest = done.stdout.splitlines()
    assert first == f"[{str(site / 'rome')!r}] {site / 'rome' / 'configs'} True True"  # the installed copy only
    assert "usage: python train.py stage=STAGE" in rest[0] and "top-level pipeline: None" in rest[-1]
