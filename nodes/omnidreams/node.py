"""`omnidreams.dit`: the OmniDreams streaming DiT as a ``causal_denoiser`` for ``ar.sampler``.

Loads the released single-view checkpoint (``hf://nvidia/omni-dreams-models/single_view/
2b_res720p_30fps_i2v_hdmap_distilled.pt``: a flat dict of ``net.*`` tensors) or builds random weights of the
size params. Sizes come from the weights (the HD-map channel count from ``additional_patch_embedding``);
what no tensor holds (patch sizes, RoPE extrapolation ratios, timestep scale) are params whose defaults are
the released config. The first-frame latent (``image_latent``, [B, 1, C, h, w], e.g. a VAE encode of the
first frame) is optional: when wired it is stamped into latent frame 0 of the first block with condition
mask 1. The HD-map latent of each block reaches the model as ``ar.sampler``'s ``hdmap`` input.
"""
from __future__ import annotations

import torch

from engine.errors import FdError
from engine.node import SESSION, Node, Param, Port
from engine.types import CAUSAL_DENOISER, LATENT, TEXT_EMBEDDING
from nodes.common.attention import BACKENDS
from nodes.common.model_node import Built, ModelNode
from nodes.common.params import checkpoint_param, dtype_param, seed_param
from nodes.cosmos.config import CosmosConfig, native_keys
from nodes.cosmos.node import open_cosmos_checkpoint

from .causal import OmniDreamsCausal
from .hdmap import HDMapPixelShuffleNode, HDMapVideoNode
from .keymap import config_from_state_dict, final_rows_to_module

# camera name -> view AdaLN embedder row (the multi-view OmniDreams mapping)
CAMERA_VIEWS = {"camera_front_wide_120fov": 0, "camera_cross_right_120fov": 1, "camera_rear_right_70fov": 2,
                "camera_rear_tele_30fov": 3, "camera_rear_left_70fov": 4, "camera_cross_left_120fov": 5,
                "camera_front_tele_30fov": 6}
CONFIG_PARAMS = ("patch_spatial", "patch_temporal", "concat_padding_mask", "rope_h_extrapolation_ratio",
                 "rope_w_extrapolation_ratio", "rope_t_extrapolation_ratio", "timestep_scale")
SIZE_PARAMS = ("in_channels", "model_channels", "num_blocks", "num_heads", "mlp_ratio", "crossattn_emb_channels",
               "crossattn_proj_in_channels", "adaln_lora_dim")


class OmniDreamsDiTNode(ModelNode):
    type_name = "omnidreams.dit"
    doc = ("OmniDreams HD-map conditioned streaming DiT (Cosmos-Predict2.5 network + HD-map patch embedding, "
           "windowed KV cache without sink): the released single-view net.* checkpoint or random weights.")
    inputs = (Port("image_latent", LATENT, "first-frame latent [B, 1, C, h, w], stamped into latent frame 0 of "
                   "block 0 with condition mask 1", optional=True),
              Port("negative_text", TEXT_EMBEDDING, "negative prompt embeddings [1 or B, L, C] of classifier-free "
                   "guidance (needed when guidance != 1: the diffusion-forcing teacher)", optional=True))
    outputs = (Port("model", CAUSAL_DENOISER, "the model behind the causal-model contract (drives ar.sampler)"),)
    params = (
        checkpoint_param("random", "DiT weights (single_view/2b_res720p_30fps_i2v_hdmap_distilled.pt)"),
        Param("in_channels", int, 16, "latent channels (random weights)", min=1),
        Param("hdmap_channels", int, 16, "HD-map latent channels: 16 (VAE latent) or 192 (pixel shuffle) "
              "(random weights)", min=1),
        Param("model_channels", int, 2048, "hidden size (random weights)", min=6),
        Param("num_blocks", int, 28, "transformer blocks (random weights)", min=1),
        Param("num_heads", int, 16, "attention heads (random weights)", min=1),
        Param("mlp_ratio", float, 4.0, "MLP width / hidden size (random weights)", min=0.0),
        Param("crossattn_emb_channels", int, 1024, "text width after crossattn_proj (random weights)", min=1),
        Param("crossattn_proj_in_channels", int, 100352, "text feature width before crossattn_proj "
              "(Cosmos-Reason1: 100352) (random weights)", min=1),
        Param("adaln_lora_dim", int, 256, "AdaLN-LoRA rank (random weights)", min=1),
        Param("patch_spatial", int, 2, "spatial patch size (not stored in checkpoints)", min=1),
        Param("patch_temporal", int, 1, "temporal patch size (not stored in checkpoints)", min=1),
        Param("concat_padding_mask", bool, True, "the checkpoint's input has padding-mask columns (fed zeros)"),
        Param("rope_h_extrapolation_ratio", float, 3.0, "RoPE NTK ratio along height", min=0.0),
        Param("rope_w_extrapolation_ratio", float, 3.0, "RoPE NTK ratio along width", min=0.0),
        Param("rope_t_extrapolation_ratio", float, 1.0, "RoPE NTK ratio along time", min=0.0),
        Param("timestep_scale", float, 0.001, "factor on the timestep before the sinusoid", min=0.0),
        Param("views", list, None, "multi-view: the camera names of the views, in sample order (a session's batch "
              f"is B x views); one of {', '.join(CAMERA_VIEWS)}; null: a single-view checkpoint", nullable=True),
        Param("camera_embeddings", int, 7, "multi-view, random weights: rows of the view AdaLN embedder", min=1),
        Param("guidance", float, 1.0, "classifier-free guidance scale (1: off, the distilled models; the "
              "diffusion-forcing teacher: 3). Each branch keeps its own KV cache, as upstream", min=0.0),
        Param("text_len", int, 512, "prompt tokens of the text embeddings (sizes the cross-attention K/V in the "
              "memory plan; the model takes any length)", min=1),
        Param("attention", str, "auto", "attention backend", choices=BACKENDS),
        dtype_param(),
        seed_param(),
    )
    phase = SESSION

    def preflight(self, upstream) -> None:
        """Before any weight is read: guidance needs the negative prompt wired."""
        if float(self.p.guidance) != 1.0 and "negative_text" not in upstream:
            raise FdError(f"node {self.name!r} (omnidreams.dit): guidance {self.p.guidance} needs negative prompt "
                          "embeddings; wire `negative_text` (a text encoder of the negative prompt) or set guidance: 1")

    def _config_values(self) -> dict:
        return {k: getattr(self.p, k) for k in CONFIG_PARAMS}

    def size_config(self) -> CosmosConfig:
        over = {k: getattr(self.p, k) for k in SIZE_PARAMS}
        try:
            return CosmosConfig(**over, out_channels=self.p.in_channels, **self._config_values())
        except ValueError as e:
            raise FdError(f"node {self.name!r} (omnidreams.dit): {e}") from e

    def cache_layout(self) -> dict:
        """What ar.sampler needs to size this model's caches before any weight is read (nodes/ar/memory.py):
        per sample (a view is a sample) one windowed self-attention cache and the prompt's cross K/V, twice
        with guidance (the unconditional branch keeps its own)."""
        from nodes.common.params import resolve_dtype
        cfg, dtype = self.size_config(), resolve_dtype(self.p.dtype, self.device)
        return {"num_layers": cfg.num_blocks, "num_heads": cfg.num_heads, "head_dim": cfg.head_dim,
                "patch": (cfg.patch_spatial, cfg.patch_spatial), "dim": cfg.model_channels,
                "ffn_dim": cfg.mlp_dim, "text_len": self.p.text_len,
                "kv_copies": 1 if float(self.p.guidance) == 1.0 else 2,
                "dtype": str(dtype).removeprefix("torch."), "dtype_bytes": dtype.itemsize}

    def view_indices(self) -> list[int] | None:
        if self.p.views is None:
            return None
        unknown = [v for v in self.p.views if v not in CAMERA_VIEWS]
        if unknown or not self.p.views:
            raise FdError(f"node {self.name!r} (omnidreams.dit): views {self.p.views}: unknown camera(s) {unknown}; "
                          f"known: {', '.join(CAMERA_VIEWS)}")
        return [CAMERA_VIEWS[v] for v in self.p.views]

    def build_random(self):
        from .model import OmniDreamsNet
        return OmniDreamsNet(self.size_config(), self.p.hdmap_channels,
                             self.p.camera_embeddings if self.p.views else 0)

    def open_weights(self):
        return native_keys(open_cosmos_checkpoint(self.p.checkpoint))

    def build_from(self, sd) -> Built:
        from .model import OmniDreamsNet
        try:
            cfg, hd, cams = config_from_state_dict(sd, **self._config_values())
        except (KeyError, ValueError) as e:
            raise FdError(f"node {self.name!r} (omnidreams.dit): {self.p.checkpoint} is not an OmniDreams DiT "
                          f"checkpoint: {e}") from e
        if bool(cams) != (self.p.views is not None):
            raise FdError(f"node {self.name!r} (omnidreams.dit): {self.p.checkpoint} is a "
                          + (f"multi-view checkpoint ({cams} cameras) but the spec sets no views" if cams else
                             f"single-view checkpoint but the spec sets {len(self.p.views)} views; set views: null"))
        if cfg.in_channels != cfg.out_channels:
            raise FdError(f"node {self.name!r} (omnidreams.dit): {self.p.checkpoint} reads as {cfg.in_channels} "
                          f"latent input channels but {cfg.out_channels} output channels; check concat_padding_mask")
        with torch.device("meta"):
            return Built(OmniDreamsNet(cfg, hd, cams), sd)

    def finish(self, module):
        module.backend = self.p.attention
        if not self.random_weights:   # checkpoint rows (kt, kh, kw, c) -> the module's (kh, kw, kt, c)
            w = module.final_layer.linear.weight
            w.data.copy_(final_rows_to_module(w.data.clone(), module.cfg))
        return module

    def run(self, inputs, state, step):
        try:
            model = OmniDreamsCausal(self.require_model(), image=inputs.get("image_latent"), views=self.view_indices(),
                                     guidance=self.p.guidance, negative_text=inputs.get("negative_text"))
        except ValueError as e:
            raise FdError(f"node {self.name!r} (omnidreams.dit): {e}") from e
        return {"model": model}


class HDMapFileNode(Node):
    """Per-block HD-map latents from one safetensors file: block b reads the tensor named ``key`` with
    ``{block}`` replaced by b, [B, f, C_hd, h, w] (a leading single-view axis [B, 1, f, ...] is dropped).
    Its frame count, channels and size are checked against the params, so a file that does not match the
    chunk is a clear error, not a shape failure deep in the DiT."""
    type_name = "omnidreams.hdmap_file"
    doc = "HD-map latents per block from a safetensors file (tensor `key` with {block} = the block index)."
    outputs = (Port("latent", LATENT, "the block's HD-map latent [B, f, C_hd, h, w]"),)
    params = (
        Param("path", str, "", "safetensors file holding one tensor per block"),
        Param("key", str, "hdmap.{block}", "tensor name; {block} is replaced by the block index"),
        Param("frames", int, 2, "latent frames per block (the sampler's frames_per_block)", min=1),
        Param("channels", int, 16, "HD-map latent channels (the DiT's hdmap_channels)", min=1),
        Param("height", int, 88, "latent height", min=1),
        Param("width", int, 160, "latent width", min=1),
    )

    def run(self, inputs, state, step):
        from nodes.checkpoint import resolve
        from safetensors import safe_open
        b = step.block or 0
        name = self.p.key.format(block=b)
        with safe_open(str(resolve(self.p.path, kind="file")), framework="pt") as f:
            if name not in f.keys():
                raise FdError(f"node {self.name!r}: {self.p.path} has no tensor {name!r} for block {b} "
                              f"(it holds {len(list(f.keys()))} tensors)")
            t = f.get_tensor(name)
        if t.ndim == 6 and t.shape[1] == 1:
            t = t[:, 0]
        want = (self.p.frames, self.p.channels, self.p.height, self.p.width)
        if t.ndim != 5 or tuple(t.shape[1:]) != want:
            raise FdError(f"node {self.name!r}: HD-map {name!r} of block {b} is {list(t.shape)}, expected "
                          f"[B, {', '.join(map(str, want))}] (frames per block, channels, latent height, width)")
        return {"latent": t.to(self.device, torch.float32)}


NODE_TYPES = (OmniDreamsDiTNode, HDMapFileNode, HDMapVideoNode, HDMapPixelShuffleNode)
