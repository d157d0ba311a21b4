"""Running the ``sacpo pipeline`` command on the tiny configurations, for the multi-process pipeline tests (each long
one in a file of its own, so that parallel test workers can run them side by side)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_PIPELINE = ROOT / "configs" / "pipelines" / "tiny.yaml"


def write_pipeline(tmp_path: Path, **changes) -> Path:
    """``configs/pipelines/tiny.yaml`` with top-level keys replaced, written to ``tmp_path / "pipeline.yaml"``."""
    raw = yaml.safe_load(TINY_PIPELINE.read_text())
    raw.update(changes)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_pipeline(config: Path, output: Path, timeout: float = 600, env: dict | None = None
                 ) -> subprocess.CompletedProcess:
    """``sacpo pipeline --config CONFIG --output OUTPUT`` from the project root, ``env`` added to the environment."""
    return subprocess.run(
        [sys.executable, "-m", "sacpo_lightning", "pipeline", "--config", str(config), "--output", str(output)],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})},
    )
