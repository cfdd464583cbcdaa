"""Moved to nsdedge.eval.features; this name stays importable for code written against earlier releases."""

import sys

from .eval import features

sys.modules[__name__] = features
