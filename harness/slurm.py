"""Quiet SLURM sweeps on clusters without job accounting (`hydra/launcher=slurm` installs this callback).

submitit follows a sweep's jobs through their result files and, now and then, `sacct`. Where the cluster keeps no
accounting every `sacct` call fails and submitit logs a warning for each poll (about six in a sweep's first minute,
then ever fewer, down to one every ten minutes). The callback says so once and drops the repeats; the jobs run and
finish as before.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)
SACCT_FAILED = "Bypassing sacct error"  # submitit.core.core.InfoWatcher.update's warning


class OneSacctWarning(logging.Filter):
    """Lets none of submitit's per-poll `sacct` warnings through, and explains the first one."""

    def __init__(self) -> None:
        super().__init__()
        self.explained = False

    def filter(self, record: logging.LogRecord) -> bool:
        if SACCT_FAILED not in record.getMessage():
            return True
        if not self.explained:
            self.explained = True
            log.warning(
                "sacct fails on this cluster (no job accounting?): submitit sees each job end through its result "
                "file only. A job killed before it writes one (scancel, time limit, node failure) leaves this sweep "
                "waiting; stop it and submit the same command again: finished runs are skipped, killed ones resume.")
        return False


class QuietWithoutAccounting(Callback):
    """Puts `OneSacctWarning` on submitit's logger in the process that submits and watches the sweep."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from submitit.core.logger import get_logger  # its import configures the logger; the filter goes on after

        get_logger().addFilter(OneSacctWarning())
