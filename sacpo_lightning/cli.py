"""Command line: ``sacpo fit|validate`` (LightningCLI) plus ``prepare-model``, ``pipeline``, ``merge``, ``export``
and friends."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable

from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from sacpo_lightning.allocator import tune_malloc
from sacpo_lightning.callbacks import ExportHF, NaNGuard
from sacpo_lightning.callbacks.checkpoint import AtomicModelCheckpoint
from sacpo_lightning.callbacks.progress import ProgressLog
from sacpo_lightning.console import install_console_filters
from sacpo_lightning.data import PreferenceDataModule
from sacpo_lightning.errors import DEBUG_ENV, debug_enabled, find_user_error
from sacpo_lightning.models.policy import check_model_source
from sacpo_lightning.precision import resolve_precision


class SacpoTrainer(Trainer):
    """A Lightning ``Trainer`` that also takes ``precision: auto`` (see :mod:`sacpo_lightning.precision`).

    The resolved precision and the reason for it are kept in :attr:`precision_choice`, printed, and recorded in the
    export's ``sacpo_step.json``.
    """

    def __init__(self, *, precision: str | int | None = "auto", **kwargs) -> None:
        resolved, reason = resolve_precision(precision, kwargs.get("accelerator", "auto"))
        rank_zero_info(reason)
        super().__init__(precision=resolved, **kwargs)
        self.precision_choice = {"requested": precision, "resolved": resolved, "reason": reason}


class SacpoCLI(LightningCLI):
    """LightningCLI for alignment steps.

    Compared with a plain LightningCLI: every ``fit`` gets an end-of-fit export (``--export.*``), atomic resumable
    checkpoints (``--checkpoint.*``) under ``trainer.default_root_dir`` unless given elsewhere, plain-text progress
    lines (``--progress.*``) and a NaN/Inf guard (``--nan_guard.*``); a CSV logger there when none is configured; and
    the data tokenizer defaults to the policy's ``name_or_path``.
    """

    def before_fit(self) -> None:
        policy = getattr(self.model, "policy_settings", None)
        if policy is not None:
            check_model_source(policy.name_or_path, "--model.policy.name_or_path")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ExportHF, "export")
        parser.add_lightning_class_args(AtomicModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ProgressLog, "progress")
        parser.add_lightning_class_args(NaNGuard, "nan_guard")
        parser.set_defaults(
            {"checkpoint.save_last": True, "checkpoint.save_top_k": 0, "checkpoint.every_n_train_steps": 20}
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.get("default_root_dir") or "outputs"
        config.trainer.default_root_dir = root
        if config.get("checkpoint") is not None and config.checkpoint.get("dirpath") is None:
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")
        if config.get("export") is not None and config.export.get("dirpath") is None:
            config.export.dirpath = os.path.join(root, "export")
        if config.trainer.get("logger") in (None, True):
            config.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir=root, name="logs")
            )
        data, model = config.get("data"), config.get("model")
        if data is None or model is None:
            return
        policy = model.get("init_args", {}).get("policy") if hasattr(model, "get") else None
        if data.get("tokenizer") is None and policy is not None and policy.get("name_or_path"):
            data["tokenizer"] = policy["name_or_path"]


def lightning_cli(args: list[str] | None = None, run: bool = True) -> SacpoCLI:
    """Builds the LightningCLI; with ``run=False`` it only parses and instantiates (used by the config tests)."""
    return SacpoCLI(
        LightningModule,
        PreferenceDataModule,
        subclass_mode_model=True,
        subclass_mode_data=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "yaml"},
        trainer_class=SacpoTrainer,
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


# --------------------------------------------------------------------------------------------- extra commands
def _prepare_model(argv: list[str]) -> int:
    from sacpo_lightning.models.registry import NAMED_MODELS, prepare_named_model

    parser = argparse.ArgumentParser(prog="sacpo prepare-model", description="Prepare a named local model once.")
    parser.add_argument("name", choices=sorted(NAMED_MODELS))
    parser.add_argument("--output", default=None, help="Target folder (default: the cache, $SACPO_CACHE/models/NAME).")
    parser.add_argument("--force", action="store_true", help="Rebuild even if a finished copy exists.")
    ns = parser.parse_args(argv)
    path = prepare_named_model(ns.name, ns.output, force=ns.force)
    print(path)
    return 0


def _lazy(module: str, func: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        import importlib

        return getattr(importlib.import_module(module), func)(argv)

    return run


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "prepare-model": (_prepare_model, "convert/cache a named local model (smollm2, tiny-random-llama)"),
    "pipeline": (_lazy("sacpo_lightning.pipeline.runner", "main"), "run the SACPO pipeline from a pipeline config"),
    "merge": (_lazy("sacpo_lightning.merging_cli", "main"), "merge two exported models (P-SACPO)"),
    "export": (_lazy("sacpo_lightning.export_cli", "main"), "write a plain Hugging Face folder (merged weights)"),
    "generate": (_lazy("sacpo_lightning.evaluation.cli", "generate_main"), "generate responses on prompt sets"),
    "evaluate": (_lazy("sacpo_lightning.evaluation.cli", "evaluate_main"), "judge models against a baseline"),
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


DEBUG_FLAG = "--debug"


def main(argv: list[str] | None = None) -> int:
    """The ``sacpo`` entry point; returns the exit status.

    An error the user caused (:class:`~sacpo_lightning.errors.UserError`, also when a library wrapped it) ends the
    command with ``sacpo CMD: error: MESSAGE`` on stderr and status 2; ``--debug`` anywhere on the command line (or
    ``SACPO_DEBUG=1``, which ``--debug`` sets for the stages a pipeline starts) prints its traceback first. Any other
    exception is a bug and propagates with its traceback.
    """
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if DEBUG_FLAG in argv:
        argv = [a for a in argv if a != DEBUG_FLAG]
        os.environ[DEBUG_ENV] = "1"
        if from_command_line:
            sys.argv[1:] = argv  # LightningCLI reads sys.argv itself
    install_console_filters()
    command = argv[0] if argv else ""
    try:
        tune_malloc()
        return _dispatch(argv, from_command_line)
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is None:
            raise
        if debug_enabled():
            traceback.print_exception(err)
        print(f"sacpo {command}: error: {user_error}", file=sys.stderr)
        return 2


def _dispatch(argv: list[str], from_command_line: bool) -> int:
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]][0](argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sacpo {fit,validate,test,predict," + ",".join(COMMANDS) + "} ... [--debug]\n")
        print("  fit/validate     LightningCLI training/validation of one alignment step (--config FILE ...)")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<16} {help_text}")
        print(f"\n  {DEBUG_FLAG} (or {DEBUG_ENV}=1) shows the traceback of an error in the input or the options.")
        return 0
    lightning_cli(None if from_command_line else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
