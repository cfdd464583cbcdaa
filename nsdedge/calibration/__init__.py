"""Recording what each stage of the fp32 pipeline sees, for quantization and fidelity checks."""

from .record import Recorder, calls, load_calibration, record_calibration

__all__ = ["Recorder", "calls", "record_calibration", "load_calibration"]
