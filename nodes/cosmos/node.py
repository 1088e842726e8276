"""`cosmos.dit` (the Cosmos-Predict2 / 2.5 DiT as a DENOISER) and `cosmos.sampler` (Video2World sampling).

``cosmos.dit`` loads a released checkpoint (``model-*.pt``: a flat dict of ``net.*`` tensors; ``net_ema.*``
also taken) or builds random weights of the size params. Sizes come from the weights; what no tensor holds
(patch sizes, RoPE extrapolation ratios, timestep scale, fps modulation) are params whose defaults are
the Predict2 2B config. ``variant`` states which family the spec expects: a Predict2 checkpoint (no
``crossattn_proj``) given to a Predict2.5 spec, or the other way round, is refused.

``cosmos.sampler`` is bidirectional: the whole clip in engine block 0, as ``Video2WorldPipeline``. ``solver: ab2``
is Predict2's (Karras sigmas + RectifiedFlowAB2 on x0 predictions, x0 guidance against the negative prompt);
``solver: unipc`` is Predict2.5's (velocity predictions, UniPC over Karras flow sigmas or the shifted schedule,
velocity guidance; ``flow_video2world.py``). With ``condition`` wired
(clean latent frames, e.g. ``wan.vae_encode`` of the first image) the first latent frames are kept clean
(I2V); without it, every frame is generated (T2V). It does not stream through ``ar.sampler``: Cosmos-Predict2
is a bidirectional model with no causal cache.
"""
from __future__ import annotations

import torch

from engine.errors import FdError
from engine.node import SESSION, Node, Param, Port
from engine.types import DENOISER, INT, LATENT, TEXT_EMBEDDING
from nodes.common.attention import BACKENDS
from nodes.common.model_node import Built, ModelNode
from nodes.common.params import checkpoint_param, dtype_bytes, dtype_param, is_random, seed_param

from .config import CosmosConfig, native_keys

VARIANTS = ("predict2", "predict2.5")
SOLVERS = ("ab2", "unipc")
SCHEDULES = ("karras", "shift")   # flow_video2world.flow_schedule
SIGMA_DEFAULTS = {"ab2": (0.002, 80.0), "unipc": (0.01, 200.0)}   # (sigma_min, sigma_max) of each solver upstream
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Params that are the model's config, not its sizes: no tensor records them.
CONFIG_PARAMS = ("patch_spatial", "patch_temporal", "concat_padding_mask", "video_condition",
                 "rope_h_extrapolation_ratio", "rope_w_extrapolation_ratio", "rope_t_extrapolation_ratio",
                 "rope_enable_fps_modulation", "timestep_scale")
SIZE_PARAMS = ("in_channels", "out_channels", "model_channels", "num_blocks", "num_heads", "mlp_ratio",
               "crossattn_emb_channels", "crossattn_proj_in_channels", "adaln_lora_dim")


class CosmosDiTNode(ModelNode):
    type_name = "cosmos.dit"
    doc = ("Cosmos-Predict2 / 2.5 DiT (MiniTrainDIT with the condition-frame mask channel): a released model-*.pt "
           "(net.* keys) or random weights of the size params.")
    outputs = (Port("model", DENOISER, "the loaded Cosmos DiT (drives cosmos.sampler)"),)
    params = (
        checkpoint_param("random", "DiT weights (model-*.pt of nvidia/Cosmos-Predict2-*)"),
        Param("variant", str, "predict2", "predict2 (T5-XXL text, 1024-d) or predict2.5 (Cosmos-Reason1 text "
              "through crossattn_proj); a checkpoint of the other family is refused", choices=VARIANTS),
        Param("in_channels", int, 16, "latent channels (random weights)", min=1),
        Param("out_channels", int, 16, "output latent channels (random weights)", min=1),
        Param("model_channels", int, 2048, "hidden size (random weights)", min=6),
        Param("num_blocks", int, 28, "transformer blocks (random weights)", min=1),
        Param("num_heads", int, 16, "attention heads (random weights; checkpoints give it through the q-norm size)",
              min=1),
        Param("mlp_ratio", float, 4.0, "MLP width / hidden size (random weights)", min=0.0),
        Param("crossattn_emb_channels", int, 1024, "text width the cross-attention reads (random weights)", min=1),
        Param("crossattn_proj_in_channels", int, None, "predict2.5, random weights: text feature width before "
              "crossattn_proj (100352 = Cosmos-Reason1's 28 layers x 3584)", min=1, nullable=True),
        Param("adaln_lora_dim", int, 256, "AdaLN-LoRA rank (random weights)", min=1),
        Param("patch_spatial", int, 2, "spatial patch size (not stored in checkpoints)", min=1),
        Param("patch_temporal", int, 1, "temporal patch size (not stored in checkpoints)", min=1),
        Param("concat_padding_mask", bool, True, "the input carries a padding-mask channel (not stored)"),
        Param("video_condition", bool, True, "the input carries the condition-frame mask channel (Video2World "
              "models; false for Text2Image checkpoints)"),
        Param("rope_h_extrapolation_ratio", float, 3.0, "RoPE NTK ratio along height (Predict2 2B: 3.0)", min=0.0),
        Param("rope_w_extrapolation_ratio", float, 3.0, "RoPE NTK ratio along width (Predict2 2B: 3.0)", min=0.0),
        Param("rope_t_extrapolation_ratio", float, 1.0, "RoPE NTK ratio along time (Predict2 2B: 1.0)", min=0.0),
        Param("rope_enable_fps_modulation", bool, False, "scale RoPE time positions by base_fps / fps "
              "(off for Predict2 2B)"),
        Param("timestep_scale", float, 1.0, "factor on the timestep before the sinusoid (Predict2: 1.0)", min=0.0),
        Param("attention", str, "auto", "attention backend", choices=BACKENDS),
        dtype_param(),
        seed_param(),
    )
    phase = SESSION

    # ------------------------------------------------------------------ config
    def _config_values(self) -> dict:
        return {k: getattr(self.p, k) for k in CONFIG_PARAMS}

    def size_config(self) -> CosmosConfig:
        """The config the size params describe (random weights, memory estimates)."""
        over = {k: getattr(self.p, k) for k in SIZE_PARAMS}
        if self.p.variant == "predict2.5" and over["crossattn_proj_in_channels"] is None:
            raise FdError(f"node {self.name!r} (cosmos.dit): variant predict2.5 with random weights needs "
                          "crossattn_proj_in_channels (the text feature width)")
        if self.p.variant == "predict2":
            over["crossattn_proj_in_channels"] = None
        try:
            return CosmosConfig(**over, **self._config_values())
        except ValueError as e:
            raise FdError(f"node {self.name!r} (cosmos.dit): {e}") from e

    # ------------------------------------------------------------------ loading
    def build_random(self):
        from .model import CosmosDiT
        return CosmosDiT(self.size_config())

    def open_weights(self):
        return native_keys(open_cosmos_checkpoint(self.p.checkpoint))

    def build_from(self, sd) -> Built:
        from .model import CosmosDiT
        try:
            cfg = CosmosConfig.from_state_dict(sd, **self._config_values())
        except (KeyError, ValueError) as e:
            raise FdError(f"node {self.name!r} (cosmos.dit): {self.p.checkpoint} is not a Cosmos-Predict2 DiT "
                          f"checkpoint: {e}") from e
        if cfg.in_channels != cfg.out_channels:
            raise FdError(f"node {self.name!r} (cosmos.dit): {self.p.checkpoint} reads as {cfg.in_channels} latent "
                          f"input channels but {cfg.out_channels} output channels; check concat_padding_mask "
                          f"({self.p.concat_padding_mask}) and video_condition ({self.p.video_condition}), whose "
                          "mask channels the input width includes")
        found = "predict2.5" if cfg.predict25 else "predict2"
        if found != self.p.variant:
            what = ("has crossattn_proj (a Predict2.5 checkpoint: Cosmos-Reason1 text)" if cfg.predict25 else
                    "has no crossattn_proj (a Predict2 checkpoint: T5 text)")
            raise FdError(f"node {self.name!r} (cosmos.dit): {self.p.checkpoint} {what}, but the spec says "
                          f"variant: {self.p.variant}; use a {self.p.variant} checkpoint or set variant: {found} "
                          "(and its text encoder)")
        with torch.device("meta"):
            return Built(CosmosDiT(cfg), sd)

    def finish(self, module):
        module.backend = self.p.attention
        return module

    @property
    def random_weights(self) -> bool:
        return is_random(self.p.checkpoint)

    def run(self, inputs, state, step):
        return {"model": self.require_model()}


def open_cosmos_checkpoint(ref: str):
    """A safetensors file / folder through ``open_checkpoint``; a torch file (``model-*.pt``) memory-mapped
    with ``weights_only``, keeping only its tensors (Transformer Engine ``_extra_state`` entries may be
    other objects; they are dropped anyway)."""
    from nodes.checkpoint import CheckpointError, open_checkpoint, resolve

    text = str(ref)
    if not text.endswith(TORCH_SUFFIXES):
        return open_checkpoint(text)
    path = resolve(text, kind="file")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint (weights_only=True): {e}") from e
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


class CosmosSamplerNode(Node):
    type_name = "cosmos.sampler"
    doc = ("Cosmos-Predict2 / 2.5 Video2World sampling of a whole clip in block 0: Predict2's Karras sigmas + "
           "RectifiedFlowAB2 with x0 guidance (solver ab2), or Predict2.5's UniPC over Karras flow sigmas with "
           "velocity guidance (solver unipc); I2V when condition latents are wired.")
    inputs = (
        Port("model", DENOISER, "Cosmos DiT (cosmos.dit)"),
        Port("text", TEXT_EMBEDDING, "prompt embeddings [B, L, C]"),
        Port("negative", TEXT_EMBEDDING, "negative prompt embeddings; without them, no guidance", optional=True),
        Port("condition", LATENT, "I2V: clean latent frames [B, f, C, h, w] kept as the first f frames "
             "(e.g. wan.vae_encode of the first image)", optional=True),
        Port("seed", INT, "noise seed (else the seed param)", optional=True),
    )
    outputs = (Port("latent", LATENT, "clean latents of the clip [B, 1 + (frames-1)/4, C, h, w]"),)
    params = (
        Param("mode", str, "t2v", "t2v (every frame generated) or i2v (needs the condition input)",
              choices=("t2v", "i2v")),
        Param("solver", str, "ab2", "ab2 (Predict2: x0 prediction, RectifiedFlowAB2) or unipc (Predict2.5: "
              "velocity prediction, FlowUniPC)", choices=SOLVERS),
        Param("num_steps", int, 35, "sampling steps (ab2: one more x0 pass at sigma_min; unipc with the karras "
              "schedule: N + 1 model calls, as upstream)", min=1),
        Param("sigma_min", float, None, "smallest Karras sigma (default ab2: 0.002, unipc: 0.01)", min=0.0,
              nullable=True),
        Param("sigma_max", float, None, "largest Karras sigma (default ab2: 80, unipc: 200)", min=0.0, nullable=True),
        Param("rho", float, 7.0, "Karras schedule exponent", min=0.0),
        Param("schedule", str, "karras", "unipc: karras (EDM sigmas as flow sigmas s/(1+s); the released "
              "post-trained 2B) or shift (shifted linear flow sigmas)", choices=SCHEDULES),
        Param("shift", float, 5.0, "unipc with schedule shift: the flow shift", min=0.0),
        Param("guidance", float, 7.0, "guidance cond + g (cond - uncond) on x0 (ab2) or velocity (unipc); needs "
              "the negative input", min=0.0),
        Param("sigma_conditional", float, 1e-4, "ab2, I2V: the noise level the clean frames' timestep is given",
              min=0.0),
        Param("conditional_frame_timestep", float, 0.1, "unipc, I2V: the clean frames' timestep (1000 scale; "
              "negative: not pinned, as the pre-trained config)"),
        Param("frames", int, 93, "pixel frames (1 + 4k; 93 = 24 latent frames)", min=1),
        Param("temporal_compression", int, 4, "pixel frames per latent frame after the first (Wan VAE: 4)", min=1),
        Param("latent_channels", int, None, "noise channels (default: the DiT's)", min=1, nullable=True),
        Param("latent_height", int, 88, "latent height (pixel height / 8; 704 px)", min=1),
        Param("latent_width", int, 160, "latent width (pixel width / 8; 1280 px)", min=1),
        Param("fps", float, 16.0, "frame rate given to the DiT (used only with RoPE fps modulation)", min=0.0),
        Param("batch_cfg", bool, True, "run the cond and uncond branches as one forward of twice the batch "
              "(same result, fewer kernel launches)"),
        Param("seed", int, 0, "noise seed when the seed input is not wired"),
    )

    def run(self, inputs, state, step):
        from .video2world import Video2World

        if step.block not in (0, None):
            raise FdError(f"node {self.name!r}: cosmos.sampler makes the whole clip in block 0; run one block "
                          "(inputs.num_blocks: 1)")
        from .model import CosmosDiT

        model = inputs["model"]
        if not isinstance(model, CosmosDiT):
            raise FdError(f"node {self.name!r}: cosmos.sampler needs a Cosmos DiT (cosmos.dit) on its model input, "
                          f"got {type(model).__name__}")
        cfg = model.cfg
        tc = self.p.temporal_compression
        if (self.p.frames - 1) % tc:
            raise FdError(f"node {self.name!r}: frames={self.p.frames} must be 1 + {tc}k")
        f_lat = (self.p.frames - 1) // tc + 1
        C = self.p.latent_channels or cfg.in_channels
        H, W = self.p.latent_height, self.p.latent_width
        if f_lat % cfg.patch_temporal or H % cfg.patch_spatial or W % cfg.patch_spatial:
            raise FdError(f"node {self.name!r}: latent {f_lat}x{H}x{W} does not split into the DiT's "
                          f"{cfg.patch_temporal}x{cfg.patch_spatial}x{cfg.patch_spatial} patches")
        dev = next(model.parameters()).device
        cond_frames, gt = self._condition(inputs.get("condition"), (C, f_lat, H, W), dev)
        text = inputs["text"].to(dev)
        negative = inputs.get("negative")
        B = text.shape[0]
        self._check_text(model, text, negative)
        seed = int(inputs.get("seed", self.p.seed))
        with torch.no_grad():
            cond = model.prepare_cross(text)
            uncond = None if negative is None else model.prepare_cross(negative.to(dev))
            if gt is not None and gt.shape[0] != B:
                gt = gt.expand(B, *gt.shape[1:])
            if self.p.solver == "unipc":
                out = self._sample_unipc(model, cond, uncond, gt, cond_frames, (B, C, f_lat, H, W), seed, dev)
            else:
                v2w = Video2World(model, sigma_conditional=self.p.sigma_conditional, fps=self.p.fps)
                x0_fn = v2w.x0_fn(cond, uncond, self.p.guidance, gt=gt, num_conditional_frames=cond_frames,
                                  batched=self.p.batch_cfg)
                smin, smax = self._sigma_bounds()
                out = v2w.sample(x0_fn, (B, C, f_lat, H, W), seed, num_steps=self.p.num_steps,
                                 sigma_min=smin, sigma_max=smax, rho=self.p.rho, device=dev)
        return {"latent": out.transpose(1, 2)}

    def memory_estimate(self, upstream) -> dict:
        """For the memory plan: the text K/V of each prompt (every block's, computed once), the latents the
        loop keeps (noise, sample, clean frames, the solver's history; float32) and a rough bound for one DiT
        call: its tokens (x2 with batched guidance) times (MLP width + 8 widths) in the DiT's dtype, plus the
        float32 RoPE copies of q and k."""
        dit = upstream.get("model")
        if not isinstance(dit, CosmosDiTNode):
            return {"weights": 0, "weights_source": ""}
        try:
            cfg = dit.size_config()
        except FdError:
            return {"weights": 0, "weights_source": ""}
        nbytes = dtype_bytes(dit.p.dtype, dit.device)
        f_lat = (self.p.frames - 1) // self.p.temporal_compression + 1
        H, W, C = self.p.latent_height, self.p.latent_width, self.p.latent_channels or cfg.in_channels
        tokens = (f_lat // cfg.patch_temporal) * (H // cfg.patch_spatial) * (W // cfg.patch_spatial)
        text_len = getattr(getattr(upstream.get("text"), "p", None), "text_len", 512)
        prompts = 2 if "negative" in upstream else 1
        D = cfg.model_channels
        cross = prompts * cfg.num_blocks * 2 * text_len * D * nbytes
        latents = 6 * C * f_lat * H * W * 4
        batch = prompts if self.p.batch_cfg else 1
        act = batch * tokens * ((cfg.mlp_dim + 8 * D) * nbytes + 4 * D * 4)
        return {"weights": 0, "weights_source": "", "state": cross + latents,
                "state_what": f"text K/V of {prompts} prompt(s) {cross / 2**20:.0f} MiB, latents "
                              f"{latents / 2**20:.0f} MiB ({tokens} tokens per forward)",
                "activations": act}

    def _sigma_bounds(self) -> tuple[float, float]:
        lo, hi = SIGMA_DEFAULTS[self.p.solver]
        smin = lo if self.p.sigma_min is None else self.p.sigma_min
        smax = hi if self.p.sigma_max is None else self.p.sigma_max
        if not 0 < smin < smax:
            raise FdError(f"node {self.name!r}: need 0 < sigma_min < sigma_max, got {smin} and {smax}")
        return smin, smax

    def _sample_unipc(self, model, cond, uncond, gt, cond_frames, shape, seed, dev):
        from .flow_video2world import FlowVideo2World, flow_schedule

        smin, smax = self._sigma_bounds()
        fv2w = FlowVideo2World(model, conditional_frame_timestep=self.p.conditional_frame_timestep, fps=self.p.fps)
        fn = fv2w.velocity_fn(cond, uncond, self.p.guidance, gt=gt, num_conditional_frames=cond_frames,
                              batched=self.p.batch_cfg)
        schedule = flow_schedule(self.p.schedule, self.p.num_steps, self.p.shift, smin, smax, self.p.rho)
        return fv2w.sample(fn, shape, seed, schedule, device=dev)

    def _check_text(self, model, text, negative) -> None:
        """Text features of the width the DiT reads: Predict2 cross-attends T5 (1024), Predict2.5 projects
        Cosmos-Reason1's concatenated layers (crossattn_proj) first."""
        cfg = model.cfg
        want = cfg.crossattn_proj_in_channels if cfg.predict25 else cfg.crossattn_emb_channels
        for port, emb in (("text", text), ("negative", negative)):
            if emb is not None and (emb.ndim != 3 or emb.shape[-1] != want):
                what = ("a Predict2.5 DiT reads Cosmos-Reason1 features (all layers concatenated; "
                        "cosmos.reason1_encoder)" if cfg.predict25 else "a Predict2 DiT reads T5 features "
                        "(cosmos.text_encoder)")
                raise FdError(f"node {self.name!r}: {port} embeddings have shape {tuple(emb.shape)}, but {what} "
                              f"of width {want}; wire the text encoder that belongs to the DiT's variant")

    def _condition(self, latent, shape, dev):
        """(conditional frames, clean latents [B, C, T, H, W] padded with zeros) from the condition input."""
        C, T, H, W = shape
        if self.p.mode == "t2v":
            if latent is not None:
                raise FdError(f"node {self.name!r}: mode t2v, but the condition input is wired; set mode: i2v")
            return 0, None
        if latent is None:
            raise FdError(f"node {self.name!r}: mode i2v needs the condition input (the first image's latent, "
                          "e.g. image.load -> wan.vae_encode)")
        if latent.ndim != 5 or tuple(latent.shape[2:]) != (C, H, W):
            raise FdError(f"node {self.name!r}: condition latent has shape {tuple(latent.shape)}, expected "
                          f"[B, f, {C}, {H}, {W}] (an image of {W * 8}x{H * 8} px through the VAE); resize the "
                          "image to the spec's size or change latent_height/latent_width")
        f = latent.shape[1]
        if not 1 <= f < T:
            raise FdError(f"node {self.name!r}: {f} condition latent frames for a {T}-frame clip")
        gt = latent.new_zeros(latent.shape[0], C, T, H, W, device=dev, dtype=torch.float32)
        gt[:, :, :f] = latent.to(dev, torch.float32).transpose(1, 2)
        return f, gt


NODE_TYPES = (CosmosDiTNode, CosmosSamplerNode)

__all__ = ["CosmosDiTNode", "CosmosSamplerNode", "NODE_TYPES", "open_cosmos_checkpoint"]
