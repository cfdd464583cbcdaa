"""Moved to nsdedge.eval.metrics; this name stays importable for code written against earlier releases."""

import sys

from .eval import metrics

sys.modules[__name__] = metrics
