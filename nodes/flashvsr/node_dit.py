"""`flashvsr.dit` (the loaded model) and `flashvsr.upscaler` (one streaming DiT chunk per engine block).

Why not the causal-model contract + ``ar.sampler``: FlashVSR is one step at t = 1000 with no context
pass (the denoising call itself leaves its K/V windows in the cache), its cache is a window cache of
whole temporal blocks that drops one block per call (not the frame ring of SelfKVCache), its chunks
are 6 latent frames then 2, its only per-block condition is a video whose size fixes the latent size
at run time (``ar.sampler`` takes latent sizes as params), and it has no prompt to switch (the prompt
is a fixed tensor). Behind the contract it would need a no-op commit, a fake text input and duplicated
size params; a small node that owns the stream is the clean fit.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch

from engine.errors import FdError
from engine.node import SESSION, Node, Param, Port
from engine.types import INT, LATENT, MODEL, PIXELS
from nodes.common.attention import BACKENDS
from nodes.common.model_node import Built, ModelNode
from nodes.common.params import checkpoint_param, dtype_param, require_loaded, seed_param

from .config import ATTENTION_MODES, StreamSettings
from .lq_proj import MODES as LQ_MODES
from .sparse_attention import KERNELS

REPO = "hf://JunhaoZhuang/FlashVSR-v1.1"
DIT_FILE = f"{REPO}/diffusion_pytorch_model_streaming_dmd.safetensors"
LQ_FILE = f"{REPO}/LQ_proj_in.ckpt"
PROMPT_HINT = ("upstream ships it in the GitHub repo OpenImagingLab/FlashVSR at "
               "examples/WanVSR/prompt_tensor/posi_prompt.pth (a [1, 512, 4096] tensor)")
PIXEL_BLOCK = 128   # (2, 8, 8)-token windows x patch 2 x VAE 8: frame sizes must be multiples of 128 px


class FlashVSRDiTNode(ModelNode):
    type_name = "flashvsr.dit"
    doc = ("FlashVSR's streaming DiT (Wan 2.1 1.3B with LQ injection and block-sparse attention), its LQ projector "
           "and fixed prompt embedding, loaded once per session and handed on as a model.")
    outputs = (Port("model", MODEL, "the loaded FlashVSR model (nodes.flashvsr.stream.FlashVSRModel)"),)
    params = (
        checkpoint_param(DIT_FILE, "DiT weights (diffusion_pytorch_model_streaming_dmd.safetensors)"),
        Param("lq_proj", str, LQ_FILE, "LQ projector weights (LQ_proj_in.ckpt); ignored with random weights"),
        Param("prompt", str, None, "the fixed prompt embedding tensor file (posi_prompt.pth, [1, L, text_dim]); "
              "random weights draw one when unset. " + PROMPT_HINT, nullable=True),
        Param("num_heads", int, None, "attention heads (not in the weights; default dim / 128, right for the "
              "released 1.3B)", min=1, nullable=True),
        Param("dim", int, 1536, "hidden size (random weights)", min=2),
        Param("ffn_dim", int, 8960, "FFN width (random weights)", min=1),
        Param("num_layers", int, 30, "blocks (random weights)", min=1),
        Param("text_dim", int, 4096, "prompt embedding width (random weights)", min=1),
        Param("prompt_len", int, 512, "rows of the random prompt embedding (random weights)", min=1),
        Param("lq_hidden", list, [2048, 3072], "the LQ projector's two conv widths (random weights)"),
        Param("attention", str, "auto", "attention backend of the cross-attention and the dense mode",
              choices=BACKENDS),
        Param("compile", str, "auto", "torch.compile the elementwise stages: auto = on CUDA",
              choices=("auto", "on", "off")),
        dtype_param(),
        seed_param(),
    )
    phase = SESSION

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handle = None

    # ------------------------------------------------------------------ sizes
    def _random_config(self):
        from nodes.wan.config import WanConfig
        heads = self.p.num_heads or max(1, self.p.dim // 128)
        return WanConfig(dim=self.p.dim, ffn_dim=self.p.ffn_dim, num_heads=heads, num_layers=self.p.num_layers,
                         text_dim=self.p.text_dim, text_len=self.p.prompt_len)

    def _random_lq_config(self, dim: int):
        from .lq_proj import LQProjConfig
        if len(self.p.lq_hidden) != 2:
            raise FdError(f"node {self.name!r}: lq_hidden must list 2 widths, got {self.p.lq_hidden}")
        return LQProjConfig(hidden1=int(self.p.lq_hidden[0]), hidden2=int(self.p.lq_hidden[1]), out_dim=dim)

    def estimate_bytes(self) -> int:
        from nodes.common.params import dtype_bytes
        with torch.device("meta"):
            lq = sum(p.numel() for m in self.companions_random() for p in m.parameters())
        return super().estimate_bytes() + lq * dtype_bytes(self.p.dtype, self.device)

    def companions_random(self):
        from .lq_proj import LQProjector
        return [LQProjector(self._random_lq_config(self.p.dim))]

    def preflight(self, upstream) -> None:
        if not self.random_weights and not self.p.prompt:
            raise FdError(f"node {self.name!r}: set prompt to the prompt embedding file; {PROMPT_HINT}")

    # ------------------------------------------------------------------ loading
    def build_random(self):
        from .dit import FlashVSRDiT
        return FlashVSRDiT(self._random_config())

    def build_from(self, sd) -> Built:
        from nodes.checkpoint import CheckpointError
        from nodes.wan.config import WanConfig
        from .dit import FlashVSRDiT
        try:
            cfg = WanConfig.from_state_dict(sd, num_heads=self.p.num_heads)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{self.p.checkpoint}: {e}") from e
        with torch.device("meta"):
            return Built(FlashVSRDiT(cfg), sd)

    def finish(self, module):
        module.backend = self.p.attention
        if self.p.compile == "on" or (self.p.compile == "auto" and str(self.device).startswith("cuda")):
            module.compile_elementwise()
        return module

    def loaded(self, module) -> None:
        from .stream import FlashVSRModel
        self.model = module
        try:
            self.handle = FlashVSRModel(module, self._load_lq_proj(module.cfg.dim), self._load_prompt(module.cfg))
        except ValueError as e:
            raise FdError(f"node {self.name!r}: {e}") from e

    def _load_lq_proj(self, dim: int):
        from nodes.checkpoint import CheckpointError, random_init, read_state_dict
        from .lq_proj import LQProjConfig, LQProjector
        if self.random_weights:
            with torch.device("meta"):
                proj = LQProjector(self._random_lq_config(dim))
            return random_init(proj, self.p.init_seed + 1, device=self.device, dtype=self.dtype).eval()
        sd = read_state_dict(self.p.lq_proj)
        try:
            proj = LQProjector(LQProjConfig.from_state_dict(sd, where=str(self.p.lq_proj)))
            proj.load_state_dict(sd, strict=True)
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(f"node {self.name!r}: {self.p.lq_proj}: {e}") from e
        return proj.to(self.device, self.dtype).eval().requires_grad_(False)

    def _load_prompt(self, cfg) -> torch.Tensor:
        if not self.p.prompt:
            g = torch.Generator().manual_seed(self.p.init_seed + 2)
            return torch.randn(1, self.p.prompt_len, cfg.text_dim, generator=g).to(self.device, self.dtype)
        return load_prompt(self.p.prompt).to(self.device, self.dtype)

    def run(self, inputs, state, step):
        return {"model": require_loaded(self, "handle")}


def load_prompt(ref: str) -> torch.Tensor:
    """The prompt embedding from a torch file (a tensor, or a dict holding one) or a one-tensor safetensors
    file -> [B, L, D]."""
    from nodes.checkpoint import CheckpointError, resolve
    path = resolve(ref, kind="file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj: Any = load_file(str(path))
        else:
            obj = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: say which, not a pickle traceback
        raise CheckpointError(f"{path}: cannot read a prompt embedding ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict):
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise CheckpointError(f"{path}: holds {len(tensors)} tensors; a prompt embedding file holds one")
        obj = tensors[0]
    if not isinstance(obj, torch.Tensor) or obj.dim() not in (2, 3):
        raise CheckpointError(f"{path}: expected a [1, L, D] prompt embedding tensor, got "
                              f"{getattr(obj, 'shape', type(obj).__name__)}")
    return (obj if obj.dim() == 3 else obj[None]).float()


@dataclass
class UpscalerState:
    stream: Any = None                        # nodes.flashvsr.stream.FlashVSRStream
    generator: torch.Generator | None = None
    restore: dict | None = None               # snapshot values, applied when the first block opens the stream


class FlashVSRUpscalerNode(Node):
    type_name = "flashvsr.upscaler"
    doc = ("One streaming FlashVSR DiT chunk per block: the block's LQ frames through the LQ projector, one step at "
           "t=1000 with block-sparse attention over the cached windows of earlier chunks; emits clean latents.")
    inputs = (
        Port("model", MODEL, "a flashvsr.dit model"),
        Port("video", PIXELS, "this block's LQ frames [B, T, 3, H, W] in [-1, 1], upscaled and cropped to multiples "
             "of 128 px: T = 25 at block 0, then 8; or whole chunks back to back (T = 0: none this block), "
             "as video.input hands out frames from an upstream node"),
        Port("seed", INT, "noise seed (else the seed param)", optional=True),
    )
    outputs = (Port("latent", LATENT, "clean latents of this block's chunk(s) [B, f, C, H/8, W/8] float32: f = 6 "
                    "for the first chunk, 2 per later one"),)
    params = (
        Param("attention", str, "sparse", "self-attention: sparse (upstream's block-sparse top-k) or dense (full)",
              choices=ATTENTION_MODES),
        Param("kernel", str, "auto", "sparse attention implementation: auto (Triton on CUDA, else masked dense), "
              "triton, masked", choices=KERNELS),
        Param("sparse_ratio", float, 2.0, "sparse budget: topk_ratio = sparse_ratio * 768*1280 / (H*W) (upstream: "
              "2.0 stable, 1.5 faster)", min=0.0),
        Param("topk_ratio", float, None, "explicit topk_ratio (overrides sparse_ratio's size rule)", min=0.0,
              nullable=True),
        Param("local_range", int, 11, "local band of key windows around each query window (upstream: 11 stable, "
              "9 sharper)", min=1),
        Param("kv_ratio", float, 3.0, "temporal blocks (2 latent frames each) of earlier chunks kept in the cache",
              min=1.0),
        Param("lq_mode", str, "causal", "LQ projector cache: causal (v1.1 Causal_LQ4x_Proj) or buffer (v1 "
              "Buffer_LQ4x_Proj); the weights do not tell them apart", choices=LQ_MODES),
        Param("seed", int, 0, "noise seed when the seed input is not wired"),
    )

    def settings(self) -> StreamSettings:
        p = self.p
        return StreamSettings(attention=p.attention, kernel=p.kernel, sparse_ratio=float(p.sparse_ratio),
                              topk_ratio=None if p.topk_ratio is None else float(p.topk_ratio),
                              local_range=int(p.local_range), kv_ratio=float(p.kv_ratio), lq_mode=p.lq_mode)

    def new_state(self) -> UpscalerState:
        return UpscalerState()

    def release(self, state: UpscalerState) -> None:
        state.stream = None

    def _frames(self, video: torch.Tensor, stream) -> torch.Tensor:
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[2] != 3:
            raise FdError(f"node {self.name!r}: video must be frames [B, T, 3, H, W], got "
                          f"{tuple(getattr(video, 'shape', ()))}")
        h, w = video.shape[-2:]
        if h % PIXEL_BLOCK or w % PIXEL_BLOCK or h < PIXEL_BLOCK or w < PIXEL_BLOCK:
            raise FdError(f"node {self.name!r}: frames of {h}x{w} px; FlashVSR needs multiples of {PIXEL_BLOCK} px "
                          "(its attention blocks are 128x128 px): crop or pad the upscaled frames to them")
        want = stream.lq_frames_wanted()
        if video.shape[1] != want:
            raise FdError(f"node {self.name!r}: chunk {stream.calls} takes {want} LQ frames, got {video.shape[1]} "
                          "(block 0: 25 = 1 + 6 x 4, later blocks: 8)")
        return video.transpose(1, 2)

    def run(self, inputs, state: UpscalerState, step):
        model = inputs["model"]
        seed = inputs.get("seed")
        seed = self.p.seed if seed is None else int(seed)
        if state.stream is None or state.stream.model is not model:
            try:
                state.stream = model.open_stream(self.settings())
            except ValueError as e:
                raise FdError(f"node {self.name!r}: {e}") from e
            state.generator = torch.Generator(device=model.device).manual_seed(seed)
            if state.restore is not None:
                self._restore(state, state.restore)
                state.restore = None
        stream = state.stream
        video = inputs["video"]
        latents, start = [], 0
        while not _is_empty(video):
            want = stream.lq_frames_wanted()
            chunk = video[:, start:start + want] if isinstance(video, torch.Tensor) else video
            frames = self._frames(chunk, stream)      # checks the frames and this chunk's count
            b, _, _, h, w = frames.shape
            noise = torch.randn((b, model.latent_channels, stream.latent_frames_next(), h // 8, w // 8),
                                generator=state.generator, device=model.device, dtype=torch.float32)
            latents.append(stream.step(noise, frames).transpose(1, 2))
            start += want
            if start >= video.shape[1]:
                break
        if not latents:   # a chained source still filling its first chunk: nothing to upscale this block
            b, _, _, h, w = video.shape
            return {"latent": torch.zeros((b, 0, model.latent_channels, h // 8, w // 8), device=model.device)}
        return {"latent": torch.cat(latents, 1)}

    # ------------------------------------------------------------------ snapshots
    def state_tensors(self, state: UpscalerState) -> dict:
        if state.stream is None:
            return {} if state.restore is None else dict(state.restore)
        return {**state.stream.state_tensors(), "rng": state.generator.get_state()}

    def load_state(self, state: UpscalerState, values: dict) -> UpscalerState:
        state.restore = dict(values) if values else None
        return state

    def _restore(self, state: UpscalerState, values: dict) -> None:
        values = dict(values)
        rng = values.pop("rng", None)
        try:
            state.stream.load_state_tensors(values)
        except ValueError as e:
            raise FdError(f"node {self.name!r}: snapshot: {e}") from e
        if rng is not None:
            state.generator.set_state(rng.cpu())


def _is_empty(video) -> bool:
    """Frames [B, 0, 3, H, W]: a block that carries no chunk (a chained source between chunks)."""
    return isinstance(video, torch.Tensor) and video.dim() == 5 and video.shape[1] == 0


NODE_TYPES = (FlashVSRDiTNode, FlashVSRUpscalerNode)
