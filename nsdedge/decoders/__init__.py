"""Voxel -> IP-Adapter-Plus token decoders: ridge (numpy) and the BrainGuard-style MLP (torch)."""

from .linear import LinearDecoder, read_decoder, synthetic_decoder

__all__ = ["LinearDecoder", "read_decoder", "synthetic_decoder"]
