"""Tokenizer loading with explicit pad-token handling."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sacpo_lightning.errors import UserError
from sacpo_lightning.io import PathLike
from sacpo_lightning.models.registry import model_files, resolve_model_path


def load_tokenizer(
    name_or_path: str,
    *,
    trust_remote_code: bool = False,
    revision: str | None = None,
    gguf_file: str | None = None,
) -> PreTrainedTokenizerBase:
    """Loads a tokenizer and makes sure it has a pad token.

    Labels in this library are built from explicit prompt/response lengths, never by comparing ids with the pad id, so
    reusing an existing token as padding cannot mask real tokens (for example an EOS that ends every response). When
    the tokenizer has no pad token, the unknown token is used if there is one, otherwise EOS; no new token is added,
    so the embedding matrix never needs resizing.

    Args:
        name_or_path: A Hub id or a local folder (see :func:`sacpo_lightning.models.resolve_model_path`).
        trust_remote_code: Whether to run tokenizer code shipped with the model. Off unless the user turns it on.
        revision: Optional Hub revision.
        gguf_file: Optional GGUF file name inside ``name_or_path``.
    """
    path = resolve_model_path(name_or_path)
    kwargs = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    with model_files(name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token_id is None:
        fallback = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        if fallback is None:
            raise UserError(
                f"Tokenizer of {name_or_path!r} has no pad, unk or eos token; set one with "
                "tokenizer.pad_token = ... before training."
            )
        tokenizer.pad_token = fallback
        rank_zero_info(f"Tokenizer of {name_or_path!r} has no pad token; padding with {fallback!r} (labels are masked "
                       "by position, so this token is never masked where it is a real token).")
    return tokenizer


def load_raw_tokenizer(path: PathLike) -> PreTrainedTokenizerBase:
    """A folder's tokenizer exactly as saved (no pad token added), to compare with another or to copy into a merge."""
    return AutoTokenizer.from_pretrained(path)
