"""The lean runtime: numpy + onnxruntime (+ tensorrt where present). Never imports torch."""

from .pipeline import Reconstructor

__all__ = ["Reconstructor"]
