"""Preference data: sources (PKU-SafeRLHF, HH-RLHF, generic, KTO) -> records -> token ids -> padded batches."""

from sacpo_lightning.data.collate import IGNORE_INDEX, collate_kto, collate_pairs, pad_and_label
from sacpo_lightning.data.datamodule import (
    LengthGroupedSampler,
    PreferenceDataModule,
    SeededRandomSampler,
    TokenizedDataset,
)
from sacpo_lightning.data.formatting import as_messages, hh_transcript, render_prompt, render_response
from sacpo_lightning.data.sources import (
    DataError,
    KTORecord,
    LoadResult,
    PairRecord,
    SourceSpec,
    load_records,
    parse_hh_transcript,
    prompt_key,
    read_rows,
    resolve_data_path,
    split_by_prompt,
    split_hh_pair,
    subsample,
)
from sacpo_lightning.data.tokenization import (
    TokenizeConfig,
    batch_tokenize_kto,
    batch_tokenize_pairs,
    tokenize_kto,
    tokenize_pair,
    tokenizer_adds_bos,
)

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "KTORecord",
    "LengthGroupedSampler",
    "LoadResult",
    "PairRecord",
    "PreferenceDataModule",
    "SeededRandomSampler",
    "SourceSpec",
    "TokenizeConfig",
    "TokenizedDataset",
    "as_messages",
    "batch_tokenize_kto",
    "batch_tokenize_pairs",
    "collate_kto",
    "collate_pairs",
    "hh_transcript",
    "load_records",
    "pad_and_label",
    "parse_hh_transcript",
    "prompt_key",
    "read_rows",
    "render_prompt",
    "render_response",
    "resolve_data_path",
    "split_by_prompt",
    "split_hh_pair",
    "subsample",
    "tokenize_kto",
    "tokenize_pair",
    "tokenizer_adds_bos",
]
