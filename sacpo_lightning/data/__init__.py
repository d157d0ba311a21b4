"""Preference data: sources (PKU-SafeRLHF, HH-RLHF, TRL shapes) -> records -> token ids -> padded batches."""

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
    HubRef,
    KTORecord,
    LoadResult,
    PairRecord,
    SourceSpec,
    detect_source,
    load_records,
    parse_hh_transcript,
    parse_hub_ref,
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
    tokenizer_adds_bos,
)

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "HubRef",
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
    "detect_source",
    "hh_transcript",
    "load_records",
    "pad_and_label",
    "parse_hh_transcript",
    "parse_hub_ref",
    "prompt_key",
    "read_rows",
    "render_prompt",
    "render_response",
    "resolve_data_path",
    "split_by_prompt",
    "split_hh_pair",
    "subsample",
    "tokenizer_adds_bos",
]
