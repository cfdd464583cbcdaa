"""The lean runtime: numpy + onnxruntime (+ tensorrt where present). Never imports torch."""

from .batch import reconstruct
from .pipeline import Reconstructor

__all__ = ["Reconstructor", "reconstruct"]
