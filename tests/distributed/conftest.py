"""The cluster harness lives beside the demo (``example_dags/_celery_cluster.py``, which
imports no test code); this puts that folder on ``sys.path`` for the tier's modules."""

from __future__ import annotations

import sys
from pathlib import Path

EXAMPLES = str(Path(__file__).resolve().parents[2] / "example_dags")
if EXAMPLES not in sys.path:
    sys.path.append(EXAMPLES)
