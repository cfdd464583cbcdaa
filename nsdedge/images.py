"""Moved to nsdedge.eval.images; this name stays importable for code written against earlier releases."""

import sys

from .eval import images

sys.modules[__name__] = images
