"""prometheus-client's multiprocess folder, for an API served by several processes.

prometheus-client chooses, once, when it is imported, whether its values
live in this process's memory or in memory-mapped files under
``PROMETHEUS_MULTIPROC_DIR``. So the roles that serve the API with several
gunicorn workers export that variable here, from the settings, before
anything imports prometheus-client: :func:`lungnode.app.api_server.prepare_api_role`
in the gunicorn master (whose workers inherit it), and :mod:`lungnode.app.wsgi`.
This module imports nothing from prometheus-client for that reason.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from lungnode.config import Settings
from lungnode.errors import ConfigError

logger = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"

#: The folder this process made (and removes at exit), if it made one.
_made: Path | None = None


def use_metrics_dir(settings: Settings, *, processes: int, empty: bool) -> Path | None:
    """Export the multiprocess folder, and return it; None: one process, no folder.

    The folder is ``metrics_dir``, or one already named by the environment,
    or a fresh temporary folder when ``processes`` > 1. ``empty``: remove the
    files of an earlier run (the gunicorn master, once, before its workers
    start: files left over would add an old run's counts to the new one's).
    """
    global _made
    named = os.environ.get(ENV)
    if named:
        path = Path(named)
    elif settings.metrics_dir is not None:
        path = settings.metrics_dir
    elif processes > 1:
        path = _made = Path(tempfile.mkdtemp(prefix="lungnode-metrics-"))
    else:
        return None
    if not named and "prometheus_client" in sys.modules:
        raise ConfigError(
            f"{ENV} must be set before prometheus-client is imported; "
            "start the API through lungnode.app.gunicorn_conf or lungnode.app.wsgi"
        )
    path.mkdir(parents=True, exist_ok=True)
    if empty:
        for stale in path.glob("*.db"):
            stale.unlink()
    os.environ[ENV] = str(path)
    logger.info("metrics of %d process(es) summed through %s", processes, path)
    return path


def remove_made_metrics_dir() -> None:
    """Remove the temporary folder :func:`use_metrics_dir` made, if it made one."""
    global _made
    if _made is not None:
        shutil.rmtree(_made, ignore_errors=True)
        _made = None
