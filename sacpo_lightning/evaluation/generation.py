"""Batched generation on prompt sets, for exported Hugging Face folders and token-level geometric mixtures of two.

Prompt sets and their formatting are :mod:`sacpo_lightning.data.prompts`. Batches are left-padded and decoded with a
KV cache; greedy decoding of a batch gives the same responses as decoding each prompt alone.

A model is named by a *model spec*:

- a folder (or a named local model such as ``tiny-random-llama``), loaded with ``AutoModelForCausalLM``;
- ``mix:DIR_A+DIR_B@Q``: the token-level geometric mixture ``pi_A ** (1 - Q) * pi_B ** Q``, renormalised at every
  token (:class:`sacpo_lightning.models.mixture.GeometricMixtureLM`); the folders themselves must not contain ``+``. It
  approximates the sequence-level mixture ``pi*(y) ~ pi_A(y) ** (1 - Q) * pi_B(y) ** Q`` (the SACPO optimum for
  ``Q * lambda`` when A and B are the step-1 and step-2 models), but is not equal to it.

Outputs are JSON lines ``{prompt, category, response, model}`` written atomically, with a sidecar
``<output>.meta.json`` holding a hash of everything that determines them (model files, prompts, settings). A later
call with the same hash finds the finished file and does no work.

Sequence-level estimates (``sequence_level=True``, ``samples_per_prompt=N``): every prompt gets N samples of the
token-level mixture with their importance log-weights ``log W = sum_t log Z_t`` for the sequence-level mixture
(:meth:`~sacpo_lightning.models.mixture.GeometricMixtureLM.generate`); a row then also holds ``samples`` (a list of
``{response, log_weight, weight}``, ``weight`` self-normalised over the prompt's N samples), ``ess`` (their effective
sample size, in ``[1, N]``) and ``resampled_index``; its ``response`` is that sample, drawn with probability
``weight`` (sampling-importance-resampling), so a judge that takes one answer per prompt sees an approximate ``pi*``
sample. Self-normalised means ``sum_i weight_i f(response_i)`` estimate ``E_pi*[f]`` (consistent as N grows, biased
for small N; trust them only when ``ess`` is not tiny). Decoding must be plain sampling (``do_sample``,
``temperature=1``, ``top_p=1``). Responses end at an EOS or after ``max_new_tokens`` tokens, and the weights cover
exactly those tokens, so the target is the geometric mixture of the two models' distributions over responses
truncated to ``max_new_tokens`` tokens (equal to ``pi*`` when responses end in time); stop strings only cut the text
afterwards, so estimates are of ``E[f(text cut at the stop string)]`` under that same target. A single folder (or a
mixture at ``Q`` in ``{0, 1}``) is sampled exactly: its weights are all equal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import StoppingCriteria, StoppingCriteriaList

from sacpo_lightning.data.prompts import NAMED_TEMPLATES, format_prompt, load_prompts
from sacpo_lightning.data.tokenization import encode_with_bos
from sacpo_lightning.errors import MissingFileError, UserError
from sacpo_lightning.io import atomic_write_json, atomic_write_text, file_fingerprint
from sacpo_lightning.merge_weight import check_q
from sacpo_lightning.progress import Progress

__all__ = [
    "GenerationSettings",
    "ModelSpec",
    "Sample",
    "generate_responses",
    "generate_samples",
    "generate_to_file",
    "load_generation_model",
    "parse_model_spec",
    "read_generations",
    "resample_fields",
    "truncate_at_stop",
]

MIX_PREFIX = "mix:"
META_SUFFIX = ".meta.json"
CACHE_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------------
# Settings and model specs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class GenerationSettings:
    """How responses are decoded.

    Args:
        max_new_tokens: Maximum number of generated tokens per response.
        do_sample: Sample (with ``temperature`` and ``top_p``) instead of greedy decoding.
        temperature: Sampling temperature (``> 0``); ignored for greedy decoding.
        top_p: Nucleus-sampling mass in ``(0, 1]``.
        seed: Seed of the sampling generator (each batch is seeded with ``seed + batch index``).
        batch_size: Prompts per forward pass.
        template: ``chat`` (the tokenizer's chat template), ``pku``, ``raw``, or a format string with ``{input}``.
        stop: Strings that end a response; the response is cut before the first one.
        max_prompt_tokens: Keep only the last this-many prompt tokens (None: no limit).
        dtype: Load dtype (``float32``, ``bfloat16``, ``float16``); None keeps the checkpoint's dtype.
        device: Device to run on; None picks CUDA when available, else CPU.
        samples_per_prompt: Samples per prompt (``> 1`` only with ``sequence_level``).
        sequence_level: Record importance weights for the sequence-level geometric mixture and resample one answer per
            prompt (see the module docstring); needs ``do_sample``, ``temperature=1``, ``top_p=1`` and
            ``samples_per_prompt >= 2``.
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    template: str = "chat"
    stop: list[str] = field(default_factory=list)
    max_prompt_tokens: int | None = None
    dtype: str | None = None
    device: str | None = None
    samples_per_prompt: int = 1
    sequence_level: bool = False

    def __post_init__(self) -> None:
        self.stop = list(self.stop)
        if self.max_new_tokens < 1:
            raise UserError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise UserError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.do_sample and not self.temperature > 0:
            raise UserError(f"--temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise UserError("--stop strings must be non-empty")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise UserError(f"--max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise UserError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.template not in NAMED_TEMPLATES and "{input}" not in self.template:
            raise UserError(
                f"--template must be chat, pku, raw or a format string containing '{{input}}', got {self.template!r}"
            )
        if self.samples_per_prompt < 1:
            raise UserError(f"--samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.sequence_level:
            from sacpo_lightning.models.mixture import check_unmodified_sampling

            check_unmodified_sampling(self.do_sample, self.temperature, self.top_p)
            if self.samples_per_prompt < 2:
                raise UserError(
                    "--sequence_level true needs --samples_per_prompt >= 2: self-normalised weights over a single "
                    f"sample are always 1, got --samples_per_prompt {self.samples_per_prompt}"
                )
        elif self.samples_per_prompt > 1:
            raise UserError(
                f"--samples_per_prompt {self.samples_per_prompt} is only used with --sequence_level true (weighted "
                "samples of the sequence-level mixture); drop it or add --sequence_level true"
            )

    def cache_fields(self) -> dict[str, Any]:
        """The settings that change the generated text (batch size and device do not, for greedy decoding)."""
        values = asdict(self)
        values.pop("device")
        # At their defaults the sequence-level fields are left out, so files cached before they existed stay valid.
        if not self.sequence_level:
            values.pop("sequence_level")
            values.pop("samples_per_prompt")
        if not self.do_sample:
            values.pop("batch_size")
            for key in ("temperature", "top_p", "seed"):
                values.pop(key)
        return values


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: one folder, or the token-level geometric mixture of two (weight ``q`` on the second)."""

    paths: tuple[str, ...]
    q: float | None = None

    @property
    def is_mixture(self) -> bool:
        return self.q is not None

    def __str__(self) -> str:
        if self.q is None:
            return self.paths[0]
        return f"{MIX_PREFIX}{self.paths[0]}+{self.paths[1]}@{self.q:g}"


def parse_model_spec(spec: str) -> ModelSpec:
    """Parses a folder or ``mix:DIR_A+DIR_B@Q`` (see the module docstring).

    Raises:
        ValueError: A malformed mixture spec or a mixture weight outside ``[0, 1]``.
    """
    if not spec.startswith(MIX_PREFIX):
        return ModelSpec((spec,))
    body = spec[len(MIX_PREFIX) :]
    pair, sep, q_text = body.rpartition("@")
    dirs = pair.split("+")
    if not sep or len(dirs) != 2 or not all(dirs):
        raise UserError(f"Model spec {spec!r} must look like mix:DIR_A+DIR_B@Q (e.g. mix:step1+step2@0.5)")
    return ModelSpec((dirs[0], dirs[1]), check_q(q_text, f"Model spec {spec!r}: mixture weight"))


def _resolve(path: str) -> str:
    from sacpo_lightning.models import resolve_model_path

    return str(resolve_model_path(path))


def model_fingerprint(spec: ModelSpec) -> str:
    """A cheap fingerprint of the model files: names, sizes and modification times of each folder's top-level files.

    Re-exporting a folder (which writes new files) changes it; reading the weights is not needed.
    """
    h = hashlib.sha256()
    for raw in spec.paths:
        path = Path(_resolve(raw))
        h.update(str(path.resolve() if path.exists() else raw).encode())
        if path.is_dir():
            for child in sorted(path.iterdir()):
                if child.is_file():
                    st = child.stat()
                    h.update(f"{child.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(repr(spec.q).encode())
    return h.hexdigest()[:16]


def _pick_device(device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_generation_model(spec: str | ModelSpec, *, dtype: str | None = None, device: str | None = None):
    """Loads the model and tokenizer named by a model spec, in eval mode on ``device``.

    Returns:
        ``(model, tokenizer)``; the model is a ``PreTrainedModel`` or a ``GeometricMixtureLM``, the tokenizer is the
        first folder's (with a pad token, see :func:`sacpo_lightning.models.load_tokenizer`).
    """
    from sacpo_lightning.models import load_tokenizer

    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    paths = [_resolve(p) for p in spec.paths]
    target = _pick_device(device)
    if spec.is_mixture:
        from sacpo_lightning.models.mixture import GeometricMixtureLM

        model = GeometricMixtureLM.from_folders(paths[0], paths[1], spec.q, dtype=dtype, device=target)
    else:
        from sacpo_lightning.models.policy import load_model_folder

        model = load_model_folder(paths[0], dtype).to(target)
    model.eval()
    return model, load_tokenizer(paths[0])


def _left_pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


# ----------------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------------


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cuts ``text`` before the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    sources = [getattr(generation_config, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
               tokenizer.eos_token_id]
    for value in sources:
        for item in value if isinstance(value, list | tuple) else [value]:
            if item is not None and int(item) not in ids:
                ids.append(int(item))
    return ids


class _StopOnStrings(StoppingCriteria):
    """A stopping criterion that ends a row once its generated tail contains a stop string (per-row booleans)."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_width: int) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.prompt_width = prompt_width
        # A token decodes to at least part of one character; four tokens per character bounds byte-level splits.
        self.tail = 4 * max(len(s) for s in stop) + 4

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.prompt_width :]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row in range(new.shape[0]):
            text = self.tokenizer.decode(new[row, -self.tail :], skip_special_tokens=True)
            done[row] = any(s in text for s in self.stop)
        return done


def _generate_batch(
    model, tokenizer, batch: list[list[int]], settings: GenerationSettings, seed: int
) -> tuple[list[str], list[float] | None]:
    """Decodes one batch: the responses and, with ``settings.sequence_level``, each row's importance log-weight."""
    device = model.device
    pad_id = tokenizer.pad_token_id
    input_ids, attention_mask = _left_pad(batch, pad_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    eos = _eos_ids(model, tokenizer)
    width = input_ids.shape[1]
    from sacpo_lightning.models.mixture import GeometricMixtureLM

    log_weights: list[float] | None = None
    if isinstance(model, GeometricMixtureLM):
        generator = torch.Generator(device=device).manual_seed(seed) if settings.do_sample else None
        out = model.generate(
            input_ids,
            attention_mask,
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample,
            temperature=settings.temperature,
            top_p=settings.top_p,
            eos_token_id=eos or None,
            pad_token_id=pad_id,
            generator=generator,
            return_log_weights=settings.sequence_level,
        )
        if settings.sequence_level:
            out, weights = out
            log_weights = weights.tolist()
    else:
        kwargs: dict[str, Any] = {}
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
        if settings.stop:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnStrings(tokenizer, settings.stop, width)])
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=settings.max_new_tokens,
                do_sample=settings.do_sample,
                eos_token_id=eos or None,
                pad_token_id=pad_id,
                use_cache=True,
                **kwargs,
            )
        if settings.sequence_level:
            # A single model is its own sequence-level target: its samples are exact, all weights equal.
            log_weights = [0.0] * len(batch)
    responses = []
    for row in out[:, width:].tolist():
        # Everything after the first EOS is padding; cut there so a pad id that is a real token never leaks in.
        for i, tok in enumerate(row):
            if tok in eos:
                row = row[:i]
                break
        text = tokenizer.decode(row, skip_special_tokens=True)
        responses.append(truncate_at_stop(text, settings.stop).strip())
    return responses, log_weights


def _decode_all(
    model, tokenizer, prompts: Sequence[str], settings: GenerationSettings, copies: int, desc: str
) -> tuple[list[str], list[float] | None]:
    """``copies`` responses per prompt, prompt-major (``[p0 s0, p0 s1, ..., p1 s0, ...]``), and their log-weights."""
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token; load it with sacpo_lightning.models.load_tokenizer")
    texts = [format_prompt(tokenizer, p, settings.template) for p in prompts]
    encoded = [ids for ids in encode_with_bos(tokenizer, texts, settings.max_prompt_tokens) for _ in range(copies)]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    results: list[str] = [""] * len(encoded)
    log_weights: list[float] | None = [0.0] * len(encoded) if settings.sequence_level else None
    with Progress(len(encoded), desc, unit="responses") as bar:
        for batch_index, start in enumerate(range(0, len(order), settings.batch_size)):
            chunk = order[start : start + settings.batch_size]
            responses, weights = _generate_batch(model, tokenizer, [encoded[i] for i in chunk], settings,
                                                 settings.seed + batch_index)
            for j, (i, response) in enumerate(zip(chunk, responses, strict=True)):
                results[i] = response
                if log_weights is not None:
                    log_weights[i] = weights[j]
            bar.update(len(chunk))
    return results, log_weights


@torch.no_grad()
def generate_responses(
    model, tokenizer, prompts: Sequence[str], settings: GenerationSettings | None = None, *, desc: str = "generate"
) -> list[str]:
    """Generates one response per prompt, in the order of ``prompts``.

    Prompts are formatted with ``settings.template``, sorted by length (less padding), decoded ``batch_size`` at a
    time with left padding and a KV cache, and the responses returned in the original order, cut at the first EOS
    or stop string and stripped of surrounding whitespace.

    Args:
        model: A causal LM (``generate``) or a ``GeometricMixtureLM``, in eval mode.
        tokenizer: Its tokenizer (needs a pad token).
        prompts: Raw user prompts.
        settings: Decoding settings (one sample per prompt; see :func:`generate_samples` for several).
        desc: Start of the progress lines (:class:`~sacpo_lightning.progress.Progress`).
    """
    settings = settings or GenerationSettings()
    if settings.samples_per_prompt != 1:
        raise UserError(
            f"generate_responses returns one response per prompt, but --samples_per_prompt is "
            f"{settings.samples_per_prompt}; use generate_samples (or generate_to_file) for weighted samples"
        )
    return _decode_all(model, tokenizer, prompts, settings, 1, desc)[0]


class Sample(NamedTuple):
    """One sampled response and its importance log-weight for the sequence-level mixture."""

    response: str
    log_weight: float
    """``log W = sum_t log Z_t`` over the decoded tokens (0 for a single model or a mixture at ``q`` in {0, 1})."""


@torch.no_grad()
def generate_samples(
    model, tokenizer, prompts: Sequence[str], settings: GenerationSettings, *, desc: str = "generate"
) -> list[list[Sample]]:
    """``settings.samples_per_prompt`` weighted samples per prompt, for sequence-level estimates.

    Decoding is as in :func:`generate_responses` with every prompt repeated ``samples_per_prompt`` times (the copies
    share batches, each batch seeded with ``seed + batch index``). See the module docstring for what the weights
    target.

    Args:
        model: A ``GeometricMixtureLM`` (or a causal LM, whose samples all get log-weight 0), in eval mode.
        tokenizer: Its tokenizer (needs a pad token).
        prompts: Raw user prompts.
        settings: Decoding settings with ``sequence_level=True``.
        desc: Start of the progress lines (:class:`~sacpo_lightning.progress.Progress`).

    Returns:
        One list of ``samples_per_prompt`` :class:`Sample` per prompt, in the order of ``prompts``.
    """
    if not settings.sequence_level:
        raise ValueError("generate_samples needs --sequence_level true (GenerationSettings(sequence_level=True))")
    n = settings.samples_per_prompt
    responses, log_weights = _decode_all(model, tokenizer, prompts, settings, n, desc)
    assert log_weights is not None
    return [[Sample(responses[i], log_weights[i]) for i in range(p * n, (p + 1) * n)] for p in range(len(prompts))]


def resample_fields(samples: Sequence[Sample], generator: torch.Generator) -> dict[str, Any]:
    """The generation-file fields of one prompt's weighted samples: ``samples``, ``ess``, SIR pick and ``response``.

    Args:
        samples: The prompt's samples (:func:`generate_samples`).
        generator: CPU generator for the resampling draw.

    Returns:
        ``{"response": picked response, "resampled_index": int, "ess": float,
        "samples": [{"response", "log_weight", "weight"}, ...]}``.
    """
    from sacpo_lightning.importance import effective_sample_size, normalized_weights, resample

    log_w = torch.tensor([s.log_weight for s in samples], dtype=torch.float64)
    weights = normalized_weights(log_w)
    pick = int(resample(log_w, 1, generator=generator)[0])
    return {
        "response": samples[pick].response,
        "resampled_index": pick,
        "ess": float(effective_sample_size(log_w)),
        "samples": [{"response": s.response, "log_weight": s.log_weight, "weight": float(w)}
                    for s, w in zip(samples, weights.tolist(), strict=True)],
    }


# ----------------------------------------------------------------------------------------------------------------------
# Files and cache
# ----------------------------------------------------------------------------------------------------------------------


def settings_hash(spec: ModelSpec, prompts_path: str | os.PathLike, settings: GenerationSettings, name: str) -> str:
    """Hash of everything that determines a generation file: model files, prompt file, decoding settings, name."""
    payload = {
        "version": CACHE_VERSION,
        "model": str(spec),
        "model_files": model_fingerprint(spec),
        "prompts": file_fingerprint(prompts_path),
        "settings": settings.cache_fields(),
        "name": name,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def meta_path(output: str | os.PathLike) -> Path:
    return Path(str(output) + META_SUFFIX)


def is_cached(output: str | os.PathLike, expected_hash: str) -> bool:
    """True when ``output`` exists, its sidecar names ``expected_hash`` and the file is the one it describes."""
    output, meta = Path(output), meta_path(output)
    if not (output.is_file() and meta.is_file()):
        return False
    try:
        info = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return False
    return info.get("settings_hash") == expected_hash and info.get("output_fingerprint") == file_fingerprint(output)


def read_generations(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a generation file (JSON lines of ``{prompt, category, response, model}``, plus ``samples``, ``ess`` and
    ``resampled_index`` for sequence-level files)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({err})") from None
    return rows


@contextlib.contextmanager
def _loaded(spec: ModelSpec, settings: GenerationSettings, model_and_tokenizer) -> Iterator[tuple[Any, Any]]:
    if model_and_tokenizer is not None:
        yield model_and_tokenizer
        return
    loaded = load_generation_model(spec, dtype=settings.dtype, device=settings.device)
    try:
        yield loaded
    finally:
        del loaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def generate_to_file(
    model: str | ModelSpec,
    prompts_path: str | os.PathLike,
    output_path: str | os.PathLike,
    settings: GenerationSettings | None = None,
    *,
    name: str | None = None,
    force: bool = False,
    model_and_tokenizer: tuple[Any, Any] | None = None,
    desc: str | None = None,
) -> Path:
    """Generates responses for every prompt of a prompt file and writes them as JSON lines, atomically.

    With ``settings.sequence_level`` each row also carries the prompt's weighted samples, their effective sample size
    and the resampled pick (see the module docstring). Does nothing when ``output_path`` already holds the result of
    the same model files, prompt file and settings (its ``.meta.json`` sidecar records their hash) unless ``force``
    is set.

    Args:
        model: A model spec (folder or ``mix:DIR_A+DIR_B@Q``).
        prompts_path: JSON list or JSON lines of ``{prompt, category?}``.
        output_path: Target ``.jsonl`` file.
        settings: Decoding settings.
        name: Value of the ``model`` field of each row (defaults to the spec).
        force: Regenerate even when the cached file matches.
        model_and_tokenizer: An already loaded ``(model, tokenizer)`` for ``model`` (saves loading it again).
        desc: Start of the progress lines (default ``generate NAME``); not part of the cache key.

    Returns:
        ``output_path``.
    """
    settings = settings or GenerationSettings()
    spec = parse_model_spec(model) if isinstance(model, str) else model
    name = name or str(spec)
    output_path = Path(output_path)
    if not Path(prompts_path).is_file():
        raise MissingFileError(f"--prompts: prompt file {prompts_path} does not exist.")
    expected = settings_hash(spec, prompts_path, settings, name)
    if not force and is_cached(output_path, expected):
        rank_zero_info(f"Generations for {name} on {prompts_path} are up to date: {output_path}")
        return output_path
    rows = load_prompts(prompts_path)
    prompts = [r["prompt"] for r in rows]
    with _loaded(spec, settings, model_and_tokenizer) as (lm, tokenizer):
        if settings.sequence_level:
            samples = generate_samples(lm, tokenizer, prompts, settings, desc=desc or f"generate {name}")
        else:
            responses = generate_responses(lm, tokenizer, prompts, settings, desc=desc or f"generate {name}")
    if settings.sequence_level:
        # One generator over the prompts in file order: the picks depend on the settings (seed) only.
        generator = torch.Generator().manual_seed(settings.seed)
        extra = [resample_fields(s, generator) for s in samples]
    else:
        extra = [{"response": resp} for resp in responses]
    lines = [
        json.dumps({"prompt": r["prompt"], "category": r["category"], "response": e.pop("response"), "model": name,
                    **e}, ensure_ascii=False)
        for r, e in zip(rows, extra, strict=True)
    ]
    # Removing the old sidecar first means a crash between the two writes can only leave a cache miss.
    meta = meta_path(output_path)
    if meta.exists():
        meta.unlink()
    atomic_write_text(output_path, "\n".join(lines) + "\n")
    atomic_write_json(meta, {
        "settings_hash": expected,
        "output_fingerprint": file_fingerprint(output_path),
        "model": str(spec),
        "name": name,
        "prompts": str(prompts_path),
        "num_prompts": len(rows),
        "settings": asdict(settings),
    })
    rank_zero_info(f"Wrote {len(rows)} generations of {name} to {output_path}")
    return output_path
