"""Feature networks of the reconstruction metrics, loaded from local weight files (never downloaded).

The networks and nodes are those of MindEye's and Brain-Diffuser's evaluation code (REFERENCE.md):
torchvision AlexNet (features.4, features.11), InceptionV3 (avgpool), EfficientNet-B1 (avgpool), a ResNet-50
with SwAV weights (avgpool), and CLIP ViT-L/14's image embedding (transformers' CLIPVisionModelWithProjection,
the same network and weights as OpenAI's `clip` package, which ships a TorchScript archive we will not load).
Weight files are read with `torch.load(weights_only=True)`; pickled code never runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import WeightsError, first_line, torch_load_error, torch_weights

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Network:
    """One feature network: where its weights live under --weights-dir and what it returns."""

    name: str
    files: tuple[str, ...]            # accepted names in --weights-dir, first is preferred
    nodes: tuple[str, ...]            # torchvision graph nodes whose outputs are the features
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def find(self, weights_dir: Path | None) -> Path | None:
        if weights_dir is None:
            return None
        for f in self.files:
            if (Path(weights_dir) / f).exists():
                return Path(weights_dir) / f
        return None


NETWORKS = {
    "alexnet": Network("alexnet", ("alexnet-owt-7be5be79.pth",), ("features.4", "features.11"),
                       IMAGENET_MEAN, IMAGENET_STD),
    "inception": Network("inception", ("inception_v3_google-0cc3c7bd.pth",), ("avgpool",),
                         IMAGENET_MEAN, IMAGENET_STD),
    # torchvision's DEFAULT for B1 is IMAGENET1K_V2 (what MindEye used); V1 has the same architecture
    "effnet": Network("effnet", ("efficientnet_b1-c27df63c.pth", "efficientnet_b1_rwightman-bac287d4.pth"),
                      ("avgpool",), IMAGENET_MEAN, IMAGENET_STD),
    "swav": Network("swav", ("swav_800ep_pretrain.pth.tar", "swav_800ep_pretrain.pth"), ("avgpool",),
                    IMAGENET_MEAN, IMAGENET_STD),
    "clip": Network("clip", ("clip-vit-large-patch14",), ("image_embeds",), CLIP_MEAN, CLIP_STD),
}


def load_clip_vision(path: str | Path, projection: bool = True):
    """transformers' CLIPVisionModelWithProjection from a local folder (config + weights), in eval mode.
    `projection` False: a folder without the image-embedding projection serves (IP-Adapter reads hidden states)."""
    from transformers import CLIPVisionModelWithProjection

    path = Path(path)
    if not path.is_dir():
        raise WeightsError(f"{path}: no such CLIP vision folder")
    return load_pretrained(CLIPVisionModelWithProjection, path, optional=() if projection else ("visual_projection.",))


def load_pretrained(cls, path: Path, optional: tuple[str, ...] = ()):
    """`cls.from_pretrained` of a local diffusers / transformers folder, in eval mode, or WeightsError naming the
    folder, also when its weights leave some of the model's out or have other shapes: from_pretrained fills those
    with random values and only warns. Missing weights whose names start with one of `optional` are let be."""
    try:
        model, info = cls.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except Exception as e:  # noqa: BLE001  diffusers and transformers raise OSError, ValueError, RuntimeError, ...
        raise WeightsError(f"{path}: cannot load {cls.__name__}: {first_line(e, 300)}") from None
    for kind in ("missing_keys", "mismatched_keys", "error_msgs"):
        found = sorted(str(k) for k in info.get(kind) or []
                       if not (kind == "missing_keys" and str(k).startswith(optional)))
        if found:
            raise WeightsError(f"{path}: not a complete {cls.__name__} ({kind.replace('_', ' ')}: "
                               f"{', '.join(found[:3])}{', ...' if len(found) > 3 else ''})")
    return model.eval()


def _torchvision_model(name: str):
    from torchvision import models

    if name == "alexnet":
        return models.alexnet()
    if name == "inception":
        # torchvision's inception_v3(weights=...) turns transform_input on: it maps ImageNet-normalised
        # input to the (x - 0.5) / 0.5 the Google weights expect. MindEye loaded it that way.
        return models.inception_v3(aux_logits=True, transform_input=True, init_weights=False)
    if name == "effnet":
        return models.efficientnet_b1()
    if name == "swav":
        return models.resnet50()          # SwAV's hubconf: a torchvision ResNet-50 with the backbone weights
    raise KeyError(name)


class FeatureExtractor:
    """images (B, H, W, 3) float in [0, 1] -> {node: (B, D) float32}, after resizing to `size` and normalising."""

    def __init__(self, network: Network, path: Path):
        import torch

        self.network = network
        self.path = path
        if network.name == "clip":
            self.model = load_clip_vision(path)
        else:
            from torchvision.models.feature_extraction import create_feature_extractor

            model = _torchvision_model(network.name).eval()
            self.model = create_feature_extractor(model, return_nodes=list(network.nodes)).eval()
            self._load(torch)

    def _load(self, torch) -> None:
        try:
            state = torch_weights(self.path)
        except Exception as e:  # noqa: BLE001  an unpickling error, a truncated zip, ...: all mean "not a weight file"
            raise WeightsError(f"{self.path}: not a readable weight file ({torch_load_error(e)})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise WeightsError(f"{self.path}: holds {type(state).__name__}, not a state dict")
        state = {k.removeprefix("module."): v for k, v in state.items()}   # SwAV's checkpoint is DataParallel's
        own = self.model.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise WeightsError(f"{self.path}: not {self.network.name} weights: {len(missing)} key(s) missing, "
                               f"first {missing[0]}")
        for k, v in own.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise WeightsError(f"{self.path}: key {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
        self.model.load_state_dict({k: state[k] for k in own})    # the head past the feature nodes is not needed

    def input_size(self, size: int | None) -> int:
        if self.network.name == "clip":
            return int(self.model.config.image_size)
        return int(size)

    def __call__(self, images: np.ndarray, size: int | None) -> dict[str, np.ndarray]:
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2), np.float32))
        s = self.input_size(size)
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.network.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.network.std).view(1, 3, 1, 1)
        x = (x - mean) / std
        with torch.inference_mode():
            if self.network.name == "clip":
                return {"image_embeds": self.model(pixel_values=x).image_embeds.float().numpy()}
            out = self.model(x)
        return {k: v.float().flatten(1).numpy() for k, v in out.items()}
