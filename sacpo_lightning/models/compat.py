"""Whether two model folders can be merged in weight space or mixed token by token: same architecture, same tokenizer.

:func:`check_compatible` is the one check, used by the weight-space merges (:mod:`sacpo_lightning.merging`), the
token-level mixture (:class:`sacpo_lightning.models.mixture.GeometricMixtureLM`) and the merge-vs-mixture KL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig

from sacpo_lightning.errors import UserError
from sacpo_lightning.io import PathLike
from sacpo_lightning.models.tokenizer import load_raw_tokenizer

__all__ = ["ARCHITECTURE_FIELDS", "SPECIAL_TOKEN_FIELDS", "MergeError", "check_compatible"]

# Config fields that must agree for a weight-space merge or a token-level mixture to make sense.
ARCHITECTURE_FIELDS = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
)
SPECIAL_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


class MergeError(UserError):
    """Two models (or state dicts) cannot be merged or mixed: their keys, shapes, configs or tokenizers differ."""


def _load_config_dict(path: Path) -> dict[str, Any]:
    config = AutoConfig.from_pretrained(path)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    values = text_config.to_dict()
    # Multimodal configs keep architectures/model_type at the top level.
    values.setdefault("architectures", config.architectures)
    values["model_type"] = config.model_type
    return values


def _first_vocab_differences(vocab_a: dict[str, int], vocab_b: dict[str, int], limit: int = 5) -> str:
    diffs = []
    for token in sorted(set(vocab_a) | set(vocab_b)):
        id_a, id_b = vocab_a.get(token), vocab_b.get(token)
        if id_a != id_b:
            diffs.append(f"{token!r}: {id_a} vs {id_b}")
            if len(diffs) == limit:
                break
    return "; ".join(diffs)


def check_compatible(dir_a: PathLike, dir_b: PathLike) -> None:
    """Refuses two model folders that cannot be merged in weight space or mixed token by token.

    Compares the config fields in :data:`ARCHITECTURE_FIELDS` (architecture, model type, sizes, number of layers,
    vocabulary size, embedding tying) and the tokenizers: the full token-to-id map (``get_vocab()``), the special
    token ids and the chat template.

    Raises:
        MergeError: With both folders and the first differing field in the message.
    """
    dir_a, dir_b = Path(dir_a), Path(dir_b)
    where = f"{dir_a} (A) and {dir_b} (B)"
    config_a, config_b = _load_config_dict(dir_a), _load_config_dict(dir_b)
    for field in ARCHITECTURE_FIELDS:
        value_a, value_b = config_a.get(field), config_b.get(field)
        if value_a != value_b:
            raise MergeError(
                f"Models {where} have different architectures: config field {field!r} is {value_a!r} in A and "
                f"{value_b!r} in B."
            )
    tok_a, tok_b = load_raw_tokenizer(dir_a), load_raw_tokenizer(dir_b)
    vocab_a, vocab_b = tok_a.get_vocab(), tok_b.get_vocab()
    if vocab_a != vocab_b:
        raise MergeError(
            f"Models {where} have different tokenizers: the vocabularies differ ({len(vocab_a)} vs {len(vocab_b)} "
            f"tokens; first differences: {_first_vocab_differences(vocab_a, vocab_b)})."
        )
    for field in SPECIAL_TOKEN_FIELDS:
        value_a, value_b = getattr(tok_a, field, None), getattr(tok_b, field, None)
        # A pad token only fills unused positions: one side lacking it (an export adds one) is compatible.
        if field == "pad_token_id" and (value_a is None or value_b is None):
            continue
        if value_a != value_b:
            raise MergeError(
                f"Models {where} have different tokenizers: {field} is {value_a!r} in A and {value_b!r} in B."
            )
    specials_a = dict(zip(tok_a.all_special_tokens, tok_a.all_special_ids, strict=True))
    specials_b = dict(zip(tok_b.all_special_tokens, tok_b.all_special_ids, strict=True))
    if specials_a != specials_b:
        raise MergeError(
            f"Models {where} have different tokenizers: special tokens are {specials_a} in A and {specials_b} in B."
        )
    template_a, template_b = getattr(tok_a, "chat_template", None), getattr(tok_b, "chat_template", None)
    if template_a != template_b:
        raise MergeError(f"Models {where} have different tokenizers: the chat templates differ.")
