"""The declarative pipeline config: validated up front, expanded into a graph of stages."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from sacpo_lightning.data.prompts import BUDGET_HALF, EVALUATION_HALF
from sacpo_lightning.merge_weight import effective_lambda

STEP_CLASSES = {
    ("reward", "dpo"): "sacpo_lightning.modules.RewardDPO",
    ("reward", "kto"): "sacpo_lightning.modules.RewardKTO",
    ("safety", "dpo"): "sacpo_lightning.modules.SafetyDPO",
    ("safety", "kto"): "sacpo_lightning.modules.SafetyKTO",
}
ORDERS = ("reward_first", "safety_first")


class PipelineConfigError(ValueError):
    """A pipeline config that cannot run; the message names the file and the key."""


@dataclass
class StepSpec:
    """One alignment step as composed LightningCLI configs.

    Args:
        algorithm: ``dpo`` or ``kto``; selects the step module (with the step's role, reward or safety).
        configs: LightningCLI YAML files composed in order (paths relative to the working directory).
        overrides: A nested mapping merged last (e.g. ``{trainer: {max_steps: 40}}``).
    """

    algorithm: Literal["dpo", "kto"] = "dpo"
    configs: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeSpec:
    """P-SACPO merges of the step-1 model with step-2 models.

    Args:
        weights: Merge weights q in [0, 1] (q=1 is the step-2 model; q*lambda is the effective multiplier).
        lambdas: Which step-2 lambdas to merge with (default: all of the grid).
        naive: Also merge the step-1 model with a safety-only model aligned from the SFT model (baseline).
        kl_prompts: Prompt file on which the token-level mixture and the weight merge are compared (mean KL per token).
        kl_max_prompts: How many of those prompts to use.
        dtype: Dtype of merged weights (default: that of the inputs).
    """

    weights: list[float] = field(default_factory=list)
    lambdas: list[float] | None = None
    naive: bool = False
    kl_prompts: str | None = None
    kl_max_prompts: int = 8
    dtype: str | None = None




@dataclass
class BudgetSpec:
    """``safety_budget``: choose lambda for a safety threshold instead of guessing it from a grid.

    After step 1 the pipeline samples ``samples_per_prompt`` answers per prompt from the step-1 model, scores them
    with the cost model (``g = sigmoid(-cost)`` with ``safety_transform: prob_safe``, so ``b`` is a target mean
    probability of being safe), solves the dual for lambda* (:mod:`sacpo_lightning.budget`) and trains step 2 at
    lambda* (stage ``safety_budget``), beside any ``lambdas`` grid.

    Args:
        b: The threshold of ``E[g] >= b``.
        samples_per_prompt: K samples per prompt of the step-1 model (>= 2; default 16: fewer bias lambda* upward).
        prompts: Prompt file (JSON list or JSON lines with ``prompt``).
        max_prompts: Use an evenly spaced subset of this many prompts.
        safety_transform: ``prob_safe`` or ``neg_cost`` (see :func:`sacpo_lightning.budget.safety_from_cost`).
        max_new_tokens: Length of the sampled answers.
        batch_size: Generation batch size.
        cost_model: Cost model folder, or ``stage:cost_model`` (default when ``evaluate.cost_model`` is trained).
        reward_model: Reward model folder or ``stage:reward_model`` (only reported along the curve).
        lam_max: Largest lambda searched.
        merge_weights: P-SACPO merges of step 1 with the lambda* model at these q; the evaluation picks the smallest
            loss of helpfulness among those whose measured safety meets ``b``.
        seed: Sampling seed (and the bootstrap's).
        allow_at_max: Train step 2 at ``lam_max`` when lambda* lies beyond it (its predicted safety is below ``b``);
            by default such a budget is skipped like an infeasible one.
        allow_approximate_loss: Accept a step-2 loss whose optimum is not the Gibbs tilt ``pi_r exp(lambda h /
            beta)`` the budget solves for (KTO, IPO, hinge, label smoothing): lambda* then only approximates.
        heldout_evaluation: When the evaluation's ``prompts_safety`` is the same file as ``prompts``, the budget
            samples the prompts at even positions of the file and the evaluation measures on those at odd
            positions, so the measured safety of the lambda* model is not read off the prompts that chose lambda*.
            ``false`` lets both use the whole file.
    """

    b: float
    samples_per_prompt: int = 16
    prompts: str = ""
    max_prompts: int | None = None
    safety_transform: str = "prob_safe"
    max_new_tokens: int = 64
    batch_size: int = 8
    cost_model: str | None = None
    reward_model: str | None = None
    lam_max: float | None = None
    merge_weights: list[float] = field(default_factory=list)
    seed: int = 0
    allow_at_max: bool = False
    allow_approximate_loss: bool = False
    heldout_evaluation: bool = True


# derived from the dataclass, so a new budget setting is a known key
BUDGET_KEYS = frozenset(f.name for f in fields(BudgetSpec))

# logger kind -> (the module it needs, the sacpo-lightning extra that installs it); csv needs nothing extra
LOGGER_KINDS = {"csv": None, "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                "mlflow": ("mlflow", "mlflow")}


@dataclass
class LoggerSpec:
    """``logger``: where every training stage logs (through Lightning's loggers), and where the pipeline logs the
    budget's lambda*, the evaluation's headline numbers and its plots at the end.

    Training stages always keep their CSV log (``stages/<name>/logs/version_N/metrics.csv``, which the evaluation's
    training curves read); another kind is added beside it. The logger is not part of a stage's input hash: changing
    it reruns no stage.

    Args:
        kind: ``csv`` (the default), ``tensorboard`` (``<output>/tensorboard/<stage>/``), ``wandb`` (runs named
            after the stages, grouped by the output folder's name; files in ``<output>/wandb``) or ``mlflow`` (runs
            named after the stages).
        project: The W&B project or the MLflow experiment (default ``sacpo``).
        offline: W&B only: write the runs locally (``wandb sync`` uploads them later).
        tracking_uri: MLflow only: the tracking server or store (default: a SQLite store,
            ``<output>/mlruns/mlflow.db``, with the artifacts in ``<output>/mlruns/artifacts``).
    """

    kind: str = "csv"
    project: str | None = None
    offline: bool = False
    tracking_uri: str | None = None


LOGGER_KEYS = frozenset(f.name for f in fields(LoggerSpec))
# the keys other than kind that each kind reads
LOGGER_KIND_KEYS = {"csv": set(), "tensorboard": set(), "wandb": {"project", "offline"},
                    "mlflow": {"project", "tracking_uri"}}


@dataclass
class PipelineConfig:
    """A SACPO pipeline.

    Args:
        sft: The SFT model (named local model, folder or Hub id) every branch starts from.
        beta: KL coefficient of the helpfulness step; safety steps use ``beta / lambda``.
        lambdas: The lambda grid (one safety run per value).
        reward_step: How to run the helpfulness step.
        safety_step: How to run the safety step.
        orders: ``reward_first`` (SACPO) and/or ``safety_first`` (the swapped order).
        merge: P-SACPO merges.
        baselines: One-step baselines from the SFT model: ``safety_only`` (per lambda). The helpfulness-only baseline
            is the step-1 model itself.
        evaluate: Settings of the evaluation stage (see ``sacpo_lightning.evaluation``); absent means no evaluation.
        safety_budget: Choose lambda for a safety threshold (:class:`BudgetSpec`).
        logger: Where the training stages and the pipeline's results are logged (:class:`LoggerSpec`; YAML: a kind,
            e.g. ``logger: tensorboard``, or a mapping, e.g. ``{kind: wandb, project: sacpo, offline: true}``).
        export_plain: Also write each model the pipeline evaluates as a plain Hugging Face folder (adapter chains
            merged into the base), ``<output>/plain/<name>/``, after the evaluation when there is one (stage
            ``export_plain``).
    """

    sft: str
    beta: float
    lambdas: list[float]
    reward_step: StepSpec
    safety_step: StepSpec
    orders: list[str] = field(default_factory=lambda: ["reward_first"])
    merge: MergeSpec = field(default_factory=MergeSpec)
    baselines: list[str] = field(default_factory=list)
    evaluate: dict[str, Any] | None = None
    safety_budget: BudgetSpec | None = None
    logger: LoggerSpec = field(default_factory=LoggerSpec)
    export_plain: bool = False
    source: str = "<config>"


# derived from the dataclass (``source`` is where the config was read from, not a key)
PIPELINE_KEYS = frozenset(f.name for f in fields(PipelineConfig)) - {"source"}


@dataclass
class Stage:
    """A node of the pipeline graph."""

    name: str
    kind: Literal["train", "merge", "evaluate", "budget", "export"]
    depends_on: list[str]
    reference: str  # the model the stage starts from: a stage name or the SFT model
    config: dict[str, Any]
    description: str = ""


def _expand(value: str) -> str:
    return os.path.expanduser(os.path.expandvars(value))


def _require(cond: bool, source: str, key: str, message: str) -> None:
    if not cond:
        raise PipelineConfigError(f"{source}: {key}: {message}")


def load_pipeline_config(path: str | os.PathLike) -> PipelineConfig:
    """Reads and validates a pipeline YAML; every error names the file and the key."""
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise PipelineConfigError(f"{source}: no such pipeline config file") from err
    except yaml.YAMLError as err:
        raise PipelineConfigError(f"{source}: not valid YAML: {err}") from err
    _require(isinstance(raw, dict), source, "<top>", "expected a mapping of pipeline settings")
    unknown = sorted(set(raw) - PIPELINE_KEYS)
    _require(not unknown, source, ", ".join(unknown), f"unknown key(s); known keys: {', '.join(sorted(PIPELINE_KEYS))}")
    for key in ("sft", "beta", "lambdas", "reward_step", "safety_step"):
        _require(key in raw, source, key, "required")
    _require(isinstance(raw["sft"], str) and raw["sft"].strip() != "", source, "sft", "must be a model name or path")
    beta = raw["beta"]
    _require(isinstance(beta, int | float) and beta > 0, source, "beta", f"must be a number > 0, got {beta!r}")
    lambdas = _load_lambdas(raw, source)
    steps = {key: _load_step(raw[key], source, key) for key in ("reward_step", "safety_step")}
    orders = raw.get("orders", ["reward_first"])
    _require(isinstance(orders, list) and orders, source, "orders", f"must be a non-empty list of {ORDERS}")
    for order in orders:
        _require(order in ORDERS, source, "orders", f"unknown order {order!r}; allowed: {', '.join(ORDERS)}")
    merge = _load_merge(raw.get("merge") or {}, source, lambdas, orders)
    baselines = raw.get("baselines") or []
    _require(isinstance(baselines, list), source, "baselines", "must be a list")
    for b in baselines:
        _require(b in ("safety_only",), source, "baselines", f"unknown baseline {b!r}; allowed: safety_only")
    evaluate = _load_evaluate(raw.get("evaluate"), source)
    budget = _load_budget(raw.get("safety_budget"), source, orders, evaluate, steps["safety_step"])
    logger = _load_logger(raw.get("logger"), source)
    if "logger" in raw:
        _check_no_step_logger(steps, evaluate, source)
    export_plain = raw.get("export_plain", False)
    _require(isinstance(export_plain, bool), source, "export_plain", f"must be true or false, got {export_plain!r}")
    return PipelineConfig(
        sft=raw["sft"], beta=float(beta), lambdas=[float(x) for x in lambdas], reward_step=steps["reward_step"],
        safety_step=steps["safety_step"], orders=orders, merge=merge, baselines=baselines, evaluate=evaluate,
        safety_budget=budget, logger=logger, export_plain=export_plain, source=source,
    )


def _load_logger(raw: Any, source: str) -> LoggerSpec:
    """``logger: KIND`` or ``logger: {kind: KIND, ...}``; the package a kind needs must import now, before any
    training."""
    from sacpo_lightning.errors import MissingDependencyError, require_extra

    if raw is None:
        return LoggerSpec()
    if isinstance(raw, str):
        raw = {"kind": raw}
    _require(isinstance(raw, dict), source, "logger",
             f"must be a logger kind ({', '.join(LOGGER_KINDS)}) or a mapping with kind, project, offline, "
             f"tracking_uri; got {raw!r}")
    unknown = sorted(set(raw) - LOGGER_KEYS)
    _require(not unknown, source, f"logger.{','.join(unknown)}",
             f"unknown key(s); known keys: {', '.join(sorted(LOGGER_KEYS))}")
    kind = raw.get("kind", "csv")
    _require(kind in LOGGER_KINDS, source, "logger.kind", f"unknown logger {kind!r}; known: {', '.join(LOGGER_KINDS)}")
    unused = sorted(set(raw) - {"kind"} - LOGGER_KIND_KEYS[kind])
    _require(not unused, source, f"logger.{','.join(unused)}",
             f"not read by the {kind} logger (it reads: {', '.join(sorted(LOGGER_KIND_KEYS[kind])) or 'only kind'})")
    spec = LoggerSpec(**raw)
    for name in ("project", "tracking_uri"):
        value = getattr(spec, name)
        _require(value is None or (isinstance(value, str) and value.strip() != ""), source, f"logger.{name}",
                 f"must be a non-empty string, got {value!r}")
    _require(isinstance(spec.offline, bool), source, "logger.offline", f"must be true or false, got {spec.offline!r}")
    if LOGGER_KINDS[kind] is not None:
        module, extra = LOGGER_KINDS[kind]
        try:
            require_extra(module, extra=extra, feature=f"logger: {kind}", alternative="Or use logger: csv.")
        except MissingDependencyError as err:
            raise PipelineConfigError(f"{source}: logger: {err}") from err
    return spec


def _check_no_step_logger(steps: dict[str, StepSpec], evaluate: dict[str, Any] | None, source: str) -> None:
    """With the pipeline's ``logger`` set, a step config may not set its own ``trainer.logger`` (one place only)."""
    specs = dict(steps)
    for key in ("reward_model", "cost_model"):
        value = (evaluate or {}).get(key)
        if isinstance(value, dict):
            specs[f"evaluate.{key}"] = StepSpec(configs=[_expand(c) for c in value.get("configs", [])],
                                                overrides=value.get("overrides") or {})
    for key, spec in specs.items():
        if "logger" in (compose_step_config(spec).get("trainer") or {}):
            raise PipelineConfigError(
                f"{source}: {key}: its composed configs ({', '.join(spec.configs)}) set trainer.logger, and the "
                "pipeline sets logger too; remove one of them (the pipeline's logger applies to every stage)"
            )


def _load_lambdas(raw: dict[str, Any], source: str) -> list:
    lambdas = raw["lambdas"]
    _require(isinstance(lambdas, list) and (len(lambdas) > 0 or raw.get("safety_budget") is not None), source,
             "lambdas", "must be a non-empty list (or [] with a safety_budget, which chooses lambda)")
    for lam in lambdas:
        _require(isinstance(lam, int | float) and lam > 0, source, "lambdas", f"every lambda must be > 0, got {lam!r}")
    _require(len(set(lambdas)) == len(lambdas), source, "lambdas", "values must be distinct")
    return lambdas


def _load_step(spec: Any, source: str, key: str) -> StepSpec:
    _require(isinstance(spec, dict), source, key, "must be a mapping with algorithm, configs, overrides")
    extra = sorted(set(spec) - {"algorithm", "configs", "overrides"})
    _require(not extra, source, f"{key}.{','.join(extra)}", "unknown key(s); use algorithm, configs, overrides")
    algorithm = spec.get("algorithm", "dpo")
    _require(algorithm in ("dpo", "kto"), source, f"{key}.algorithm", f"must be dpo or kto, got {algorithm!r}")
    configs = spec.get("configs", [])
    _require(isinstance(configs, list) and configs, source, f"{key}.configs", "must list at least one YAML file")
    for cfg in configs:
        _require(Path(_expand(cfg)).is_file(), source, f"{key}.configs", f"file {cfg!r} does not exist")
    overrides = spec.get("overrides") or {}
    _require(isinstance(overrides, dict), source, f"{key}.overrides", "must be a mapping")
    step = StepSpec(algorithm=algorithm, configs=[_expand(c) for c in configs], overrides=overrides)
    _check_step_class(step, key.removesuffix("_step"), source, key)
    return step


def _load_merge(merge_raw: Any, source: str, lambdas: list, orders: list[str]) -> MergeSpec:
    _require(isinstance(merge_raw, dict), source, "merge", "must be a mapping")
    extra = sorted(set(merge_raw) - {"weights", "lambdas", "naive", "kl_prompts", "kl_max_prompts", "dtype"})
    _require(not extra, source, f"merge.{','.join(extra)}", "unknown key(s)")
    merge = MergeSpec(**merge_raw)
    for q in merge.weights:
        _require(isinstance(q, int | float) and 0 <= q <= 1, source, "merge.weights", f"q must be in [0, 1], got {q!r}")
    if merge.lambdas is not None:
        for lam in merge.lambdas:
            _require(lam in lambdas, source, "merge.lambdas", f"{lam!r} is not in the lambdas grid {lambdas}")
    if merge.weights:
        _require("reward_first" in orders, source, "merge", "merges need the reward_first order")
    if merge.kl_prompts is not None:
        merge.kl_prompts = _expand(merge.kl_prompts)
        _require(Path(merge.kl_prompts).is_file(), source, "merge.kl_prompts", f"file {merge.kl_prompts!r} not found")
    return merge


def _load_evaluate(evaluate: Any, source: str) -> dict[str, Any] | None:
    _require(evaluate is None or isinstance(evaluate, dict), source, "evaluate", "must be a mapping or absent")
    if evaluate is None:
        return None
    from sacpo_lightning.evaluation.pipeline_stage import evaluation_settings

    for key in ("reward_model", "cost_model"):
        value = evaluate.get(key)
        if isinstance(value, dict):
            _require(set(value) <= {"configs", "overrides"}, source, f"evaluate.{key}",
                     "a score model is a folder path or a mapping with configs and overrides")
            for cfg_file in value.get("configs", []):
                _require(Path(_expand(cfg_file)).is_file(), source, f"evaluate.{key}.configs",
                         f"file {cfg_file!r} does not exist")
        else:
            _require(value is None or isinstance(value, str), source, f"evaluate.{key}", "must be a path or a mapping")
    for key in ("prompts_safety", "prompts_helpful"):
        if isinstance(evaluate.get(key), str) and evaluate[key] not in ("", "none", "None"):
            _require(Path(_expand(evaluate[key])).is_file(), source, f"evaluate.{key}",
                     f"file {evaluate[key]!r} not found")
    # The settings' own checks (keys, types, ranges, the XSTest prompt file), with a trained score model standing in
    # for the folder it will be, so that a mistake stops the pipeline before any training.
    checked = {key: f"stage:{key}" if key in ("reward_model", "cost_model") and isinstance(value, dict) else value
               for key, value in evaluate.items()}
    try:
        evaluation_settings(checked, {"sft": "sft"}, None)
    except (FileNotFoundError, ValueError) as err:
        raise PipelineConfigError(f"{source}: {err}") from None
    return evaluate


def _load_budget(
    raw: Any, source: str, orders: list[str], evaluate: dict[str, Any] | None, safety_step: StepSpec
) -> BudgetSpec | None:
    if raw is None:
        return None
    key = "safety_budget"
    _require(isinstance(raw, dict), source, key, "must be a mapping with b, samples_per_prompt, prompts, ...")
    extra = sorted(set(raw) - BUDGET_KEYS)
    _require(not extra, source, f"{key}.{','.join(extra)}", f"unknown key(s); known: {sorted(BUDGET_KEYS)}")
    for name in ("b", "prompts"):
        _require(name in raw, source, f"{key}.{name}", "required")
    _require("reward_first" in orders, source, key, "the safety budget needs the reward_first order")
    spec = BudgetSpec(**raw)
    _require(isinstance(spec.b, int | float), source, f"{key}.b", f"must be a number, got {spec.b!r}")
    if spec.safety_transform == "prob_safe":
        _require(0 < spec.b < 1, source, f"{key}.b", f"with safety_transform prob_safe b is a probability in (0, 1), "
                 f"got {spec.b!r}")
    _require(spec.safety_transform in ("prob_safe", "neg_cost"), source, f"{key}.safety_transform",
             f"must be prob_safe or neg_cost, got {spec.safety_transform!r}")
    _require(isinstance(spec.samples_per_prompt, int) and spec.samples_per_prompt >= 2, source,
             f"{key}.samples_per_prompt", f"must be an integer >= 2, got {spec.samples_per_prompt!r}")
    spec.prompts = _expand(str(spec.prompts))
    _require(Path(spec.prompts).is_file(), source, f"{key}.prompts", f"file {spec.prompts!r} not found")
    for q in spec.merge_weights:
        _require(isinstance(q, int | float) and 0 < q < 1, source, f"{key}.merge_weights",
                 f"q must be in (0, 1), got {q!r}")
    trained = evaluate or {}
    for name in ("cost_model", "reward_model"):
        value = getattr(spec, name)
        if value is None and isinstance(trained.get(name), dict):
            setattr(spec, name, f"stage:{name}")
        elif isinstance(value, str) and not value.startswith("stage:"):
            setattr(spec, name, _expand(value))
            _require(Path(getattr(spec, name)).is_dir(), source, f"{key}.{name}", f"folder {value!r} not found")
    _require(spec.cost_model is not None, source, f"{key}.cost_model",
             "required: a cost model folder, or train one with evaluate.cost_model")
    for name in ("allow_at_max", "allow_approximate_loss", "heldout_evaluation"):
        _require(isinstance(getattr(spec, name), bool), source, f"{key}.{name}",
                 f"must be true or false, got {getattr(spec, name)!r}")
    _check_budget_loss(spec, safety_step, source)
    if evaluate is not None:
        # the evaluation checks every model against b, which needs per-answer safety judges
        _require(bool(evaluate.get("safety_judges")), source, "evaluate.safety_judges",
                 "a safety_budget pipeline's evaluation checks the measured safety against b and needs per-answer "
                 "safety judges: add e.g. safety_judges: [{kind: cost_model, model: cost_model}] (or remove evaluate)")
    return spec


def _check_budget_loss(spec: BudgetSpec, safety_step: StepSpec, source: str) -> None:
    """The budget's lambda* assumes step 2 reaches ``pi_r exp(lambda h / beta)``: DPO's sigmoid loss without label
    smoothing on Bradley-Terry pairs does; KTO, IPO, hinge and label-smoothed DPO do not."""
    if spec.allow_approximate_loss:
        return
    init = ((compose_step_config(safety_step).get("model") or {}).get("init_args") or {})
    loss = "kto" if safety_step.algorithm == "kto" else init.get("loss", "sigmoid")
    smoothing = init.get("label_smoothing", 0.0) if safety_step.algorithm != "kto" else 0.0
    if loss == "sigmoid" and not smoothing:
        return
    what = f"loss {loss!r}" if loss != "sigmoid" else f"DPO with label_smoothing {smoothing!r}"
    raise PipelineConfigError(
        f"{source}: safety_budget: the safety step trains with {what}, whose optimum is not the tilt pi_r exp(lambda "
        "h / beta) that the budget's lambda* is solved for (only DPO's sigmoid loss without label smoothing reaches "
        "it); use safety_step with algorithm dpo and model.init_args.loss sigmoid, or set "
        "safety_budget.allow_approximate_loss: true to accept lambda* as an approximation"
    )


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merges mappings (``update`` wins); lists and scalars are replaced, as with composed --config."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def compose_step_config(spec: StepSpec) -> dict[str, Any]:
    """The step's YAML files merged in order, then its overrides."""
    config: dict[str, Any] = {}
    for path in spec.configs:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise PipelineConfigError(f"{path}: expected a LightningCLI config mapping")
        config = deep_merge(config, loaded)
    return deep_merge(config, spec.overrides)


def lam_tag(lam: float) -> str:
    return f"{lam:g}"


def _check_step_class(spec: StepSpec, role: str, source: str, key: str) -> None:
    """The composed step config must name the step module of its role and algorithm (or none, and get it): a
    ``class_path`` that disagrees is an error, never silently replaced; so is a ``data.kind`` that disagrees."""
    composed = compose_step_config(spec)
    expected = STEP_CLASSES[(role, spec.algorithm)]
    class_path = (composed.get("model") or {}).get("class_path")
    if class_path is not None and class_path.rsplit(".", 1)[-1] != expected.rsplit(".", 1)[-1]:
        raise PipelineConfigError(
            f"{source}: {key}: the composed configs ({', '.join(spec.configs)}) set model.class_path {class_path}, but "
            f"a {role} step with algorithm {spec.algorithm} is {expected}; change {key}.algorithm or the configs."
        )
    kind = (composed.get("data") or {}).get("kind")
    wanted = "kto" if spec.algorithm == "kto" else "pairs"
    if kind is not None and kind != wanted:
        raise PipelineConfigError(f"{source}: {key}: the composed configs set data.kind {kind!r}, but algorithm "
                                  f"{spec.algorithm} trains on {wanted!r} data; fix data.kind or {key}.algorithm.")


def _train_stage(
    name: str, role: str, spec: StepSpec, base_config: dict, start: str, upstream: list[str], coefficients: dict,
    description: str,
) -> Stage:
    config = copy.deepcopy(base_config)
    model = config.setdefault("model", {})
    model["class_path"] = STEP_CLASSES[(role, spec.algorithm)]
    init = model.setdefault("init_args", {})
    init.update(coefficients)
    init.setdefault("policy", {})["name_or_path"] = start
    config.setdefault("data", {})["kind"] = "kto" if spec.algorithm == "kto" else "pairs"
    return Stage(name=name, kind="train", depends_on=upstream, reference=start, config=config, description=description)


def build_stages(cfg: PipelineConfig) -> list[Stage]:
    """Expands the config into stages in dependency order. Model references to other stages are written as
    ``stage:<name>`` and resolved to export folders by the runner."""
    reward_cfg = compose_step_config(cfg.reward_step)
    safety_cfg = compose_step_config(cfg.safety_step)
    stages: list[Stage] = []
    names: set[str] = set()

    def add(stage: Stage) -> None:
        if stage.name not in names:
            stages.append(stage)
            names.add(stage.name)

    sft = cfg.sft
    if "reward_first" in cfg.orders:
        add(_train_stage("reward", "reward", cfg.reward_step, reward_cfg, sft, [], {"beta": cfg.beta},
                         f"step 1: helpfulness ({cfg.reward_step.algorithm}, beta={cfg.beta:g}) from the SFT model"))
        for lam in cfg.lambdas:
            add(_train_stage(
                f"safety_lam{lam_tag(lam)}", "safety", cfg.safety_step, safety_cfg, "stage:reward", ["reward"],
                {"beta": cfg.beta, "lam": lam, "expected_reference": "reward_step"},
                f"step 2: safety ({cfg.safety_step.algorithm}, beta/lambda={cfg.beta / lam:g}) from step 1",
            ))
    needs_safety_only = "safety_first" in cfg.orders or "safety_only" in cfg.baselines or cfg.merge.naive
    if needs_safety_only:
        for lam in cfg.lambdas:
            add(_train_stage(
                f"safety_only_lam{lam_tag(lam)}", "safety", cfg.safety_step, safety_cfg, sft, [],
                {"beta": cfg.beta, "lam": lam, "expected_reference": "sft"},
                f"safety only ({cfg.safety_step.algorithm}, beta/lambda={cfg.beta / lam:g}) from the SFT model",
            ))
    if "safety_first" in cfg.orders:
        for lam in cfg.lambdas:
            first = f"safety_only_lam{lam_tag(lam)}"
            add(_train_stage(
                f"swapped_lam{lam_tag(lam)}", "reward", cfg.reward_step, reward_cfg, f"stage:{first}", [first],
                {"beta": cfg.beta, "expected_reference": "safety_step"},
                f"swapped order: helpfulness (beta={cfg.beta:g}) after safety (lambda={lam:g})",
            ))
    if cfg.safety_budget is not None:
        _add_budget_stages(cfg, safety_cfg, add)
    merge_lams = cfg.merge.lambdas if cfg.merge.lambdas is not None else cfg.lambdas
    for lam in merge_lams if cfg.merge.weights else []:
        for q in cfg.merge.weights:
            other = f"safety_lam{lam_tag(lam)}"
            add(Stage(
                name=f"merge_lam{lam_tag(lam)}_q{q:g}", kind="merge", depends_on=["reward", other],
                reference="stage:reward",
                config={"base": "stage:reward", "other": f"stage:{other}", "q": q, "lam": lam,
                        "lam_effective": effective_lambda(q, lam), "kl_prompts": cfg.merge.kl_prompts,
                        "kl_max_prompts": cfg.merge.kl_max_prompts, "dtype": cfg.merge.dtype},
                description=(f"P-SACPO: step 1 merged with step 2 (lambda={lam:g}) at q={q:g} ~ "
                             f"lambda={effective_lambda(q, lam):g}"),
            ))
            if cfg.merge.naive:
                only = f"safety_only_lam{lam_tag(lam)}"
                add(Stage(
                    name=f"naive_merge_lam{lam_tag(lam)}_q{q:g}", kind="merge", depends_on=["reward", only],
                    reference="stage:reward",
                    config={"base": "stage:reward", "other": f"stage:{only}", "q": q, "lam": lam,
                            "kl_prompts": None, "kl_max_prompts": 0, "dtype": cfg.merge.dtype},
                    description=f"naive baseline: step 1 merged with safety-only (lambda={lam:g}) at q={q:g}",
                ))
    if cfg.evaluate is not None:
        evaluate = copy.deepcopy(cfg.evaluate)
        for key in ("reward_model", "cost_model"):
            if isinstance(evaluate.get(key), dict):
                _add_score_stage(cfg, key, add)
                evaluate[key] = f"stage:{key}"
        if budget_prompts_half(cfg) is not None:
            evaluate["safety_prompts_half"] = EVALUATION_HALF
        add(Stage(name="evaluate", kind="evaluate", depends_on=[s.name for s in stages], reference=sft,
                  config=evaluate, description="evaluation of every produced model against the SFT model"))
    if cfg.export_plain:
        models = evaluated_stage_names(stages)
        after = models + (["evaluate"] if cfg.evaluate is not None else [])
        add(Stage(name=EXPORT_PLAIN, kind="export", depends_on=after, reference=sft,
                  config={"models": {name: f"stage:{name}" for name in models}},
                  description=f"plain Hugging Face folders of {', '.join(models)} (plain/<name>/)"))
    return stages


EXPORT_PLAIN = "export_plain"
SCORE_MODEL_STAGES = ("reward_model", "cost_model")


def evaluated_stage_names(stages: list[Stage]) -> list[str]:
    """The stages whose models the evaluation evaluates (beside the SFT model): every training stage and merge
    except the score models."""
    return [s.name for s in stages if s.kind in ("train", "merge") and s.name not in SCORE_MODEL_STAGES]


BUDGET_LAMBDA = "budget:lambda_star"


def budget_prompts_half(cfg: PipelineConfig) -> int | None:
    """The half of its prompt file the budget samples (:data:`BUDGET_HALF`), or None for the whole file: halves are
    used when ``heldout_evaluation`` is on and the evaluation measures safety on the same file."""
    spec = cfg.safety_budget
    if spec is None or not spec.heldout_evaluation or cfg.evaluate is None:
        return None
    measured = cfg.evaluate.get("prompts_safety")
    if not isinstance(measured, str) or not Path(_expand(measured)).is_file():
        return None
    return BUDGET_HALF if Path(_expand(measured)).resolve() == Path(spec.prompts).resolve() else None


def _add_budget_stages(cfg: PipelineConfig, safety_cfg: dict, add) -> None:
    """``budget`` (sample step 1, score, solve for lambda*) and ``safety_budget`` (step 2 at lambda*), plus the
    P-SACPO merges of ``merge_weights``. Score-model stages are added here when the budget needs them first."""
    spec = cfg.safety_budget
    upstream = ["reward"]
    for name in ("cost_model", "reward_model"):
        ref = getattr(spec, name)
        if isinstance(ref, str) and ref.startswith("stage:"):
            upstream.append(ref.split(":", 1)[1])
            _add_score_stage(cfg, ref.split(":", 1)[1], add)
    add(Stage(name="budget", kind="budget", depends_on=upstream, reference="stage:reward",
              config={"reference": "stage:reward", "beta": cfg.beta, "prompts_half": budget_prompts_half(cfg),
                      **{k: v for k, v in asdict(spec).items() if k not in ("merge_weights", "heldout_evaluation")}},
              description=f"safety budget: lambda* for E[g] >= {spec.b:g} from {spec.samples_per_prompt} samples per "
                          "prompt of step 1"))
    add(_train_stage("safety_budget", "safety", cfg.safety_step, safety_cfg, "stage:reward", ["reward", "budget"],
                     {"beta": cfg.beta, "lam": BUDGET_LAMBDA, "expected_reference": "reward_step"},
                     "step 2 at the budget's lambda* (beta/lambda* from the budget stage)"))
    for q in spec.merge_weights:
        add(Stage(
            name=f"merge_budget_q{q:g}", kind="merge", depends_on=["reward", "safety_budget"], reference="stage:reward",
            config={"base": "stage:reward", "other": "stage:safety_budget", "q": q, "lam": BUDGET_LAMBDA,
                    "kl_prompts": None, "kl_max_prompts": 0, "dtype": cfg.merge.dtype},
            description=f"P-SACPO: step 1 merged with the lambda* model at q={q:g}",
        ))


def _add_score_stage(cfg: PipelineConfig, key: str, add) -> None:
    spec = (cfg.evaluate or {}).get(key)
    if not isinstance(spec, dict):
        return
    score_cfg = compose_step_config(StepSpec(configs=[_expand(c) for c in spec.get("configs", [])],
                                             overrides=spec.get("overrides") or {}))
    start = score_cfg.get("model", {}).get("init_args", {}).get("policy", {}).get("name_or_path", cfg.sft)
    add(Stage(name=key, kind="train", depends_on=[], reference=start, config=score_cfg,
              description=f"{key.replace('_', ' ')} for offline evaluation"))


def config_hash(obj: Any) -> str:
    """A stable hash of a JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
