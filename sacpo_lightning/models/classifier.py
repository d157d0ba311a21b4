"""Strict loading of sequence-classification (reward and cost) models, and the files their exports hold.

:func:`load_sequence_classifier` loads any Hugging Face sequence-classification checkpoint (from the Hub, a folder or a
named local model) strictly: a checkpoint whose weights do not fit the model raises :class:`ScoreModelLoadError` rather
than scoring with a random head. Known layouts (Safe-RLHF's ``score_head``) are mapped. Training these models is
:mod:`sacpo_lightning.modules.score`; scoring pairs with them is :mod:`sacpo_lightning.evaluation.score_models`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from sacpo_lightning.console import quiet_load_report
from sacpo_lightning.errors import UserError
from sacpo_lightning.models.chain import OWN_ADAPTER
from sacpo_lightning.models.registry import model_files, resolve_model_path
from sacpo_lightning.precision import DTYPES

__all__ = [
    "ADAPTER_DIR",
    "SCORE_MODEL_FILE",
    "ScoreModelLoadError",
    "load_sequence_classifier",
]

SCORE_MODEL_FILE = "score_model.json"
"""Settings file beside an exported score model (kind, template, lengths), read by the scorer."""
ADAPTER_DIR = OWN_ADAPTER
"""Sub-folder of a score-model export that holds its LoRA adapter while it is merged."""


class ScoreModelLoadError(UserError):
    """A checkpoint whose weights do not fit the sequence-classification model built from its config."""


# Safe-RLHF score models (``LlamaForScore``: PKU-Alignment's beaver reward and cost models) keep their head in
# ``score_head.*`` and its size in ``config.score_dim``; the Hugging Face classes call the head ``score``.
_SAFE_RLHF_HEAD = "score_head."
_HF_HEAD = "score."
# Running score statistics of Safe-RLHF's normalizer. They only rescale scores during its training
# (``normalize_score_during_training``, saved as ``do_normalize``), so they are not part of the scoring function.
_SAFE_RLHF_STATS = ("normalizer.mean", "normalizer.var", "normalizer.count")
_MAX_NAMES = 12


def _names(keys: set[str]) -> str:
    shown = sorted(keys)
    more = f" and {len(shown) - _MAX_NAMES} more" if len(shown) > _MAX_NAMES else ""
    return ", ".join(shown[:_MAX_NAMES]) + more


def _checkpoint_tensors(path: str, keys: set[str], revision: str | None) -> dict[str, Tensor]:
    """Reads ``keys`` from the checkpoint files of a folder or Hub id (safetensors or ``.bin``, sharded or not)."""
    from transformers.utils import cached_file

    def fetch(filename: str) -> str | None:
        return cached_file(path, filename, revision=revision, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)

    found: dict[str, Tensor] = {}
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = fetch(index_name)
        if index is not None:
            weight_map = json.loads(Path(index).read_text())["weight_map"]
            files = sorted({weight_map[k] for k in keys if k in weight_map})
        else:
            files = [single] if fetch(single) is not None else []
        for filename in files:
            local = fetch(filename)
            if local is None:
                continue
            if filename.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(local, framework="pt") as f:
                    found.update({k: f.get_tensor(k) for k in keys & set(f.keys())})
            else:
                state = torch.load(local, map_location="cpu", weights_only=True)
                found.update({k: state[k] for k in keys & set(state)})
        if found:
            break
    return found


def _map_safe_rlhf_head(model, path: str, missing: set[str], unexpected: set[str], revision: str | None) -> None:
    """Loads a Safe-RLHF ``score_head.*`` (or a ``score.bias`` the class has no slot for) into ``model.score``.

    Removes what it loads from ``missing`` and ``unexpected``. A bias is kept exactly: all zeros is dropped (it adds
    nothing), any other value turns ``model.score`` into a ``Linear`` with a bias, so the score is ``w . h + b`` as in
    Safe-RLHF (``save_pretrained`` then writes ``score.bias``, which this loader reads back the same way).
    """
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear):
        return  # not a ``score`` head: any leftover names are reported by the caller
    wanted = set()
    if "score.weight" in missing and "score_head.weight" in unexpected:
        wanted.add("score_head.weight")
    bias_keys = [k for k in ("score_head.bias", "score.bias") if k in unexpected]
    if len(bias_keys) == 1 and (head.bias is None or "score.bias" in missing):
        wanted.add(bias_keys[0])
    if not wanted:
        return
    tensors = _checkpoint_tensors(path, wanted, revision)
    weight = tensors.get("score_head.weight")
    if weight is not None:
        if weight.shape != head.weight.shape:
            raise ScoreModelLoadError(
                f"{path}: the checkpoint's score_head.weight has shape {tuple(weight.shape)}, but the model's "
                f"score.weight has {tuple(head.weight.shape)} (num_labels {model.config.num_labels}); set num_labels "
                "(or Safe-RLHF's score_dim) in its config.json to the number of outputs of the head."
            )
        with torch.no_grad():
            head.weight.copy_(weight)
        missing.discard("score.weight")
        unexpected.discard("score_head.weight")
    bias = tensors.get(bias_keys[0]) if bias_keys else None
    if bias is None or bias.shape != (head.out_features,):
        return  # a bias of another shape stays in ``unexpected``: reported
    if head.bias is not None:
        with torch.no_grad():
            head.bias.copy_(bias)
        missing.discard("score.bias")
    elif bool(torch.any(bias != 0)):
        biased = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype,
                                 device=head.weight.device)
        with torch.no_grad():
            biased.weight.copy_(head.weight)
            biased.bias.copy_(bias)
        model.score = biased
    unexpected.discard(bias_keys[0])


def _from_pretrained_kwargs(
    path: str,
    *,
    dtype: str | None,
    num_labels: int | None,
    trust_remote_code: bool,
    revision: str | None,
    gguf_file: str | None,
    attn_implementation: str | None,
    quantization_config,
    device_map,
) -> tuple[dict[str, Any], bool]:
    """``(from_pretrained keyword arguments, whether the config is a Safe-RLHF score model's)``.

    A GGUF file is loaded de-quantized; a Safe-RLHF config (with ``score_dim``) gives ``num_labels`` when not set.
    """
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": DTYPES[dtype] if dtype else "auto"}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    for key, value in (("revision", revision), ("attn_implementation", attn_implementation),
                       ("quantization_config", quantization_config), ("device_map", device_map)):
        if value is not None:
            kwargs[key] = value
    safe_rlhf = False
    if gguf_file is not None:
        from transformers import GgufConfig

        kwargs["gguf_file"] = gguf_file
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    else:
        with model_files(path):
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
        safe_rlhf = getattr(config, "score_dim", None) is not None
        if safe_rlhf and num_labels is None:
            # Without num_labels in its config.json the HF config defaults to 2 labels; the head has score_dim rows.
            kwargs["num_labels"] = int(config.score_dim)
    return kwargs, safe_rlhf


def _load_with_info(name_or_path: str, path: str, kwargs: dict[str, Any]):
    """``(model, loading info)`` from ``from_pretrained``; weights of other shapes: :class:`ScoreModelLoadError`.

    transformers' table of missing and unexpected weights is not printed: the caller checks them (:func:`_check_fit`).
    """
    from transformers import AutoModelForSequenceClassification

    try:
        with quiet_load_report(), model_files(name_or_path):
            return AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True, **kwargs)
    except RuntimeError as err:
        if "ignore_mismatched_sizes" not in str(err):
            raise
        raise ScoreModelLoadError(
            f"{name_or_path}: some checkpoint weights have other shapes than the model built from its config "
            f"(num_labels {kwargs.get('num_labels', 'from config.json')}; the load report above lists them). A "
            "reward or cost model has one output: point at a checkpoint with a one-output head, or fix num_labels in "
            "its config.json."
        ) from err


def _check_fit(name_or_path: str, model, missing: set[str], unexpected: set[str], info: dict[str, Any]) -> None:
    """Raises :class:`ScoreModelLoadError` naming the weights that did not load (missing, unexpected, mismatched)."""
    mismatched = [str(m) for m in info.get("mismatched_keys") or []]
    errors = [str(e) for e in info.get("error_msgs") or []]
    if missing or unexpected or mismatched or errors:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint (they would be randomly initialised): {_names(missing)}")
        if unexpected:
            parts.append(f"in the checkpoint but not in the model (they would be ignored): {_names(unexpected)}")
        if mismatched:
            parts.append(f"with other shapes: {', '.join(mismatched)}")
        if errors:
            parts.append(f"errors: {'; '.join(errors)}")
        hint = ""
        if "score.weight" in missing and any(k.startswith("lm_head.") for k in unexpected):
            hint = (" It looks like a causal LM, not a score model: train one first (RewardModelModule or "
                    "CostModelModule, e.g. configs/eval/reward_model_tiny.yaml) and point at its export.")
        raise ScoreModelLoadError(
            f"{name_or_path} does not fit {type(model).__name__}; weights {'; weights '.join(parts)}.{hint} A score "
            "model must load every weight of its backbone and head: point at a sequence-classification (reward or "
            "cost) model saved with save_pretrained, or rename its weights to the names the model expects "
            f"(a Safe-RLHF {_SAFE_RLHF_HEAD}* head is mapped to {_HF_HEAD}* automatically)."
        )


def load_sequence_classifier(
    name_or_path: str,
    *,
    dtype: str | None = None,
    num_labels: int | None = None,
    pad_token_id: int | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    gguf_file: str | None = None,
    attn_implementation: str | None = None,
    quantization_config=None,
    device_map=None,
    new_head: bool = True,
    say_new_head: bool = True,
):
    """Loads ``AutoModelForSequenceClassification`` from a Hub id, a folder or a named local model, strictly.

    Every weight of the model must come from the checkpoint: Hugging Face would otherwise initialise missing weights
    randomly and ignore unexpected ones without an error, and a random head scores noise. Known layouts are mapped:
    a Safe-RLHF score model's ``score_head.weight`` (and its bias, kept exactly; see :func:`_map_safe_rlhf_head`)
    becomes ``score.weight``, its ``num_labels`` is taken from ``score_dim``, and its normalizer statistics (which
    only act during its training) are ignored.

    Args:
        name_or_path: Folder, Hub id or named local model.
        dtype: Load dtype (default: the checkpoint's).
        num_labels: Outputs of the head (default: the config's).
        pad_token_id: Set on the config: the model pools at the last token that is not padding.
        trust_remote_code, revision, gguf_file, attn_implementation, quantization_config, device_map: As for
            ``from_pretrained``.
        new_head: Building a score model to train from a causal LM checkpoint: the head (weights outside the
            backbone) may be missing and is then newly initialised, and weights outside the backbone (the LM head)
            are dropped. Backbone weights must still all load. ``False`` (used for scoring) requires every weight.
        say_new_head: With ``new_head``, say in one line which head weights were newly initialised (``False``
            where the head's trained weights are put in right after, as when an adapter is merged).

    Raises:
        ScoreModelLoadError: naming the missing and unexpected weights and what to do, when the checkpoint does not
            fit the model, or when shapes differ (e.g. a head with another number of outputs than ``num_labels``).
    """
    path = resolve_model_path(name_or_path)
    kwargs, safe_rlhf = _from_pretrained_kwargs(
        path, dtype=dtype, num_labels=num_labels, trust_remote_code=trust_remote_code, revision=revision,
        gguf_file=gguf_file, attn_implementation=attn_implementation, quantization_config=quantization_config,
        device_map=device_map,
    )
    model, info = _load_with_info(name_or_path, path, kwargs)
    missing, unexpected = set(info["missing_keys"]), set(info["unexpected_keys"])
    _map_safe_rlhf_head(model, path, missing, unexpected, revision)
    if (safe_rlhf or "score_head.weight" in info["unexpected_keys"]) and not getattr(model.config, "do_normalize",
                                                                                      False):
        unexpected -= set(_SAFE_RLHF_STATS)
    new: list[str] = []  # head weights the checkpoint lacks, newly initialised
    if new_head:
        backbone = model.base_model_prefix + "."
        new = sorted(k for k in missing if not k.startswith(backbone))
        missing = {k for k in missing if k.startswith(backbone)}
        unexpected = {k for k in unexpected if k.startswith(backbone)}
    _check_fit(name_or_path, model, missing, unexpected, info)
    if new and say_new_head:
        outputs = model.config.num_labels
        rank_zero_info(f"{type(model).__name__} on {name_or_path}: new score head ({', '.join(new)}, {outputs} "
                       f"output{'s' if outputs != 1 else ''}) initialised; the checkpoint has none")
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model
