"""The Python files TensorFlow's autograph writes, removed when a process exits fast.

Autograph writes each function it converts (the model's, Grad-CAM's: a few per
process that loads the model) to ``__autograph_generated_file*.py`` in the
temporary folder, imports it as a module of that name, and removes the file in
an ``atexit`` hook. A process that ends with ``os._exit`` skips that hook: the
node's ``serve`` does once TensorFlow is loaded, and so does every Celery pool
process. Each such exit left its files behind.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

#: The module names autograph gives the files it writes (tensorflow pyct/loader.py).
MODULE_PREFIX = "__autograph_generated_file"


def remove_autograph_files() -> int:
    """Remove this process's autograph files; returns how many were removed."""
    removed = 0
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not name.startswith(MODULE_PREFIX) or not path:
            continue
        try:
            Path(path).unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.debug("autograph file %s not removed: %s", path, exc)
            continue
        removed += 1
    return removed
