"""What an evaluation runs: one typed settings object for ``sacpo evaluate`` and the pipeline's ``evaluate:`` stage.

The command-line flags of ``sacpo evaluate`` and the keys of a pipeline's ``evaluate:`` mapping are the field names of
:class:`EvaluationSettings` (the command line spells the fields of ``generation`` as top-level flags, as ``sacpo
generate`` does). :data:`SETTINGS_KEYS` is derived from the fields, and every check runs once, in ``__post_init__``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from sacpo_lightning.data.prompts import DEFAULT_XSTEST_PROMPTS, load_xstest_prompts
from sacpo_lightning.errors import UserError
from sacpo_lightning.evaluation.generation import GenerationSettings
from sacpo_lightning.evaluation.safety_judges import parse_safety_judge_arg

__all__ = ["CONSTRAINT_SCALES", "JUDGES", "SETTINGS_KEYS", "SUITES", "EvaluationSettings"]

JUDGES = ("reward_cost", "llm", "implicit")
SUITES = ("xstest",)
CONSTRAINT_SCALES = ("verdicts", "probabilities")
_NONE = ("", "none", "None")


def _name_value_items(option: str, items: Sequence[str], what: str) -> dict[str, str]:
    """``["NAME=VALUE", ...]`` (the command-line form of a mapping) to ``{NAME: VALUE}``."""
    out = {}
    for item in items:
        if not isinstance(item, str):
            raise UserError(f"{option} takes {what} items, got {item!r}")
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UserError(f"{option} takes {what} items, got {item!r}")
        out[name] = value
    return out


def _read_predictions(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["NAME=budget.json", ...]`` to ``{NAME: the file's JSON object}``."""
    predicted = {}
    for name, path in _name_value_items("predicted_safety", items, "MODEL_NAME=budget.json").items():
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as f:
                values = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"predicted_safety {name}={path}: cannot read {path} as JSON ({err})") from None
        if not isinstance(values, dict):
            raise UserError(f"predicted_safety {name}={path}: {path} must hold a JSON object with lambda_star and "
                            "predicted_safety")
        predicted[name] = values
    return predicted


@dataclass
class EvaluationSettings:
    """What an evaluation runs: prompt sets, score models, decoding, judges and the statistics' settings.

    Attributes:
        prompts_safety: Safety prompt set (harmlessness), e.g. ``eval/safety_problem.json``; None (or ``none``)
            skips it.
        prompts_helpful: Helpfulness prompt set, e.g. ``eval/helpful_problem.json``; None (or ``none``) skips it.
        reward_model: Reward model folder (sequence classification) for the reward_cost judge (None: no helpfulness
            scores).
        cost_model: Cost model folder (sequence classification) for the reward_cost judge (None: no harmlessness
            scores).
        generation: Decoding settings (a mapping of their fields is accepted); its seed also seeds the bootstrap and
            the Elo orders.
        judges: Any of reward_cost, llm, implicit ('none': only the per-answer safety_judges and the suites).
        judge_url: The llm judge's OpenAI-compatible endpoint (base URL or .../chat/completions).
        judge_model: Model name sent to the endpoint.
        judge_api_key_env: Environment variable with the endpoint's API key.
        judge_local: A local causal LM folder used as the llm judge (greedy).
        judge_repeats: Judgements per answer order.
        judge_single_order: Judge only with the model's answer first.
        judge_max_tokens: Most generated tokens per judgement.
        judge_temperature: Sampling temperature of the endpoint.
        implicit: Held-out pair sets of the implicit judge: ``{set name: pair_dataloader keyword arguments}`` (e.g.
            ``{safety: {train_files: [...], source: pku, objective: safe, max_pairs: 24}}``); a set's ``models``
            key (a list of model names) scores only those models on it (default: every evaluated model); its
            ``against`` key (``{model: other model}``) also measures a model with another scored model as the
            reference (SACPO's step 2 against step 1), from the same passes.
        implicit_reference: Model spec of the implicit-reward reference (default: the baseline's spec).
        implicit_precision: ``float32`` (exact), ``bf16`` (bf16 autocast: about twice as fast on hardware with native
            bf16, with rounding noise that in expectation pulls the accuracy toward 0.5; see
            :func:`~sacpo_lightning.evaluation.implicit.implicit_accuracies`) or ``auto`` (bf16 where it is native,
            else float32).
        training_logs: STAGE=metrics.csv items (or a mapping) for training_curves.png.
        score_batch_size: Batch size of the score models.
        score_dtype: Load dtype of the score models (None: as saved).
        bootstrap_samples: Bootstrap resamples of the win-rate intervals.
        confidence: Confidence level of the intervals.
        elo_shuffles: Random match orders averaged by Elo.
        elo_k: Elo update size.
        tie_eps: Score differences within this are ties.
        safety_judges: Per-answer safety judges: guard:MODEL_DIR (Llama Guard style causal LM),
            classifier:MODEL_DIR (cost model or safety classifier), refusal (rule-based), or a mapping (JSON object)
            with more settings (see :func:`~sacpo_lightning.evaluation.safety_judges.build_safety_judge`).
        safety_threshold: b of the constraint E[safety] >= b (safety = fraction of answers judged safe by the first
            unsafe judge); each model gets meets, fails or undetermined.
        predicted_safety: NAME=budget.json items (the budget solver's lambda_star and predicted_safety for model
            NAME), or a mapping ``{model name: {lambda, safety}}``, shown next to the measured safety.
        safety_against: MODEL=OTHER items (or a mapping ``{model: other model}``): pairs compared answer by answer
            on the safety prompts by the first unsafe judge, with a paired bootstrap interval of the change in the
            unsafe rate (SACPO's step 2 against step 1); every model is also compared with the baseline.
        safety_constraint_on: verdicts or probabilities: the scale of safety_threshold (see
            :func:`~sacpo_lightning.evaluation.report.safety_section`).
        suites: Built-in suites to run: xstest (over-refusal on safe prompts that only look unsafe, unsafe compliance
            on their unsafe contrasts; xstest.csv, xstest.json, xstest.png).
        xstest_prompts: XSTest prompt file: CSV with the columns id,prompt,type,label (safe or unsafe), focus and
            note optional; a relative path is read from the working directory.
        xstest_per_type: Use at most this many XSTest prompts per type (a deterministic stratified subset).

    Raises:
        UserError: A value of the wrong type or out of range, an unknown judge or suite, or a judge without what it
            needs; the message names the setting.
    """

    prompts_safety: str | None = None
    prompts_helpful: str | None = None
    reward_model: str | None = None
    cost_model: str | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    judges: list[Literal["reward_cost", "llm", "implicit", "none"]] = field(default_factory=lambda: ["reward_cost"])
    judge_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"
    judge_local: str | None = None
    judge_repeats: int = 1
    judge_single_order: bool = False
    judge_max_tokens: int = 512
    judge_temperature: float = 0.0
    implicit: dict[str, dict[str, Any]] | None = None
    implicit_reference: str | None = None
    implicit_precision: Literal["float32", "bf16", "auto"] = "float32"
    training_logs: list[str] | dict[str, str] = field(default_factory=dict)
    score_batch_size: int = 8
    score_dtype: str | None = None
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    elo_shuffles: int = 100
    elo_k: float = 32.0
    tie_eps: float = 1e-6
    safety_judges: list[str | dict[str, Any]] = field(default_factory=list)
    safety_threshold: float | None = None
    predicted_safety: list[str] | dict[str, dict[str, Any]] = field(default_factory=dict)
    safety_against: list[str] | dict[str, str] = field(default_factory=dict)
    safety_constraint_on: Literal["verdicts", "probabilities"] = "verdicts"
    suites: list[Literal["xstest"]] = field(default_factory=list)
    xstest_prompts: str = DEFAULT_XSTEST_PROMPTS
    xstest_per_type: int | None = None

    def __post_init__(self) -> None:
        self._normalise()
        self._check_types()
        self._check_judges()
        self._check_suites()
        self._check_safety()
        for name in ("score_batch_size", "bootstrap_samples", "elo_shuffles", "judge_repeats", "judge_max_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.confidence < 1.0:
            raise UserError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.tie_eps < 0:
            raise UserError(f"tie_eps must be >= 0, got {self.tie_eps}")

    def _normalise(self) -> None:
        """The accepted spellings (``none`` prompt sets, a mapping of generation settings, NAME=VALUE items,
        KIND:MODEL safety judges) to one form each."""
        for name in ("prompts_safety", "prompts_helpful"):
            if getattr(self, name) in _NONE:
                setattr(self, name, None)
        if isinstance(self.generation, Mapping):
            known = [f.name for f in fields(GenerationSettings)]
            unknown = sorted(set(self.generation) - set(known))
            if unknown:
                raise UserError(f"generation: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
            self.generation = GenerationSettings(**self.generation)
        elif self.generation is None:
            self.generation = GenerationSettings()
        for name in ("judges", "suites", "safety_judges"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise UserError(f"{name} must be a list, got {value!r}")
        self.judges = [j for j in self.judges if j != "none"]
        self.suites = list(dict.fromkeys(self.suites))
        self.safety_judges = [parse_safety_judge_arg(j) if isinstance(j, str) else j for j in self.safety_judges]
        if not all(isinstance(j, Mapping) for j in self.safety_judges):
            raise UserError(f"safety_judges must list KIND[:MODEL] strings or mappings like {{kind: refusal}}, got "
                            f"{self.safety_judges!r}")
        self.safety_judges = [dict(j) for j in self.safety_judges]
        if not isinstance(self.training_logs, Mapping):
            self.training_logs = _name_value_items("training_logs", self.training_logs, "STAGE=PATH/metrics.csv")
        self.training_logs = dict(self.training_logs)
        if not isinstance(self.predicted_safety, Mapping):
            self.predicted_safety = _read_predictions(self.predicted_safety)
        self.predicted_safety = dict(self.predicted_safety)
        if not isinstance(self.safety_against, Mapping):
            if isinstance(self.safety_against, str) or not isinstance(self.safety_against, Sequence):
                raise UserError(f"safety_against must map model names to model names (e.g. {{safety_budget: "
                                f"reward}}), got {self.safety_against!r}")
            self.safety_against = _name_value_items("safety_against", self.safety_against, "MODEL=OTHER")
        if not all(isinstance(k, str) and isinstance(v, str) and k != v for k, v in self.safety_against.items()):
            raise UserError(f"safety_against must map model names to other model names (e.g. {{safety_budget: "
                            f"reward}}), got {self.safety_against!r}")
        self.safety_against = dict(self.safety_against)
        if self.implicit_precision not in ("float32", "bf16", "auto"):
            raise UserError(f"implicit_precision must be float32, bf16 or auto, got {self.implicit_precision!r}")
        if self.implicit is not None:
            if not isinstance(self.implicit, Mapping) or not all(isinstance(v, Mapping)
                                                                 for v in self.implicit.values()):
                raise UserError("implicit must map set names to pair_dataloader settings, e.g. {safety: "
                                f"{{train_files: [...], source: pku, objective: safe}}}}, got {self.implicit!r}")
            self.implicit = {name: dict(spec) for name, spec in self.implicit.items()}
            for name, spec in self.implicit.items():
                chosen = spec.get("models")
                if chosen is not None and (isinstance(chosen, str) or not isinstance(chosen, Sequence)
                                           or not chosen or not all(isinstance(m, str) for m in chosen)):
                    raise UserError(f"implicit.{name}.models must be a non-empty list of model names, got "
                                    f"{chosen!r}")
                against = spec.get("against")
                if against is not None and (not isinstance(against, Mapping) or not all(
                        isinstance(k, str) and isinstance(v, str) for k, v in against.items())):
                    raise UserError(f"implicit.{name}.against must map model names to model names (e.g. "
                                    f"{{safety_budget: reward}}), got {against!r}")

    def _check_types(self) -> None:
        """Types a YAML mapping can get wrong (the command line is typed by its parser)."""
        hints = {"judge_repeats": int, "judge_max_tokens": int, "score_batch_size": int, "bootstrap_samples": int,
                 "elo_shuffles": int, "xstest_per_type": int, "judge_temperature": float, "confidence": float,
                 "elo_k": float, "tie_eps": float, "safety_threshold": float, "judge_single_order": bool}
        for name, kind in hints.items():
            value = getattr(self, name)
            if value is None and name in ("xstest_per_type", "safety_threshold"):
                continue
            ok = isinstance(value, bool) if kind is bool else (
                not isinstance(value, bool) and isinstance(value, int if kind is int else (int, float)))
            if not ok:
                what = {int: "an integer", float: "a number", bool: "true or false"}[kind]
                raise UserError(f"{name} must be {what}, got {value!r}")
        for name in ("prompts_safety", "prompts_helpful", "reward_model", "cost_model", "judge_url", "judge_model",
                     "judge_local", "implicit_reference", "score_dtype", "xstest_prompts"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str | os.PathLike):
                raise UserError(f"{name} must be a path or name, got {value!r}")

    def _check_judges(self) -> None:
        unknown = [j for j in self.judges if j not in JUDGES]
        if unknown or not (self.judges or self.safety_judges or self.suites):
            raise UserError(f"judges must be one or more of {', '.join(JUDGES)} (or none with safety_judges or "
                            f"suites); got {list(self.judges)}")
        if "reward_cost" in self.judges and self.reward_model is None and self.cost_model is None:
            raise UserError("the reward_cost judge needs reward_model and/or cost_model")
        if "implicit" in self.judges and not self.implicit:
            raise UserError("the implicit judge needs held-out pair sets (implicit; on the command line "
                            "--implicit_helpful_pairs / --implicit_safety_pairs)")
        if self.judge_url is not None and self.judge_local is not None:
            raise UserError("judge_url and judge_local both set the llm judge's backend; give one")
        if self.judge_url is not None and not self.judge_model:
            raise UserError("judge_url needs judge_model")

    def _check_suites(self) -> None:
        unknown = [s for s in self.suites if s not in SUITES]
        if unknown:
            raise UserError(f"suites must be a list of {', '.join(SUITES)}, got {unknown}")
        if self.xstest_per_type is not None and self.xstest_per_type < 1:
            raise UserError(f"xstest_per_type must be >= 1 (or unset for every prompt), got {self.xstest_per_type}")
        if "xstest" not in self.suites and (self.xstest_per_type is not None or
                                            str(self.xstest_prompts) != DEFAULT_XSTEST_PROMPTS):
            raise UserError("xstest_prompts and xstest_per_type set the XSTest suite; add xstest to suites")
        if "xstest" in self.suites:
            self.xstest_prompts = os.path.expanduser(os.path.expandvars(str(self.xstest_prompts)))
            try:  # a missing or malformed prompt file is reported before anything is generated
                load_xstest_prompts(self.xstest_prompts, option="xstest_prompts")
            except FileNotFoundError as err:
                raise UserError(str(err)) from None

    def _check_safety(self) -> None:
        if not self.safety_judges and (self.safety_threshold is not None or self.predicted_safety):
            raise UserError("safety_threshold and predicted_safety need per-answer safety judges: add "
                            "guard:MODEL or classifier:MODEL to safety_judges")
        if self.safety_threshold is not None and not 0.0 <= self.safety_threshold <= 1.0:
            raise UserError(f"safety_threshold is a fraction of safe answers and must be in [0, 1], got "
                            f"{self.safety_threshold}")
        if self.safety_constraint_on not in CONSTRAINT_SCALES:
            raise UserError(f"safety_constraint_on must be one of {', '.join(CONSTRAINT_SCALES)}, got "
                            f"{self.safety_constraint_on!r}")

    @property
    def seed(self) -> int:
        """Seed of the bootstrap and the Elo orders: the generation seed, so one seed fixes the whole run."""
        return self.generation.seed

    @property
    def prompt_files(self) -> dict[str, str]:
        """``{set name: prompt file}`` of the prompt sets that are evaluated."""
        pairs = (("helpful", self.prompts_helpful), ("safety", self.prompts_safety))
        return {k: v for k, v in pairs if v is not None}

    @property
    def needs_generation(self) -> bool:
        """Whether the prompt sets are generated on (the suites generate on their own prompts)."""
        return any(j in self.judges for j in ("reward_cost", "llm")) or bool(self.safety_judges)

    @property
    def bootstrap(self) -> dict[str, Any]:
        """Keyword arguments of the win-rate summaries."""
        return {"n_resamples": self.bootstrap_samples, "confidence": self.confidence, "seed": self.seed}


SETTINGS_KEYS = frozenset(f.name for f in fields(EvaluationSettings))
