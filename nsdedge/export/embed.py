"""Stimuli -> IP-Adapter-Plus tokens (N, 16, 768): the targets `nsdedge fit` regresses voxels onto.

The tokens are what IP-Adapter-Plus feeds the UNet for an image: its Resampler over the penultimate hidden
states of the CLIP ViT-H vision tower, the image prepared by CLIPImageProcessor's defaults (shortest side to
the tower's size, bicubic, centre crop, CLIP mean/std), as IP-Adapter's own pipeline does.
Stimuli are read a batch at a time (NSD's training stimuli are 4.8 GB as uint8) and the result is written
through a memory-mapped temporary file, then renamed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..images import ImageSet
from .ip_adapter import IPAdapterWeights
from .sources import image_projection


@torch.no_grad()
def embed_images(images: ImageSet, ip: IPAdapterWeights, encoder, out: str | Path, batch: int = 16,
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """Write (len(images), num_tokens, dim) float32 tokens to `out` (.npy), in the image set's order."""
    from transformers import CLIPImageProcessor

    out = Path(out)
    proj = image_projection(ip)
    side = int(encoder.config.image_size)
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    keys = list(images.keys)
    dim = ip.resampler.output_dim
    tmp = out.with_name(f".{out.name}.partial.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(keys), ip.num_tokens, dim))
    try:
        for i in range(0, len(keys), batch):
            chunk = images.read(keys[i:i + batch])                          # (b, H, W, 3) float in [0, 1]
            pix = processor(images=list(np.round(chunk * 255).astype(np.uint8)), return_tensors="pt").pixel_values
            hidden = encoder(pix, output_hidden_states=True).hidden_states[-2]  # (b, 257, 1280) for ViT-H/14
            arr[i:i + len(chunk)] = proj(hidden).float().numpy()             # (b, 16, 768)
            if progress:
                progress(i + len(chunk), len(keys))
        arr.flush()
        del arr
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out
