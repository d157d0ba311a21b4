"""``sacpo pipeline``: run the SACPO stage graph with a manifest, skipping finished stages and resuming others."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout

from sacpo_lightning.budget_sampling import BUDGET_FILE
from sacpo_lightning.data.prompts import DEFAULT_XSTEST_PROMPTS
from sacpo_lightning.errors import debug_enabled, find_user_error
from sacpo_lightning.io import atomic_write_json, atomic_write_text, file_fingerprint, is_complete_directory
from sacpo_lightning.models.card import write_model_card
from sacpo_lightning.models.classifier import SCORE_MODEL_FILE
from sacpo_lightning.models.export import STEP_METADATA
from sacpo_lightning.pipeline.config import (
    BUDGET_LAMBDA,
    PipelineConfig,
    PipelineConfigError,
    Stage,
    build_stages,
    config_hash,
    evaluated_stage_names,
    load_pipeline_config,
)
from sacpo_lightning.pipeline.results import Measure, budget_measures, evaluation_measures, measure_metrics
from sacpo_lightning.pipeline.tracking import log_results, make_log_dir, stage_env, stage_logger_config

MANIFEST = "manifest.json"
# What a stage folder holds (stages/<name>/...): every path of the pipeline's outputs is built from these.
STAGE_MARKER = "stage.json"
STAGE_CONFIG = "config.yaml"
TRAIN_LOG = "train.log"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
EXPORT_DIR = "export"
MERGE_METRICS = "merge_metrics.json"
MERGE_PICK = "merge_pick.json"
REPORT_FILE = "report.json"
PLAIN_DIR = "plain"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _set_parent_death_signal() -> None:  # pragma: no cover - runs in the child
    """Makes a training subprocess die with the pipeline (so a killed pipeline leaves no orphan writing files)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class StageFailed(RuntimeError):
    pass


class PipelineRunner:
    """Runs the stages of a :class:`PipelineConfig` in ``output_dir``.

    Each stage has an input hash: its resolved config, the fingerprints of its data files and the hashes of the stages
    it depends on. A stage whose manifest entry is ``done`` with the same hash and a complete export is skipped; a
    changed stage reruns, and so does everything downstream (their input hashes change with it). An interrupted
    training stage resumes from its ``last.ckpt`` when its hash is unchanged.
    """

    def __init__(self, cfg: PipelineConfig, output_dir: str | os.PathLike, *, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.output_dir = Path(output_dir).absolute()
        self.log = log
        self.stages = build_stages(cfg)
        self.manifest = self._load_manifest()
        self._fingerprints: dict[str, str] = {}
        self.hashes: dict[str, str] = {}

    # ------------------------------------------------------------------------------------------------ manifest
    @property
    def manifest_path(self) -> Path:
        return self.output_dir / MANIFEST

    def _load_manifest(self) -> dict[str, Any]:
        if self.manifest_path.is_file():
            try:
                manifest = json.loads(self.manifest_path.read_text())
            except json.JSONDecodeError as err:
                raise PipelineConfigError(
                    f"{self.manifest_path} is not valid JSON ({err}); delete it to start the pipeline afresh"
                ) from err
            if isinstance(manifest, dict) and isinstance(manifest.get("stages"), dict):
                return manifest
        return {"pipeline": self.cfg.source, "stages": {}}

    def _save_manifest(self) -> None:
        self.manifest["pipeline"] = self.cfg.source
        self.manifest["updated_at"] = _now()
        self.manifest["order"] = [s.name for s in self.stages]
        atomic_write_json(self.manifest_path, self.manifest)

    def stage_dir(self, name: str) -> Path:
        return self.output_dir / "stages" / name

    def export_dir(self, name: str) -> Path:
        return self.stage_dir(name) / EXPORT_DIR

    def checkpoint_dir(self, name: str) -> Path:
        return self.stage_dir(name) / CHECKPOINT_DIR

    def plain_dir(self, name: str) -> Path:
        """Where ``export_plain`` writes the plain Hugging Face folder of the model of stage ``name``."""
        return self.output_dir / PLAIN_DIR / name

    # ------------------------------------------------------------------------------------------------ resolving
    def budget_result(self) -> dict[str, Any] | None:
        """The budget stage's ``budget.json``, or None before it has run."""
        path = self.stage_dir("budget") / BUDGET_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def _resolve(self, value: Any) -> Any:
        if value == BUDGET_LAMBDA:
            budget = self.budget_result()
            # unresolved until the budget stage has run; its hash then changes and the stage runs with the value
            return budget["lambda_star"] if budget is not None and budget.get("step2_beta") else value
        if isinstance(value, str) and value.startswith("stage:"):
            return str(self.export_dir(value.split(":", 1)[1]))
        if isinstance(value, dict):
            return {k: self._resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._resolve(v) for v in value]
        return value

    def _fingerprint(self, path: str) -> str:
        if path not in self._fingerprints:
            expanded = os.path.expanduser(os.path.expandvars(path))
            self._fingerprints[path] = file_fingerprint(expanded) if os.path.isfile(expanded) else f"unresolved:{path}"
        return self._fingerprints[path]

    def resolved_train_config(self, stage: Stage) -> dict[str, Any]:
        config = self._resolve(copy.deepcopy(stage.config))
        root = self.stage_dir(stage.name)
        config.setdefault("trainer", {})["default_root_dir"] = str(root)
        config.setdefault("export", {})["dirpath"] = str(self.export_dir(stage.name))
        config.setdefault("checkpoint", {})["dirpath"] = str(self.checkpoint_dir(stage.name))
        # The pipeline streams plain-text progress lines instead of a progress bar.
        config["trainer"]["enable_progress_bar"] = False
        config.setdefault("progress", {}).setdefault("every_n_steps", 5)
        return config

    def stage_inputs(self, stage: Stage) -> dict[str, Any]:
        if stage.kind == "train":
            config = self.resolved_train_config(stage)
            data = config.get("data", {})
            files = list(data.get("train_files") or []) + list(data.get("val_files") or [])
            data_fp = {f: self._fingerprint(f) for f in files}
        else:
            config = self._resolve(copy.deepcopy(stage.config))
            data_fp = {}
            for key in ("kl_prompts", "prompts_safety", "prompts_helpful"):
                if isinstance(config.get(key), str):
                    data_fp[config[key]] = self._fingerprint(config[key])
            if "xstest" in (config.get("suites") or []):
                path = config.get("xstest_prompts") or DEFAULT_XSTEST_PROMPTS
                data_fp[path] = self._fingerprint(path)
        return {
            "config": config,
            "data": data_fp,
            "upstream": {d: self.hashes[d] for d in stage.depends_on},
            "reference": stage.reference,
        }

    # ------------------------------------------------------------------------------------------------ running
    def run(self, *, only_plan: bool = False) -> int:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.output_dir / ".pipeline.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise PipelineConfigError(
                f"another pipeline is running in {self.output_dir} (lock {lock.lock_file}); wait for it or use "
                "another --output"
            ) from None
        try:
            return self._run(only_plan)
        finally:
            lock.release()

    def _run(self, only_plan: bool) -> int:
        total = len(self.stages)
        started = time.monotonic()
        self.log(f"SACPO pipeline {self.cfg.source} -> {self.output_dir} ({total} stages)")
        for i, stage in enumerate(self.stages, 1):
            inputs = self.stage_inputs(stage)
            digest = config_hash(inputs)
            self.hashes[stage.name] = digest
            entry = self.manifest["stages"].get(stage.name)
            export = self.export_dir(stage.name)
            up_to_date = (
                entry is not None and entry.get("status") in ("done", "skipped")
                and entry.get("config_hash") == digest
                and (stage.kind in ("evaluate", "budget") or entry["status"] == "skipped"
                     or (stage.kind == "export" and all(is_complete_directory(p) for p in entry.get("folders", [])))
                     or is_complete_directory(export))
            )
            prefix = f"[{i}/{total}] {stage.name}"
            if up_to_date:
                self.log(f"{prefix}: unchanged, skipped ({stage.description})")
                continue
            if only_plan:
                self.log(f"{prefix}: would run ({stage.description})")
                continue
            self.log(f"{prefix}: {stage.description}")
            entry = {
                "name": stage.name, "kind": stage.kind, "status": "pending", "description": stage.description,
                "export_dir": str(export) if stage.kind in ("train", "merge") else None,
                "reference": self._resolve(stage.reference), "config": inputs["config"], "config_hash": digest,
                "data": inputs["data"], "depends_on": stage.depends_on, "started_at": _now(),
            }
            self.manifest["stages"][stage.name] = entry
            self._save_manifest()
            t0 = time.monotonic()
            skip = self._skip_reason(stage)
            if skip is not None:
                entry.update(status="skipped", reason=skip, finished_at=_now(), wall_time_s=0.0)
                self._save_manifest()
                self.log(f"{prefix}: skipped: {skip}")
                continue
            try:
                metrics = {"train": self._run_train, "merge": self._run_merge, "evaluate": self._run_evaluate,
                           "budget": self._run_budget, "export": self._run_export_plain}[stage.kind](
                    stage, inputs, digest)
                if stage.kind in ("train", "merge") and self._uses_budget_lambda(stage):
                    # the budget that picked lambda*, on the card (the evaluation's numbers come after it runs)
                    write_model_card(export, **self.card_fields(stage.name, with_evaluation=False))
            except BaseException as err:
                entry.update(status="failed", error=f"{type(err).__name__}: {err}", wall_time_s=time.monotonic() - t0)
                self._save_manifest()
                if isinstance(err, KeyboardInterrupt):
                    raise
                if debug_enabled() or (find_user_error(err) is None and not isinstance(err, StageFailed)):
                    traceback.print_exception(err)  # a bug in this library: its traceback, above the summary
                self.log(f"{prefix}: FAILED: {err}")
                self.log("Earlier stages are intact; fix the cause and rerun the same command to continue.")
                return 1
            if stage.kind == "export":
                entry["folders"] = list(metrics.get("folders", {}).values())
            entry.update(status="done", metrics=metrics, finished_at=_now(), wall_time_s=time.monotonic() - t0)
            self._save_manifest()
            self.log(f"{prefix}: done in {entry['wall_time_s']:.0f}s")
        if not only_plan:
            self.log(self.summary(time.monotonic() - started))
            return self._log_results()
        return 0

    def _run_train(self, stage: Stage, inputs: dict[str, Any], digest: str) -> dict[str, Any]:
        root = self.stage_dir(stage.name)
        marker = root / STAGE_MARKER
        if marker.is_file() and json.loads(marker.read_text()).get("config_hash") != digest:
            self.log(f"  inputs of {stage.name} changed: discarding its old checkpoints and export")
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(marker, {"config_hash": digest})
        config_path = root / STAGE_CONFIG
        config = inputs["config"]
        # the logger is added after hashing: changing where a stage logs does not rerun it
        loggers = stage_logger_config(self.cfg.logger, self.output_dir, stage.name, root)
        if loggers is not None:
            config = copy.deepcopy(config)
            config.setdefault("trainer", {})["logger"] = loggers
            make_log_dir(loggers[-1])
        atomic_write_text(config_path, f"# written by sacpo pipeline for stage {stage.name}\n"
                          + yaml.safe_dump(config, sort_keys=False))
        cmd = [sys.executable, "-m", "sacpo_lightning", "fit", "--config", str(config_path)]
        last = self.checkpoint_dir(stage.name) / LAST_CHECKPOINT
        if last.is_file():
            self.log(f"  resuming {stage.name} from {last}")
            cmd += ["--ckpt_path", str(last)]
        self._stream(cmd, root / TRAIN_LOG, env=stage_env(self.cfg.logger, self.output_dir))
        export = self.export_dir(stage.name)
        if not is_complete_directory(export):
            raise StageFailed(f"training finished but {export} is missing or incomplete")
        for meta_name in (STEP_METADATA, SCORE_MODEL_FILE):
            meta_path = export / meta_name
            if meta_path.is_file():
                meta = json.loads(meta_path.read_text())
                return meta.get("final_metrics") or {k: v for k, v in meta.items() if isinstance(v, int | float)}
        return {}

    def _stream(self, cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        with open(log_path, "a", encoding="utf-8") as log_file:
            log_file.write(f"\n$ {' '.join(cmd)}\n")
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1,
                preexec_fn=_set_parent_death_signal if sys.platform.startswith("linux") else None,
            )
            tail: list[str] = []
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                log_file.write(line)
                tail = (tail + [line.rstrip()])[-15:]
            code = proc.wait()
        if code != 0:
            raise StageFailed(f"`{' '.join(cmd)}` exited with {code}; log: {log_path}\n" + "\n".join(tail))

    def _run_merge(self, stage: Stage, inputs: dict[str, Any], digest: str) -> dict[str, Any]:
        from sacpo_lightning.merge_report import merge_with_report, read_kl_prompts

        config = inputs["config"]
        out = self.export_dir(stage.name)
        prompts = read_kl_prompts(config["kl_prompts"], config["kl_max_prompts"]) if config.get("kl_prompts") else None
        report = merge_with_report(config["base"], config["other"], [config["q"]], output_dirs=[out],
                                   dtype=config["dtype"], prompts=prompts)
        metrics: dict[str, Any] = {"q": config["q"], "lam": config["lam"]}
        if "lam_effective" in config:
            metrics["lam_effective"] = config["lam_effective"]
        if prompts:
            (entry,) = report["merges"]
            metrics.update(kl_mixture_vs_merge=entry["kl_mixture_vs_merge"], kl_num_tokens=entry["num_tokens"])
            self.log(f"  mean KL(token-level mixture || weight merge) per token: {entry['kl_mixture_vs_merge']:.5f} "
                     f"over {entry['num_tokens']} tokens")
        atomic_write_json(self.stage_dir(stage.name) / MERGE_METRICS, metrics)
        return metrics

    @staticmethod
    def _uses_budget_lambda(stage: Stage) -> bool:
        return BUDGET_LAMBDA in json.dumps(stage.config)

    def _skip_reason(self, stage: Stage) -> str | None:
        """Why a stage that depends on lambda* cannot run (the budget found no usable lambda*), else None."""
        if not self._uses_budget_lambda(stage):
            return None
        budget = self.budget_result()
        if budget is None:
            return "the budget stage has not produced budget.json"
        if not budget.get("step2_beta"):
            return f"no step 2 at lambda*: {budget.get('message')}"
        return None

    def _run_budget(self, stage: Stage, inputs: dict[str, Any], digest: str) -> dict[str, Any]:
        from sacpo_lightning.budget_sampling import estimate_budget
        from sacpo_lightning.evaluation.generation import GenerationSettings
        from sacpo_lightning.evaluation.pipeline_stage import subset_prompts

        config = inputs["config"]
        root = self.stage_dir(stage.name)
        root.mkdir(parents=True, exist_ok=True)
        prompts = subset_prompts(config["prompts"], config.get("max_prompts"), root, half=config.get("prompts_half"))
        generation = GenerationSettings(max_new_tokens=int(config["max_new_tokens"]), do_sample=True,
                                        batch_size=int(config["batch_size"]), seed=int(config["seed"]))
        kwargs = dict(safety_transform=config["safety_transform"], lam_max=config.get("lam_max"),
                      allow_at_max=bool(config.get("allow_at_max", False)),
                      generation=generation)
        args = (config["reference"], prompts, int(config["samples_per_prompt"]), float(config["beta"]),
                float(config["b"]), config["cost_model"], config.get("reward_model"), root)
        merge_weights = self.cfg.safety_budget.merge_weights if self.cfg.safety_budget else []
        # predictions for the P-SACPO merges too: a merge at q approximates lambda = q * lambda*
        result = estimate_budget(*args, lambda_fractions=merge_weights, **kwargs)
        self.log(f"  {result['message']}")
        self.log(f"  curve: {root / 'lambda_curve.png'}; budget: {root / BUDGET_FILE}")
        return {"lambda_star": result["lambda_star"], "status": result["status"],
                "predicted_safety": result["predicted"]["safety"], "step2_beta": result.get("step2_beta")}

    def predicted_safety(self) -> dict[str, dict[str, Any]] | None:
        """The budget's predictions per evaluated model: step 1 at lambda = 0, the lambda* model, and each merge at
        q * lambda* (read off the predicted curve)."""
        budget = self.budget_result()
        if budget is None:
            return None
        inputs = budget.get("inputs") or {}
        common = {"sampling": inputs.get("generation"),
                  "prompts": f"{inputs.get('num_prompts')} prompts of {inputs.get('prompts_file')}"}
        out = {"reward": {"lambda": 0.0, "safety": budget["reference"]["safety"], **common}}
        if budget.get("step2_beta"):
            lam = float(budget["lambda_star"])
            out["safety_budget"] = {"lambda": lam, "safety": budget["predicted"]["safety"],
                                    "safety_interval": budget["predicted"].get("safety_interval"), **common}
            merges = budget.get("merges") or {}
            for s in self.stages:
                q = s.config.get("q") if s.kind == "merge" and s.config.get("lam") == BUDGET_LAMBDA else None
                if q is not None and f"{q:g}" in merges:
                    out[s.name] = {"lambda": merges[f"{q:g}"]["lambda"], "safety": merges[f"{q:g}"]["safety"],
                                   "safety_interval": merges[f"{q:g}"].get("safety_interval"), **common}
        return out

    def evaluated_models(self) -> dict[str, str]:
        """``{stage name: export folder}`` of the models the evaluation evaluates (beside the SFT model) and
        ``export_plain`` writes: every training stage and merge but the score models and the skipped stages."""
        return {name: str(self.export_dir(name)) for name in evaluated_stage_names(self.stages)
                if self.manifest["stages"].get(name, {}).get("status") != "skipped"}

    def evaluation_report(self) -> dict[str, Any] | None:
        """The evaluate stage's ``report.json`` once that stage is done (None before, or without an evaluation)."""
        entry = self.manifest["stages"].get("evaluate") or {}
        path = self.stage_dir("evaluate") / REPORT_FILE
        return json.loads(path.read_text()) if entry.get("status") == "done" and path.is_file() else None

    def card_fields(self, name: str, *, with_evaluation: bool = True) -> dict[str, Any]:
        """What the pipeline knows about the model of stage ``name`` beyond its export's records, for its model card:
        the budget that picked its lambda* and the evaluation's measured numbers."""
        fields: dict[str, Any] = {}
        stage = next((s for s in self.stages if s.name == name), None)
        budget = self.budget_result() if stage is not None and self._uses_budget_lambda(stage) else None
        if budget is not None and budget.get("step2_beta"):
            fields["budget"] = budget
        report = self.evaluation_report() if with_evaluation else None
        measures = evaluation_measures(report).get(name) if report is not None else None
        if measures:
            fields["evaluation"] = {m.label: m.card_entry() for m in measures}
        return fields

    def _run_evaluate(self, stage: Stage, inputs: dict[str, Any], digest: str) -> dict[str, Any]:
        from sacpo_lightning.evaluation.pipeline_stage import run_evaluation_stage

        models = {"sft": self.cfg.sft, **self.evaluated_models()}
        config = dict(inputs["config"])
        predicted = self.predicted_safety()
        if predicted is not None:
            predicted = {k: v for k, v in predicted.items() if k in models}
            if config.get("safety_threshold") is None and self.cfg.safety_budget is not None:
                config["safety_threshold"] = self.cfg.safety_budget.b
        metrics = run_evaluation_stage(config, models, self.stage_dir(stage.name), log=self.log,
                                       predicted_safety=predicted if config.get("safety_judges") else None)
        if self.cfg.safety_budget is not None and self.cfg.safety_budget.merge_weights:
            from sacpo_lightning.budget import pick_merge_weight

            report = json.loads(Path(metrics["report"]).read_text())
            candidates = {s.name: s.config["q"] for s in self.stages
                          if s.kind == "merge" and s.config.get("lam") == BUDGET_LAMBDA and s.name in models}
            candidates["safety_budget"] = 1.0
            pick = pick_merge_weight(report, candidates, self.cfg.safety_budget.b)
            atomic_write_json(self.stage_dir(stage.name) / MERGE_PICK, pick)
            self.log(f"  P-SACPO pick for b={self.cfg.safety_budget.b:g}: {pick['message']}")
            metrics["merge_pick"] = pick
        self._write_evaluated_cards(Path(metrics["report"]))
        return metrics

    def _write_evaluated_cards(self, report_path: Path) -> None:
        """Rewrites the card of every evaluated export with its measured numbers (and the budget, for lambda*)."""
        measured = evaluation_measures(json.loads(report_path.read_text()))
        for name, folder in self.evaluated_models().items():
            if name not in measured or not is_complete_directory(folder):
                continue
            fields = self.card_fields(name, with_evaluation=False)
            fields["evaluation"] = {m.label: m.card_entry() for m in measured[name]}
            write_model_card(folder, **fields)
        self.log(f"  model cards of {', '.join(n for n in self.evaluated_models() if n in measured)} now state "
                 "the measured numbers")

    def _run_export_plain(self, stage: Stage, inputs: dict[str, Any], digest: str) -> dict[str, Any]:
        """``export_plain``: each evaluated model as a plain Hugging Face folder (``sacpo export``'s conversion),
        with the card the pipeline knows."""
        from sacpo_lightning.models.export import export_plain_folder

        folders: dict[str, str] = {}
        for name, src in self.evaluated_models().items():
            if name not in inputs["config"]["models"]:
                continue
            out = export_plain_folder(src, self.plain_dir(name), card=self.card_fields(name))
            folders[name] = str(out)
            self.log(f"  {name}: {out}")
        return {"folders": folders}

    # ------------------------------------------------------------------------------------------------ results
    def result_measures(self) -> dict[str, list[Measure]]:
        """``{"budget": [...], "eval/<model>": [...]}``: the budget's lambda* and the evaluation's headline numbers."""
        out: dict[str, list[Measure]] = {}
        budget = self.budget_result()
        if budget is not None and (self.manifest["stages"].get("budget") or {}).get("status") == "done":
            out["budget"] = budget_measures(budget)
        report = self.evaluation_report()
        for name, measures in (evaluation_measures(report) if report is not None else {}).items():
            out[f"eval/{name}"] = measures
        return {k: v for k, v in out.items() if v}

    def result_images(self) -> dict[str, Path]:
        """The plots to log: the budget's lambda curve and the evaluation's figures."""
        images: dict[str, Path] = {}
        curve = self.stage_dir("budget") / "lambda_curve.png"
        if curve.is_file() and (self.manifest["stages"].get("budget") or {}).get("status") == "done":
            images["budget/lambda_curve"] = curve
        report = self.evaluation_report() or {}
        for name, path in (report.get("figures") or {}).items():
            if isinstance(path, str) and path.endswith(".png") and Path(path).is_file():
                images[f"evaluate/{name}"] = Path(path)
        return images

    def _log_results(self) -> int:
        """Logs the results to the pipeline's logger once per change of them (or of the logger)."""
        metrics: dict[str, float] = {}
        for prefix, measures in self.result_measures().items():
            metrics.update(measure_metrics(prefix, measures))
        images = self.result_images()
        if not metrics and not images:
            return 0
        spec = self.cfg.logger
        digest = config_hash({"logger": asdict(spec), "metrics": metrics,
                              "images": {k: file_fingerprint(p) for k, p in images.items()}})
        if (self.manifest.get("logged") or {}).get("hash") == digest:
            return 0
        try:
            where = log_results(spec, self.output_dir, metrics, images)
        except Exception as err:
            if debug_enabled() or find_user_error(err) is None:
                traceback.print_exception(err)
            self.log(f"logging the results to the {spec.kind} logger failed: {err}")
            return 1
        self.manifest["logged"] = {"hash": digest, "logger": spec.kind, "where": where, "at": _now(),
                                   "metrics": sorted(metrics), "images": sorted(images)}
        self._save_manifest()
        self.log(f"Logged {len(metrics)} result numbers and {len(images)} plots to {spec.kind}: {where}")
        return 0

    # ------------------------------------------------------------------------------------------------ summary
    def summary(self, elapsed: float) -> str:
        rows = [("stage", "status", "time", "key metrics")]
        for s in self.stages:
            entry = self.manifest["stages"].get(s.name, {})
            metrics = entry.get("metrics") or {}
            keys = ["val/rewards/accuracy", "val/loss", "train/loss", "lam_effective", "kl_mixture_vs_merge"]
            shown = ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), int | float))
            wall = entry.get("wall_time_s")
            rows.append((s.name, entry.get("status", "-"), f"{wall:.0f}s" if wall is not None else "-", shown))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"Pipeline finished in {elapsed:.0f}s; manifest: {self.manifest_path}"]
        for r in rows:
            lines.append(f"  {r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``sacpo pipeline``, parsed by jsonargparse from the signature of ``pipeline`` below (``--cli_config FILE`` reads
    these options from YAML and ``--print_config`` prints them; ``--config`` is the pipeline YAML)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from sacpo_lightning.cli_args import command_argv

    def pipeline(config: str, output: str, plan: bool = False) -> None:
        """Run a SACPO pipeline (see configs/pipelines).

        Args:
            config: Pipeline YAML file.
            output: Output folder (manifest.json, stages/<name>/...).
            plan: Print which stages would run or be skipped, then exit.
        """

    parser = ArgumentParser(prog="sacpo pipeline", description="Run a SACPO pipeline (see configs/pipelines).")
    parser.add_argument("--cli_config", action=ActionConfigFile, help="A YAML file of these options.")
    parser.add_function_arguments(pipeline)
    ns = parser.parse_args(command_argv(list(sys.argv[1:] if argv is None else argv), [pipeline]))
    try:
        runner = PipelineRunner(load_pipeline_config(ns.config), ns.output)
        return runner.run(only_plan=ns.plan)
    except PipelineConfigError as err:
        print(f"sacpo pipeline: error: {err}", file=sys.stderr)
        return 2
