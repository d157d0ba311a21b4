"""The top-level ``callbacks/`` folder is ``sacpo_lightning.callbacks`` from an install and from a checkout."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALLBACK_FILES = sorted(p.name for p in (ROOT / "callbacks").glob("*.py"))


def test_installed_package_maps_the_callbacks_folder():
    spec = importlib.util.find_spec("sacpo_lightning.callbacks")
    assert spec is not None and Path(spec.origin).resolve() == (ROOT / "callbacks" / "__init__.py").resolve()
    from sacpo_lightning.callbacks import ExportHF, MergeOnFitEnd, NaNGuard, ReferenceCache  # noqa: F401


def test_checkout_without_install_finds_the_same_files():
    # -S: no site-packages, hence no installed (or editable) mapping; only the checkout on sys.path
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import importlib.util, sacpo_lightning; "
            "print(importlib.util.find_spec('sacpo_lightning.callbacks').origin)")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT)], capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).resolve() == (ROOT / "callbacks" / "__init__.py").resolve()


def test_wheel_ships_the_callbacks_as_a_subpackage(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, text=True)
    (wheel,) = tmp_path.glob("sacpo_lightning-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"sacpo_lightning/callbacks/{name}" for name in CALLBACK_FILES} <= names
    assert not any(n.startswith("callbacks/") for n in names)
