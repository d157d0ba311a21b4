"""The preference DataModule: files -> validated records -> prompt-level split -> token ids -> padded batches."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from sacpo_lightning.data.collate import collate_kto, collate_pairs
from sacpo_lightning.data.sources import (
    DataError,
    SourceSpec,
    load_records,
    prompt_key,
    resolve_data_path,
    split_by_prompt,
    subsample,
)
from sacpo_lightning.data.tokenization import TokenizeConfig, batch_tokenize_kto, batch_tokenize_pairs
from sacpo_lightning.errors import UserError
from sacpo_lightning.io import file_fingerprint

__all__ = [
    "LengthGroupedSampler",
    "PreferenceDataModule",
    "ResumableDataLoader",
    "SeededRandomSampler",
    "ShardedSampler",
    "TokenizedDataset",
]


class TokenizedDataset(Dataset):
    """A map-style dataset over a list of tokenized examples (plain Python lists, cheap to pickle to workers)."""

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]

    def lengths(self) -> list[int]:
        """Padded-row length of each example (the longer of chosen and rejected for pairs)."""
        out = []
        for e in self.examples:
            if "completion_ids" in e:
                out.append(len(e["prompt_ids"]) + len(e["completion_ids"]))
            else:
                out.append(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])))
        return out


class _EpochOrderSampler:
    """Shared by the training samplers: an epoch's order is a pure function of the seed and the epoch, and an
    iteration can begin part-way through it (to resume a run mid-epoch, see :class:`ResumableDataLoader`)."""

    epoch: int = 0
    _start: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start_at(self, position: int) -> None:
        """Makes the next iteration begin at ``position`` of this epoch's order; later ones start at 0 again."""
        self._start = max(0, int(position))

    def epoch_order(self) -> list[int]:
        """Every index of the current epoch, in order."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return iter(self.epoch_order()[start:])


class SeededRandomSampler(_EpochOrderSampler, RandomSampler):
    """A random permutation that depends only on ``seed`` and the epoch given to :meth:`set_epoch`.

    Lightning calls ``set_epoch`` at every epoch, so a resumed run sees the same order as an uninterrupted one. Under
    data-parallel training the DataModule hands each process its share through :class:`ShardedSampler`.
    """

    def __init__(self, data_source: Sequence, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def epoch_order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.data_source), generator=g).tolist()


class LengthGroupedSampler(_EpochOrderSampler, Sampler[int]):
    """Shuffles, then orders indices so that each batch holds examples of similar length (less padding).

    Indices are permuted with ``seed + epoch``, cut into mega-batches of ``group_batches`` batches, sorted by length
    within each mega-batch (longest first) and cut into chunks of ``batch_size * num_replicas``; the full chunks are
    then shuffled (a short last chunk stays last). Under data-parallel training :class:`ShardedSampler` hands position
    ``k`` to rank ``k % num_replicas``, so with ``num_replicas`` set to the world size every rank's batch comes from
    one chunk, and the ranks together see the chunks a single process with batch size ``batch_size * num_replicas``
    sees.

    Args:
        lengths: Length of each example.
        batch_size: Per-process batch size.
        seed: Base seed; the order is a function of ``seed`` and the epoch only.
        num_replicas: Number of processes sharing the order.
        group_batches: Batches per mega-batch (how far examples may move to find similar lengths).
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int = 0, num_replicas: int = 1, group_batches: int = 50
    ) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = max(1, num_replicas)
        self.group_batches = group_batches
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def epoch_order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        chunk = self.batch_size * self.num_replicas
        mega = chunk * self.group_batches
        chunks: list[list[int]] = []
        for start in range(0, len(order), mega):
            group = sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
            chunks += [group[j : j + chunk] for j in range(0, len(group), chunk)]
        # only the last chunk can be short; it stays last so that every other chunk starts at a multiple of its size
        tail = [chunks.pop()] if chunks and len(chunks[-1]) < chunk else []
        out = [i for c in torch.randperm(len(chunks), generator=g).tolist() for i in chunks[c]]
        for c in tail:
            out += c
        return out


class ShardedSampler(_EpochOrderSampler, DistributedSampler):
    """One process's share of another sampler's epoch order under data-parallel training.

    The order of ``sampler`` (a permutation of the whole training set) is padded to a multiple of ``num_replicas`` by
    repeating its first indices, and rank ``r`` takes positions ``r, r + num_replicas, r + 2 * num_replicas, ...``.
    With per-process batch size ``B`` and ``W`` processes, step ``t`` of all ranks together covers positions
    ``[t*B*W, (t+1)*B*W)`` of the order: exactly the batch a single process with batch size ``B*W`` draws at step
    ``t``. No example is seen twice in an epoch unless the training set size is not a multiple of ``W``; then the
    last step repeats ``W - N % W`` examples, so that every rank runs the same number of steps.

    Being a :class:`~torch.utils.data.DistributedSampler`, Lightning uses it as is instead of substituting its own
    (whose order would differ from the single-process one).

    Args:
        sampler: The whole-dataset order (:class:`SeededRandomSampler` or :class:`LengthGroupedSampler`).
        num_replicas: Number of data-parallel processes.
        rank: This process's data-parallel rank.
    """

    def __init__(self, sampler: _EpochOrderSampler, num_replicas: int, rank: int) -> None:
        super().__init__(sampler, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.sampler = sampler
        self.seed = sampler.seed
        self.epoch = 0

    def epoch_order(self) -> list[int]:
        self.sampler.set_epoch(self.epoch)
        order = self.sampler.epoch_order()
        padded = (order * math.ceil(self.total_size / max(1, len(order))))[: self.total_size]
        return padded[self.rank : self.total_size : self.num_replicas]


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position inside the epoch is saved in checkpoints and restored on resume.

    Lightning saves the ``state_dict`` of a stateful training dataloader in each checkpoint and, when a run resumes,
    calls ``load_state_dict`` before iterating again. The next iteration then starts right after the last batch the
    interrupted run consumed (its sampler skips the indices without loading them), so a run resumed mid-epoch trains
    on exactly the batches an uninterrupted run would. Its sampler must be one of this module's (``set_epoch`` and
    ``start_at``); ``drop_last`` must be off.

    With a ``generator``, it is re-seeded with the sampler's seed plus the epoch before each iteration: the worker
    seeds then depend only on the epoch, and starting an iteration draws nothing from the global torch RNG, whose
    state the checkpoint restores (see :meth:`~sacpo_lightning.modules.AlignmentModule.on_save_checkpoint`).
    """

    _batches: int = 0
    _resume: dict[str, int] | None = None

    def _replicas(self) -> int:
        return self.sampler.num_replicas if isinstance(self.sampler, ShardedSampler) else 1

    def state_dict(self) -> dict[str, int]:
        """Epoch and batches consumed in it, with the batch size and process count that define a batch."""
        return {
            "epoch": int(self.sampler.epoch),
            "batches": self._batches,
            "batch_size": int(self.batch_size),
            "num_replicas": self._replicas(),
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = dict(state_dict)

    def __iter__(self) -> Iterator[Any]:
        # a generator, so that nothing is read before Lightning has called set_epoch for the epoch
        resume, self._resume = self._resume, None
        skip = 0
        if resume is not None and resume["epoch"] == self.sampler.epoch:
            skip = resume["batches"]
            per_step = self.batch_size * self._replicas()
            if resume["batch_size"] * resume["num_replicas"] != per_step:
                skip = resume["batches"] * resume["batch_size"] * resume["num_replicas"] // per_step
                rank_zero_warn(
                    f"Resuming with {self._replicas()} processes x batch size {self.batch_size} where the checkpoint "
                    f"used {resume['num_replicas']} x {resume['batch_size']}: the epoch continues near, not exactly "
                    "at, the interrupted position."
                )
        if self.generator is not None:
            self.generator.manual_seed(self.sampler.seed + self.sampler.epoch)
        self.sampler.start_at(skip * self.batch_size)
        self._batches = skip
        for batch in super().__iter__():
            self._batches += 1
            yield batch


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs (DPO and friends) or unpaired examples (KTO) from local files or Hub datasets.

    ``setup`` reads and validates every file (:mod:`sacpo_lightning.data.sources`), splits train/validation by prompt
    (or reads ``val_files``), subsamples, and tokenizes in-process; every process does the same work and gets the same
    result. Batches follow :func:`~sacpo_lightning.data.collate.collate_pairs` (``input_ids``, ``attention_mask``,
    ``labels`` of shape (2B, L), chosen rows first, and ``index``) or :func:`~sacpo_lightning.data.collate.collate_kto`
    (adds ``desirable`` and the ``kl_*`` mismatched rows).

    Args:
        train_files: Data files (``.jsonl``, ``.json`` list, ``.csv``, ``.parquet``) or Hub datasets
            (``hub:OWNER/NAME[/DATA_DIR][:SPLIT][?config=C&split=S&revision=R]``, see
            :func:`~sacpo_lightning.data.sources.parse_hub_ref`).
            ``~`` and environment variables are expanded.
        val_files: Validation files; when given, ``val_fraction`` is not used.
        source: Row format: ``pku``, ``hh``, ``generic`` (TRL's preference shapes) or ``kto`` (TRL's unpaired
            shape), see :mod:`sacpo_lightning.data.sources`; not given (or ``auto``), it is read from the first row
            of each file and logged.
        objective: PKU pairs by ``better_response_id`` (``helpful``) or ``safer_response_id`` (``safe``).
        kind: ``pairs`` or ``kto``.
        kto_from: KTO examples from PKU safety ``flags`` (objective ``safe`` only) or from ``pairs`` (chosen
            desirable, rejected undesirable; for PKU with objective ``helpful``, the ``better_response_id`` one).
        tokenizer: Tokenizer name or path (the CLI links it from the model); or inject one with :meth:`set_tokenizer`.
        template: Prompt template: ``chat`` (the tokenizer's), ``pku`` or ``raw``.
        system_prompt: Optional system text for every prompt.
        max_length: Most tokens of prompt + response.
        max_prompt_length: Most prompt tokens (the start of long prompts is cut); smaller than ``max_length``.
        val_fraction: Fraction of prompts held out for validation when ``val_files`` is not given (0 = none).
        max_samples: Use at most this many training examples (a seeded random subset).
        max_val_samples: Use at most this many validation examples.
        filter: ``safety_differs`` keeps only PKU rows whose two responses differ in safety.
        column_mapping: Field -> column renames, e.g. ``{"prompt": "question"}``.
        on_invalid: ``error`` refuses files with bad rows; ``skip`` drops and counts them (see :attr:`skipped`).
        duplicates: Exact duplicate examples are dropped and counted (``drop``), kept, or refused (``error``).
        batch_size: Training batch size (pairs or unpaired examples per process).
        eval_batch_size: Validation batch size; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        seed: Seed of the split, the subsets and the shuffling.
        group_by_length: Batch examples of similar length together (less padding; see :class:`LengthGroupedSampler`).
        pad_to_multiple_of: Round padded lengths up to this multiple.
    """

    def __init__(
        self,
        train_files: list[str],
        val_files: list[str] | None = None,
        source: Literal["pku", "hh", "generic", "kto", "auto"] | None = None,
        objective: Literal["helpful", "safe"] = "safe",
        kind: Literal["pairs", "kto"] = "pairs",
        kto_from: Literal["flags", "pairs"] = "flags",
        tokenizer: str | None = None,
        template: Literal["chat", "pku", "raw"] = "chat",
        system_prompt: str | None = None,
        max_length: int = 512,
        max_prompt_length: int = 256,
        val_fraction: float = 0.05,
        max_samples: int | None = None,
        max_val_samples: int | None = None,
        filter: Literal["none", "safety_differs"] = "none",
        column_mapping: dict[str, str] | None = None,
        on_invalid: Literal["error", "skip"] = "error",
        duplicates: Literal["drop", "keep", "error"] = "drop",
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        group_by_length: bool = False,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_files = [train_files] if isinstance(train_files, str) else list(train_files)
        self.val_files = [val_files] if isinstance(val_files, str) else (list(val_files) if val_files else None)
        if not self.train_files:
            raise UserError("--data.train_files is empty; give at least one data file.")
        self.spec = SourceSpec(
            source=source or "auto",
            objective=objective,
            kind=kind,
            kto_from=kto_from,
            filter=filter,
            column_mapping=dict(column_mapping) if column_mapping else None,
            on_invalid=on_invalid,
            duplicates=duplicates,
        )
        self.tokenize_config = TokenizeConfig(
            max_length=max_length, max_prompt_length=max_prompt_length, template=template, system_prompt=system_prompt
        )
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"--data.val_fraction must be in [0, 1), got {val_fraction}.")
        for option, value in (
            ("--data.batch_size", batch_size),
            ("--data.eval_batch_size", eval_batch_size),
            ("--data.max_samples", max_samples),
            ("--data.max_val_samples", max_val_samples),
            ("--data.pad_to_multiple_of", pad_to_multiple_of),
        ):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"{option} must be a positive integer, got {value!r}.")
        if num_workers < 0:
            raise UserError(f"--data.num_workers must be >= 0, got {num_workers}.")
        self._tokenizer: Any = None
        self.train_dataset: TokenizedDataset | None = None
        self.val_dataset: TokenizedDataset | None = None
        self.skipped: dict[str, int] = {}
        self.shapes: dict[str, str] = {}  # file -> detected source and shape, when --data.source is not given
        self.truncation: dict[str, int] = {}
        self._desirable: tuple[int, int] | None = None

    # ------------------------------------------------------------------------------------------------ tokenizer
    def set_tokenizer(self, tokenizer: Any) -> None:
        """Uses an already-loaded tokenizer instead of loading ``tokenizer`` by name."""
        self._tokenizer = tokenizer

    def get_tokenizer(self) -> Any:
        """The injected tokenizer, or the one named by ``--data.tokenizer`` (loaded once)."""
        if self._tokenizer is None:
            if not self.hparams.tokenizer:
                raise UserError(
                    "--data.tokenizer is not set: give a tokenizer name or path (the CLI links it from the model), "
                    "or call set_tokenizer(...)."
                )
            from sacpo_lightning.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        tok = self.get_tokenizer()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first.")
        return pad

    # ---------------------------------------------------------------------------------------------------- setup
    def _resolve(self) -> tuple[list[str], list[str] | None]:
        train = [resolve_data_path(p, "--data.train_files") for p in self.train_files]
        val = [resolve_data_path(p, "--data.val_files") for p in self.val_files] if self.val_files else None
        return train, val

    def prepare_data(self) -> None:
        """Checks that the data files exist (no state is set here; :meth:`setup` does the work on every process)."""
        self._resolve()

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        hp = self.hparams
        train_files, val_files = self._resolve()
        loaded = load_records(train_files, self.spec, option="--data.train_files")
        skipped = Counter(loaded.skipped)
        self.shapes = dict(loaded.shapes)
        if val_files:
            val_loaded = load_records(val_files, self.spec, option="--data.val_files")
            skipped.update(val_loaded.skipped)
            self.shapes.update(val_loaded.shapes)
            train, val = loaded.records, val_loaded.records
            overlap = {prompt_key(r.prompt) for r in train} & {prompt_key(r.prompt) for r in val}
            if overlap:
                rank_zero_info(f"{len(overlap)} prompts appear in both --data.train_files and --data.val_files.")
        else:
            train, val = split_by_prompt(loaded.records, hp.val_fraction, hp.seed)
        train = subsample(train, hp.max_samples, hp.seed)
        val = subsample(val, hp.max_val_samples, hp.seed)
        if not train:
            raise DataError(
                f"No training examples left in --data.train_files = {train_files} after the validation split "
                f"(--data.val_fraction {hp.val_fraction}, {len(val)} validation examples); lower val_fraction or "
                "add data."
            )
        tokenizer = self.get_tokenizer()
        tokenize = batch_tokenize_kto if hp.kind == "kto" else batch_tokenize_pairs
        stats: Counter = Counter()
        self.train_dataset = TokenizedDataset(tokenize(train, tokenizer, self.tokenize_config, stats=stats))
        self.val_dataset = TokenizedDataset(tokenize(val, tokenizer, self.tokenize_config, stats=stats))
        self.skipped = dict(skipped)
        self.truncation = dict(stats)
        if hp.kind == "kto":
            n_desirable = sum(1 for e in self.train_dataset.examples if e["desirable"])
            self._desirable = (n_desirable, len(self.train_dataset) - n_desirable)
        self._report(loaded.rows, train_files)

    def _report(self, rows: int, files: list[str]) -> None:
        unit = "unpaired examples" if self.hparams.kind == "kto" else "pairs"
        msg = (
            f"Data: {rows} rows of {', '.join(files)} ({self.spec.describe()}) -> {len(self.train_dataset)} training "
            f"and {len(self.val_dataset)} validation {unit}"
        )
        if self.shapes:
            msg += "; detected " + ", ".join(sorted(set(self.shapes.values())))
        if self._desirable is not None:
            msg += f"; train desirable/undesirable {self._desirable[0]}/{self._desirable[1]}"
        if self.skipped:
            msg += "; dropped rows: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
        if self.truncation:
            msg += "; truncated: " + ", ".join(f"{k} {v}" for k, v in sorted(self.truncation.items()))
            if self.truncation.get("responses_truncated"):
                msg += " (truncated responses lose their EOS; raise --data.max_length to keep it)"
        rank_zero_info(msg + ".")

    # -------------------------------------------------------------------------------------------- information
    def _require_setup(self) -> TokenizedDataset:
        if self.train_dataset is None:
            raise RuntimeError("PreferenceDataModule.setup() has not run yet.")
        return self.train_dataset

    @property
    def num_train_examples(self) -> int:
        """Training examples (pairs, or unpaired examples for KTO) after the split and subsampling."""
        return len(self._require_setup())

    def class_counts(self) -> tuple[int, int]:
        """``(desirable, undesirable)`` counts of the KTO training split."""
        self._require_setup()
        if self._desirable is None:
            raise ValueError("class_counts() is for --data.kind kto; this data module holds pairs.")
        return self._desirable

    def fingerprint(self) -> dict[str, Any]:
        """``{"files": {path: sha256-prefix}, "settings": hash}``: identifies the data and how it is tokenized.

        Hub datasets are listed with the value ``"hub"`` (their content is not hashed here).
        """
        train_files, val_files = self._resolve()
        files = {p: ("hub" if p.startswith("hub:") else file_fingerprint(p)) for p in train_files + (val_files or [])}
        settings = {k: v for k, v in self.hparams.items() if k not in ("batch_size", "eval_batch_size", "num_workers")}
        settings["train_files"], settings["val_files"] = train_files, val_files
        if self._tokenizer is not None or self.hparams.tokenizer:
            tok = self.get_tokenizer()
            settings["tokenizer"] = {
                "name": getattr(tok, "name_or_path", None),
                "size": len(tok),
                "bos": tok.bos_token_id,
                "eos": tok.eos_token_id,
                "pad": tok.pad_token_id,
                "chat_template": hashlib.sha256(str(getattr(tok, "chat_template", None)).encode()).hexdigest()[:16],
            }
        blob = json.dumps(settings, sort_keys=True, default=str).encode()
        return {"files": files, "settings": hashlib.sha256(blob).hexdigest()[:16]}

    # ------------------------------------------------------------------------------------------- dataloaders
    def _collate(self) -> functools.partial:
        if self.hparams.kind == "kto":
            return functools.partial(
                collate_kto,
                pad_token_id=self.pad_token_id,
                max_length=self.hparams.max_length,
                pad_to_multiple_of=self.hparams.pad_to_multiple_of,
            )
        return functools.partial(
            collate_pairs, pad_token_id=self.pad_token_id, pad_to_multiple_of=self.hparams.pad_to_multiple_of
        )

    def _data_parallel(self) -> tuple[int, int]:
        """``(num_replicas, rank)`` of data-parallel training; ``(1, 0)`` outside a distributed Trainer."""
        trainer = getattr(self, "trainer", None)
        kwargs = getattr(getattr(trainer, "strategy", None), "distributed_sampler_kwargs", None) if trainer else None
        if not kwargs:
            return 1, 0
        return max(1, int(kwargs.get("num_replicas", 1))), int(kwargs.get("rank", 0))

    def _world_size(self) -> int:
        return self._data_parallel()[0]

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled training batches, resumable mid-epoch; each process gets its :class:`ShardedSampler` share.

        The order depends only on ``seed``, the epoch and the global batch (``batch_size`` x processes): ``N``
        processes with batch size ``B`` see together the batches one process with batch size ``N * B`` sees.
        """
        dataset = self._require_setup()
        hp = self.hparams
        replicas, rank = self._data_parallel()
        if hp.group_by_length:
            sampler: Sampler = LengthGroupedSampler(
                dataset.lengths(), hp.batch_size, seed=hp.seed, num_replicas=replicas
            )
        else:
            sampler = SeededRandomSampler(dataset, seed=hp.seed)
        if replicas > 1:
            sampler = ShardedSampler(sampler, num_replicas=replicas, rank=rank)
        return ResumableDataLoader(
            dataset,
            batch_size=hp.batch_size,
            sampler=sampler,
            collate_fn=self._collate(),
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            generator=torch.Generator(),
        )

    def val_dataloader(self) -> DataLoader | list:
        self._require_setup()
        if not self.val_dataset:
            return []
        return DataLoader(
            self.val_dataset,
            batch_size=self.hparams.eval_batch_size or self.hparams.batch_size,
            shuffle=False,
            collate_fn=self._collate(),
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            # its own generator: starting a validation pass draws nothing from the global RNG of the training run
            generator=torch.Generator().manual_seed(self.hparams.seed),
        )
