"""Console filters for third-party messages that say nothing to a user of this library.

:func:`install_console_filters` is called once by the ``sacpo`` entry point. Each filter is aimed at one message of
one library: a ``warnings`` filter with the message pattern, the category and the module that raises it, or a
``logging.Filter`` on the exact logger that logs it. Every other warning and log record of those libraries still
shows. Importing :mod:`sacpo_lightning` as a library changes nothing.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass

__all__ = ["LOG_FILTERS", "WARNING_FILTERS", "MessageFilter", "WarningFilter", "install_console_filters"]


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


def install_console_filters() -> None:
    """Installs every filter of :data:`WARNING_FILTERS` and :data:`LOG_FILTERS` (idempotent)."""
    for warning_filter in WARNING_FILTERS:
        warning_filter.install()
    for log_filter in LOG_FILTERS:
        log_filter.install()
