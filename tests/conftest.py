"""Shared fixtures: a tiny random Llama with a byte-level tokenizer and one run of the tiny evaluation pipeline, each
built once per session, no network."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from pipeline_run import run_pipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# pytest-xdist runs the suite in a few worker processes (``-n auto --dist loadfile`` in pyproject.toml; a file's tests
# run in one worker, so its module-scoped fixtures are built once): they share the cores, so each
# worker, and the ``sacpo`` subprocesses it starts, gets its part of them instead of one torch thread pool per core
# in every process.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
MAX_WORKERS = 4  # each worker holds torch and a model or two in memory; the longest tests set the wall time anyway
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, CORES // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def pytest_xdist_auto_num_workers(config) -> int:
    return max(1, min(MAX_WORKERS, CORES))


def pytest_configure(config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _file(item) -> str:
    return item.nodeid.split("::")[0]


def pytest_collection_modifyitems(config, items) -> None:
    """The files with the longest tests first (real-model, then multi-process ones), each file's tests kept together
    and in order: parallel workers take whole files in this order, so the short files fill the end of the run instead
    of one long file running alone on one worker's share of the cores."""
    def rank(item) -> int:
        return 0 if item.get_closest_marker("integration") else 1 if item.get_closest_marker("slow") else 2

    first: dict[str, int] = {}
    for item in items:
        first[_file(item)] = min(first.get(_file(item), 2), rank(item))
    order = {path: i for i, path in enumerate(first)}
    items.sort(key=lambda item: (first[_file(item)], order[_file(item)]))


@pytest.fixture(scope="session", autouse=True)
def _sacpo_cache(tmp_path_factory):
    """Keeps named-model caches of the test session out of the user's cache, except SmolLM2 (slow to convert)."""
    if "SACPO_CACHE" not in os.environ:
        os.environ["SACPO_CACHE"] = str(tmp_path_factory.mktemp("sacpo_cache"))
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A Hugging Face folder with the tiny random Llama (2 layers, hidden 64, vocab 512) and its tokenizer."""
    from sacpo_lightning.models.tiny import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from sacpo_lightning.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def shared_data() -> str:
    """The shared real-data folder (``../shared/data`` next to the project)."""
    if not os.path.isdir(SHARED_DATA):
        pytest.fail(f"Shared data folder {SHARED_DATA} is missing; it is provided beside the project checkout.")
    return SHARED_DATA


@pytest.fixture
def pku_fixtures(shared_data) -> str:
    """The PKU-SafeRLHF safety-pair fixtures (a small JSON-lines file of the shared data)."""
    return os.path.join(shared_data, "pku_saferlhf", "safety_pairs.fixtures.jsonl")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices run fastest on one thread; several threads on a busy machine are many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class TinyEvalPipeline:
    """One run of ``configs/pipelines/tiny_eval.yaml`` through ``sacpo pipeline`` (see :func:`tiny_eval_pipeline`)."""

    output: Path
    logger: str  # the logger of the first run: tensorboard where it is installed, else csv
    first: subprocess.CompletedProcess
    rerun: subprocess.CompletedProcess | None  # the same command with the default csv logger; None if the first failed

    def check_first(self) -> None:
        assert self.first.returncode == 0, self.first.stdout[-3000:] + self.first.stderr[-3000:]


@pytest.fixture(scope="session")
def tiny_eval_pipeline(tmp_path_factory, _sacpo_cache) -> TinyEvalPipeline:
    """The tiny evaluation pipeline with ``logger: tensorboard`` and ``export_plain: true``, run once for the tests
    of its evaluation report, its loggers, its model cards and its plain folders; then rerun with the csv logger
    (which must rerun no stage). The tests only read its output folder."""
    root = Path(__file__).resolve().parents[1]
    folder = tmp_path_factory.mktemp("tiny_eval_pipeline")
    logger = "tensorboard" if importlib.util.find_spec("tensorboard") is not None else "csv"
    raw = yaml.safe_load((root / "configs" / "pipelines" / "tiny_eval.yaml").read_text())
    output = folder / "out"

    def run(**changes) -> subprocess.CompletedProcess:
        config = folder / "pipeline.yaml"
        config.write_text(yaml.safe_dump({**raw, "export_plain": True, **changes}))
        return run_pipeline(config, output, timeout=900)

    first = run(logger=logger)
    return TinyEvalPipeline(output, logger, first, run() if first.returncode == 0 else None)
