"""Export: torch / diffusers / onnx only. Sources of weights, wrappers, ONNX export with parity checks."""
