"""Shared fixtures: a tiny random Llama with a byte-level tokenizer, built once per session, no network."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


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
