"""`image.load` (an image file to a tensor) and `wan.clip_encoder` (Wan I2V's CLIP image tokens).

Images are decoded with PyAV (ffmpeg's PNG/JPEG/WebP decoders), so no imaging library
is needed, and resized to the spec's frame size the way Causal-Forcing's I2V loader
does (``transforms.Resize((H, W))``: bilinear with antialiasing, aspect not kept), or, with
``fit: cover``, the way Cosmos-Predict2.5's ``resize_input`` does: scaled (aspect kept) until it
covers the frame, sizes rounded up, then center-cropped.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import FdError
from engine.node import SESSION, Node, Param, Port
from engine.types import IMAGE, IMAGE_EMBEDDING
from nodes.common.model_node import Built, ModelNode
from nodes.common.params import checkpoint_param, dtype_bytes, dtype_param, seed_param

WAN_CLIP = "hf://Wan-AI/Wan2.1-I2V-14B-480P/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"


def read_image(path: str | Path) -> np.ndarray:
    """The first frame of an image file as uint8 RGB [H, W, 3]."""
    import av

    p = Path(path).expanduser()
    if not p.is_file():
        raise FdError(f"image {p}: no such file")
    try:
        with av.open(str(p)) as container:
            frame = next(container.decode(video=0))
            return frame.to_ndarray(format="rgb24")
    except (av.FFmpegError, StopIteration) as e:
        raise FdError(f"image {p}: cannot decode it ({e})") from e


FITS = ("stretch", "cover")


def to_model_image(rgb: np.ndarray, height: int, width: int, fit: str = "stretch") -> torch.Tensor:
    """uint8 [H, W, 3] -> [1, 3, height, width] float32 in [-1, 1]; ``fit`` stretch (aspect not kept) or cover
    (aspect kept, scaled to cover the frame with sizes rounded up, then center-cropped)."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255.0
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    size = (height, width)
    if fit == "cover":
        h, w = x.shape[-2:]
        ratio = max(width / w, height / h)
        size = (math.ceil(ratio * h), math.ceil(ratio * w))
    if x.shape[-2:] != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    if size != (height, width):   # center crop, offsets rounded as torchvision's center_crop
        top, left = int(round((size[0] - height) / 2.0)), int(round((size[1] - width) / 2.0))
        x = x[..., top: top + height, left: left + width]
    return (x.clamp(0, 1) * 2 - 1).contiguous()


class ImageLoadNode(Node):
    type_name = "image.load"
    doc = ("Reads an image file (PNG, JPEG, ... via PyAV) into [1, 3, height, width] in [-1, 1], resized to the "
           "video size.")
    outputs = (Port("image", IMAGE, "[N, 3, height, width] in [-1, 1] (N = 1, or the number of `paths`)"),)
    params = (
        Param("path", str, None, "image file", nullable=True),
        Param("paths", list, None, "several image files stacked on the batch axis (a multi-view model's first "
              "frames, in its view order); when set, `path` is not read", nullable=True),
        Param("height", int, 480, "frame height in pixels", min=8),
        Param("width", int, 832, "frame width in pixels", min=8),
        Param("fit", str, "stretch", "an image of another aspect: stretch (resized to the frame, aspect not kept; "
              "Wan / Causal-Forcing) or cover (aspect kept, center-cropped; Cosmos-Predict2.5)", choices=FITS),
    )
    phase = SESSION

    def run(self, inputs, state, step):
        paths = [self.p.path] if self.p.paths is None else list(self.p.paths)
        if not paths or None in paths:
            raise FdError(f"node {self.name!r}: no image: set params.path (or params.paths for several)")
        imgs = [to_model_image(read_image(str(p)), self.p.height, self.p.width, self.p.fit) for p in paths]
        return {"image": torch.cat(imgs).to(self.device)}


class ClipEncoderNode(ModelNode):
    type_name = "wan.clip_encoder"
    doc = ("Wan 2.1 I2V image encoder: open-clip XLM-RoBERTa ViT-H/14 vision tower, penultimate tokens "
           "[B, 257, 1280] of the conditioning image.")
    inputs = (Port("image", IMAGE, "image [B, 3, H, W] in [-1, 1]"),)
    outputs = (Port("tokens", IMAGE_EMBEDDING, "[B, 1 + (size/patch)^2, hidden] (Wan: 257 x 1280)"),)
    params = (
        checkpoint_param(WAN_CLIP, "CLIP weights (Wan .pth, open-clip or HF CLIPVisionModel layout)"),
        Param("num_heads", int, 16, "attention heads (not in the weights; 16 for ViT-H/14)", min=1),
        Param("hidden", int, 1280, "width (random weights)", min=1),
        Param("layers", int, 32, "transformer layers (random weights)", min=2),
        Param("mlp", int, 5120, "MLP width (random weights)", min=1),
        Param("patch", int, 14, "patch size (random weights)", min=1),
        Param("image_size", int, 224, "input size (random weights)", min=1),
        dtype_param("auto"),
        seed_param(),
    )
    phase = SESSION

    def estimate_bytes(self) -> int:
        """Counted from the size params, not on a meta module: planning need not import transformers."""
        p = self.p
        h, positions = p.hidden, (p.image_size // p.patch) ** 2 + 1
        per_layer = 4 * h * h + 2 * h * p.mlp + 9 * h + p.mlp        # q/k/v/out + MLP with biases, two norms
        embeddings = h + 3 * p.patch * p.patch * h + positions * h    # class token, patches, positions
        count = p.layers * per_layer + embeddings + 4 * h             # + pre and post layer norms
        return count * dtype_bytes(p.dtype, self.device)

    def build_random(self):
        from transformers import CLIPVisionConfig, CLIPVisionModel
        p = self.p
        return CLIPVisionModel(CLIPVisionConfig(hidden_size=p.hidden, intermediate_size=p.mlp,
                                                num_hidden_layers=p.layers, num_attention_heads=p.num_heads,
                                                patch_size=p.patch, image_size=p.image_size, hidden_act="gelu",
                                                layer_norm_eps=1e-5))

    def build_from(self, checkpoint) -> Built:
        from transformers import CLIPVisionModel

        from .clip import config_from_state_dict, to_hf_state_dict
        hf = to_hf_state_dict(checkpoint)  # Wan, open-clip or HF layout -> HF names
        with torch.device("meta"):
            model = CLIPVisionModel(config_from_state_dict(hf, self.p.num_heads))
        return Built(model, hf)

    def constants(self, model) -> None:
        """position_ids is a non-persistent buffer: in no checkpoint, and zeroed by random init."""
        model.embeddings.position_ids = torch.arange(model.embeddings.num_positions, device=self.device)[None]

    def run(self, inputs, state, step):
        from .clip import penultimate_features, preprocess
        model = self.require_model()
        pixels = preprocess(inputs["image"], model.config.image_size)
        return {"tokens": penultimate_features(model, pixels).float()}


NODE_TYPES = (ImageLoadNode, ClipEncoderNode)
