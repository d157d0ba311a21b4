"""Console filters for third-party messages that say nothing to a user of this library.

:func:`install_console_filters` is called once by the ``sacpo`` entry point. Each filter is aimed at one message of
one library: a ``warnings`` filter with the message pattern, the category and the module that raises it, or a
``logging.Filter`` on the exact logger that logs it. Every other warning and log record of those libraries still
shows. Importing :mod:`sacpo_lightning` as a library changes nothing.

transformers' own tqdm bars of loading and saving weights (:data:`TRANSFORMERS_BARS`) become this library's progress
lines (:mod:`sacpo_lightning.progress`: rate and ETA, a line every few seconds in a log, nothing for a load done
within two seconds) through transformers' ``set_tqdm_hook``; its other bars are left as they are.

:func:`quiet_load_report` is used around the strict loads of :mod:`sacpo_lightning.models.classifier`, which check
the loading info themselves (and say so in their own words), so transformers' table of missing and unexpected
weights is dropped there; a report of weights with other shapes or failed conversions still shows, since
transformers raises right after it.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LOAD_REPORT_FILTER",
    "LOG_FILTERS",
    "TRANSFORMERS_BARS",
    "WARNING_FILTERS",
    "MessageFilter",
    "ProgressBar",
    "WarningFilter",
    "install_console_filters",
    "gguf_conversion_progress",
    "install_transformers_progress",
    "quiet_load_report",
]


@dataclass(frozen=True)
class WarningFilter:
    """Ignores warnings of ``category`` whose message matches ``message`` (a regex, from the start) when warned from a
    module whose name matches ``module``."""

    message: str
    category: type[Warning]
    module: str
    why: str

    def install(self) -> None:
        # filterwarnings puts an equal filter at the front again, so repeated installs leave one entry
        warnings.filterwarnings("ignore", message=self.message, category=self.category, module=self.module)


class MessageFilter(logging.Filter):
    """Drops the records of one logger whose formatted message matches ``pattern`` (a regex, searched)."""

    def __init__(self, loggers: tuple[str, ...], pattern: str, why: str) -> None:
        super().__init__()
        self.loggers = loggers
        self.pattern = re.compile(pattern)
        self.why = why

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.search(record.getMessage()) is None

    def install(self) -> None:
        for name in self.loggers:
            logger = logging.getLogger(name)
            if self not in logger.filters:
                logger.addFilter(self)


WARNING_FILTERS: tuple[WarningFilter, ...] = (
    WarningFilter(
        message=r"`(is_gradient_checkpointing|gradient_checkpointing_enable|gradient_checkpointing_disable)` is "
        r"deprecated",
        category=FutureWarning,
        module=r"transformers\.modeling_utils$",
        why="peft (and other callers) still use transformers' old gradient-checkpointing names",
    ),
    WarningFilter(
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.(pytorch|fabric)\.utilities\._pytree$",
        why="Lightning's own pytree helper builds torch's deprecated LeafSpec",
    ),
)

LOG_FILTERS: tuple[MessageFilter, ...] = (
    MessageFilter(
        loggers=("bitsandbytes.backends.cpu.ops",),
        pattern=r"from kernels-community",
        why="bitsandbytes says on import on a CPU that the optional `kernels` package is missing; its own CPU "
        "kernels run instead",
    ),
    MessageFilter(
        loggers=("kernels._internals.hf_hub",),
        pattern=r"^Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging "
        r"Face Hub is in offline mode",
        why="bitsandbytes looks for its optional Hub kernel on import on a CPU with AVX512-BF16; offline, the "
        "kernels package (a transformers dependency from 5.25) says it skips a check for a kernel that is then not "
        "used",
    ),
    MessageFilter(
        # rank_zero_info logs through lightning_utilities' module logger, which lightning.fabric and
        # lightning.pytorch each replace with their own on import; the last import wins, so all three are covered
        loggers=(
            "lightning.pytorch.utilities.rank_zero",
            "lightning.fabric.utilities.rank_zero",
            "lightning_utilities.core.rank_zero",
        ),
        pattern=r"^💡 Tip: .*litlogger",
        why="the Trainer advertises the litlogger package whenever no LitLogger is configured",
    ),
)


LOAD_REPORT_FILTER = MessageFilter(
    loggers=("transformers.modeling_utils",),
    # the whole record is one message (the table follows the title); weights of other shapes (MISMATCH) and failed
    # conversions (CONVERSION) are kept: transformers raises after that report, and the error points at it
    pattern=r"(?s)\A(?!.*\b(?:MISMATCH|CONVERSION)\b).*LOAD REPORT",
    why="the strict score-model loads check missing and unexpected weights themselves and raise or say so",
)


@contextmanager
def quiet_load_report() -> Iterator[None]:
    """Drops transformers' ``LOAD REPORT`` of missing and unexpected weights while the block runs."""
    logger = logging.getLogger(LOAD_REPORT_FILTER.loggers[0])
    added = LOAD_REPORT_FILTER not in logger.filters
    if added:
        logger.addFilter(LOAD_REPORT_FILTER)
    try:
        yield
    finally:
        if added:
            logger.removeFilter(LOAD_REPORT_FILTER)


TRANSFORMERS_BARS: dict[str, tuple[str, str]] = {
    "Loading weights": ("loading weights", "tensors"),
    "Writing model shards": ("writing model shards", "files"),
}
"""transformers' tqdm descriptions shown as progress lines instead: ``desc -> (progress line's desc, unit)``."""


class ProgressBar:
    """The part of tqdm's interface transformers uses on its loading and saving bars, printing
    :class:`sacpo_lightning.progress.Progress` lines instead of a tqdm bar."""

    def __init__(self, iterable: Any = None, *, desc: str, unit: str, total: int | None = None) -> None:
        from sacpo_lightning.progress import Progress

        if total is None:
            total = len(iterable) if hasattr(iterable, "__len__") else 0
        self.iterable = iterable
        self.progress = Progress(int(total), desc, unit=unit)

    def __iter__(self) -> Iterator[Any]:
        with self.progress:
            for item in self.iterable:
                yield item
                self.progress.update()

    def update(self, n: int = 1) -> None:
        self.progress.update(n)

    def close(self) -> None:
        self.progress.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.progress.__exit__(exc_type, exc, tb)

    def __getattr__(self, name: str):
        # set_postfix, set_description, refresh and the like: nothing to show in a progress line
        return lambda *args, **kwargs: None


def _transformers_tqdm_hook(factory, args: tuple[Any, ...], kwargs: dict[str, Any]):
    """transformers' tqdm hook: its bars of :data:`TRANSFORMERS_BARS` become :class:`ProgressBar`; the others, and
    every bar while transformers' progress bars are disabled (``factory`` is its empty stand-in), are unchanged."""
    from transformers.utils import logging as hf_logging

    known = TRANSFORMERS_BARS.get(kwargs.get("desc") or "")
    if known is None or factory is hf_logging.EmptyTqdm:
        return factory(*args, **kwargs)
    desc, unit = known
    return ProgressBar(args[0] if args else kwargs.get("iterable"), desc=desc, unit=unit, total=kwargs.get("total"))


def install_transformers_progress() -> bool:
    """Routes transformers' loading and saving bars through :func:`_transformers_tqdm_hook` (idempotent); ``False``
    when this transformers has no ``set_tqdm_hook`` (its bars are then left as they are)."""
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is None:
        return False
    set_hook(_transformers_tqdm_hook)
    return True


GGUF_BAR_MODULE = "transformers.modeling_gguf_pytorch_utils"
"""The module whose module-level ``tqdm`` (``tqdm.auto``, not transformers' hookable one) draws the bar of de-quantising
GGUF tensors."""


@contextmanager
def gguf_conversion_progress() -> Iterator[None]:
    """While the block runs, the GGUF conversion's tensor bar of :data:`GGUF_BAR_MODULE` is a
    :class:`ProgressBar` (``converting GGUF tensors``); other bars of that module are left as they are. A
    transformers without that module or name is left untouched."""
    import importlib

    try:
        module = importlib.import_module(GGUF_BAR_MODULE)
    except ImportError:
        yield
        return
    original = getattr(module, "tqdm", None)
    if original is None:
        yield
        return

    def bar(*args: Any, **kwargs: Any) -> Any:
        if not str(kwargs.get("desc") or "").startswith("Converting and de-quantizing GGUF tensors"):
            return original(*args, **kwargs)
        iterable = args[0] if args else kwargs.get("iterable")
        return ProgressBar(iterable, desc="converting GGUF tensors", unit="tensors", total=kwargs.get("total"))

    module.tqdm = bar
    try:
        yield
    finally:
        module.tqdm = original


def install_console_filters() -> None:
    """Installs every filter of :data:`WARNING_FILTERS` and :data:`LOG_FILTERS` and transformers' progress lines
    (idempotent)."""
    for warning_filter in WARNING_FILTERS:
        warning_filter.install()
    for log_filter in LOG_FILTERS:
        log_filter.install()
    install_transformers_progress()
