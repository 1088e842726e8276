"""`wan.dit`: the Wan 2.1 DiT (bidirectional or causal), loaded once and handed on as a DENOISER.

The node only builds or loads the module; samplers (``ar.sampler``, ``wan.t2v_sampler``)
own the per-session state (KV caches, noise). Checkpoints in any known layout load
(native Wan-AI safetensors, diffusers ``WanTransformer3DModel``, Self-Forcing /
Causal-Forcing training files holding ``generator`` / ``generator_ema``), one tensor at
a time onto the node's device. ``checkpoint: random`` builds a model of the ``preset``
size (or the explicit size params) with deterministic random weights, for benchmarks.
"""
from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import torch

from engine.errors import FdError
from engine.node import SESSION, Param, Port
from engine.types import CAUSAL_DENOISER
from nodes.common.attention import ATTENTION_PRECISIONS, BACKENDS
from nodes.common.model_node import Built, ModelNode

from .causal import CONTEXT_PASSES, WanDenoiser
from .config import WAN_14B, WAN_1_3B, WanConfig
from nodes.common.params import checkpoint_param, dtype_param, is_random, seed_param

PRESETS = {"1.3b": WAN_1_3B, "14b": WAN_14B}
SIZE_PARAMS = ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim", "text_len", "in_dim", "out_dim")
FSDP_INFIX = "_fsdp_wrapped_module."
DIFFUSERS_KEYS = {"_diffusers_version", "num_attention_heads", "attention_head_dim"}  # a diffusers config.json


class WanDiTNode(ModelNode):
    type_name = "wan.dit"
    doc = ("Wan 2.1 DiT (1.3B / 14B, T2V or I2V), bidirectional and causal in one module. Loads native, diffusers "
           "or Self-Forcing/Causal-Forcing checkpoints (ema picks generator_ema), or random weights of a preset size.")
    outputs = (Port("model", CAUSAL_DENOISER, "the loaded DiT (module, config, dtype, attention backend); streams "
                    "causally through the causal-model contract, and drives bidirectional samplers too"),)
    params = (
        checkpoint_param("random", "DiT weights"),
        Param("weights", str, "checkpoint", "'random' forces random weights whatever checkpoint says "
              "(one override turns a real spec into a benchmark)", choices=("checkpoint", "random")),
        Param("ema", bool, True, "Self-Forcing/Causal-Forcing training files: use generator_ema (else generator)"),
        Param("preset", str, None, "model size for random weights and memory estimates: 1.3b or 14b (the "
              "estimate for device: auto assumes 1.3b when unset)",
              choices=("1.3b", "14b"), nullable=True),
        Param("model_type", str, "t2v", "random weights: t2v, or i2v (adds the CLIP image branch)",
              choices=("t2v", "i2v")),
        Param("control_type", str, None, "random weights: cam adds LingBot-World's camera layers (a checkpoint says "
              "so by its keys)", choices=("cam",), nullable=True),
        Param("dim", int, None, "hidden size (random weights; overrides the preset)", min=2, nullable=True),
        Param("ffn_dim", int, None, "FFN width (random weights)", min=1, nullable=True),
        Param("num_heads", int, None, "attention heads; not stored in checkpoints (default dim/128, right for "
              "every Wan 2.1 release)", min=1, nullable=True),
        Param("num_layers", int, None, "transformer blocks (random weights)", min=1, nullable=True),
        Param("text_dim", int, None, "text embedding width (random weights; 4096 = UMT5-XXL)", min=1, nullable=True),
        Param("text_len", int, 512, "text tokens the cross-attention pads to", min=1),
        Param("in_dim", int, None, "input latent channels (random weights; 16 T2V, 36 I2V)", min=1, nullable=True),
        Param("out_dim", int, None, "output latent channels (random weights)", min=1, nullable=True),
        Param("sinusoid", str, "auto", "dtype of the timestep sinusoid: float64 (Wan-AI, Self-Forcing), float32 "
              "(diffusers, FastVideo); auto = float32 for a diffusers folder read through its config.json, else "
              "float64", choices=("auto", "float32", "float64")),
        Param("attention", str, "auto", "attention backend", choices=BACKENDS),
        Param("compile", str, "auto", "torch.compile the elementwise stages (modulation, qk-norm + RoPE, gated "
              "adds): auto = on CUDA; each shape compiles once (seconds), shared by all layers",
              choices=("auto", "on", "off")),
        Param("compile_mode", str, "default", "torch.compile mode of those stages (max-autotune-no-cudagraphs "
              "autotunes the fused kernels: longer first start, cached on disk)",
              choices=("default", "max-autotune-no-cudagraphs")),
        Param("precision", str, "auto", "the transformer blocks' linears (attention q/k/v/o, FFN): auto = the node's "
              "dtype; fp8 = e4m3 weights (one scale per output channel, quantised once at load) times e4m3 "
              "activations (one scale per token), torch._scaled_mm; CUDA sm_89+", choices=("auto", "fp8")),
        Param("attention_precision", str, "auto", "self-attention: auto = the attention backend in the node's dtype; "
              "fp8 = cuDNN sdpa_fp8 (e4m3 Q/K/V/P, scales computed on the GPU; needs nvidia-cudnn-frontend), "
              "CUDA sm_89+", choices=ATTENTION_PRECISIONS),
        Param("fp8_attention_scaling", str, "tensor", "attention_precision fp8: one amax scale per tensor, or per head "
              "for K and V (folded into Q and the output)", choices=("tensor", "head")),
        Param("fp8_attention_out", str, "fp8", "attention_precision fp8: the kernel's output type (bf16 avoids the "
              "e4m3 output rounding where the cuDNN build supports it)", choices=("fp8", "bf16")),
        Param("kv_dtype", str, "auto", "causal self-attention KV cache: auto = the node's dtype; fp8 = e4m3 with one "
              "float32 scale per (token, head): 0.53x the bf16 cache (with attention_precision fp8 and tensor "
              "scaling: one running scale per layer, read by the attention as stored: 0.5x)", choices=("auto", "fp8")),
        Param("context_pass", str, "full", "causal: full = the extra forward that caches the clean block (upstream); "
              "reuse = skip it and keep the last denoising step's K/V (one forward fewer per block, some "
              "quality cost)", choices=CONTEXT_PASSES),
        dtype_param(),
        seed_param(),
    )
    phase = SESSION
    context_parallel = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handle: WanDenoiser | None = None
        self._config_json: tuple[Path, dict] | None = None
        self._checked: WanConfig | None = None

    # ------------------------------------------------------------------ config
    @property
    def random_weights(self) -> bool:
        return self.p.weights == "random" or is_random(self.p.checkpoint)

    def size_config(self) -> WanConfig:
        """The config the size params describe (preset, then explicit overrides)."""
        base = PRESETS[self.p.preset] if self.p.preset else WAN_1_3B
        over = {k: getattr(self.p, k) for k in SIZE_PARAMS if getattr(self.p, k) is not None}
        if self.p.model_type == "i2v":
            over.setdefault("in_dim", 36)
        if "dim" in over and "num_heads" not in over:
            over["num_heads"] = max(1, over["dim"] // 128)
        cfg = replace(base, model_type=self.p.model_type, control_type=self.p.control_type, **over)
        return cfg if self.p.sinusoid == "auto" else replace(cfg, sinusoid_dtype=self.p.sinusoid)

    def checkpoint_config(self) -> WanConfig:
        """The config the module will have, from config.json and the checkpoint's shapes (its headers:
        no tensor is read), or the size params for random weights. Cached."""
        if self.random_weights:
            return self.size_config()
        if self._checked is None:
            self._checked = self.config_from(self.open_weights())
        return self._checked

    def cache_layout(self) -> dict:
        """What a sampler needs to size this model's caches before any weight is read (the memory plan,
        nodes/ar/memory.py, and the plan facts fd viz draws)."""
        from nodes.common.params import resolve_dtype
        cfg, dtype = self.size_config(), resolve_dtype(self.p.dtype, self.device)
        return {"num_layers": cfg.num_layers, "num_heads": cfg.num_heads, "head_dim": cfg.head_dim,
                "patch": tuple(cfg.patch_size[1:]), "dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "text_len": cfg.text_len,
                "image_tokens": 257 if cfg.model_type == "i2v" else 0,
                "dtype": str(dtype).removeprefix("torch."), "dtype_bytes": dtype.itemsize,
                # the self-attention cache per stored value: FP8 adds a float32 scale per head_dim values
                "kv_bytes_per_value": dtype.itemsize if self.p.kv_dtype != "fp8"
                else 1 if self.kv_scaling() == "tensor" else 1 + 4 / cfg.head_dim,
                "kv_dtype": "float8_e4m3fn" if self.p.kv_dtype == "fp8" else str(dtype).removeprefix("torch.")}

    def context_size(self) -> int:
        """Ranks this node's sequence is split over (1 when there is no parallel group)."""
        return 1 if self.parallel is None else int(self.parallel.size)

    # ------------------------------------------------------------------ loading (ModelNode's recipe)
    def build_random(self):
        from .dit import WanDiT
        return WanDiT(self.size_config())

    def open_weights(self):
        from nodes.checkpoint.wan_layouts import to_native
        ckpt = open_dit_checkpoint(self.p.checkpoint, self.p.ema)
        from nodes.checkpoint.config_json import find_config_json
        self._config_json = find_config_json(self.p.checkpoint, getattr(ckpt, "files", []))
        return strip_fsdp(to_native(ckpt, ema=self.p.ema))

    def config_from(self, sd) -> WanConfig:
        """Sizes from the checkpoint's config.json when it has one (diffusers: every size; Wan-AI: heads and
        eps), checked against the weights' shapes; otherwise from the shapes and ``num_heads``."""
        from nodes.checkpoint import CheckpointError
        where = str(self._config_json[0]) if self._config_json else str(self.p.checkpoint)
        try:
            if self._config_json is not None and is_diffusers_config(self._config_json[1]):
                cfg = WanConfig.from_diffusers_config(self._config_json[1], text_len=self.p.text_len, where=where)
                if self.p.num_heads is not None and self.p.num_heads != cfg.num_heads:
                    raise ValueError(f"num_heads={self.p.num_heads} but {where} says {cfg.num_heads}")
                cfg.check_state_dict(sd, where=where)
            elif self._config_json is not None and "num_heads" in self._config_json[1]:
                d = self._config_json[1]
                cfg = replace(WanConfig.from_state_dict(sd, num_heads=self.p.num_heads or int(d["num_heads"]),
                                                        text_len=self.p.text_len), eps=float(d.get("eps", 1e-6)))
            else:
                cfg = WanConfig.from_state_dict(sd, num_heads=self.p.num_heads, text_len=self.p.text_len)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{where}: {e}") from e
        return cfg if self.p.sinusoid == "auto" else replace(cfg, sinusoid_dtype=self.p.sinusoid)

    def build_from(self, sd) -> Built:
        from .dit import WanDiT
        cfg = self.config_from(sd)
        with torch.device("meta"):
            return Built(WanDiT(cfg), sd)

    # ------------------------------------------------------------------ fast-mode choices
    FP8_PARAMS = ("precision", "attention_precision")   # FP8 compute; kv_dtype: fp8 is storage and runs anywhere

    def device_problems(self, device: str) -> list[tuple[str, str, str]]:
        """FP8 matmuls and attention need a CUDA GPU with FP8 tensor cores; FP8 attention is not wired into
        context parallelism. An FP8 KV cache is storage (casts and scales) and works on every device."""
        from nodes.common.fp8 import fp8_unsupported_reason
        wanted = [name for name in self.FP8_PARAMS if getattr(self.p, name) == "fp8"]
        reason = fp8_unsupported_reason(device) if wanted else None
        out = super().device_problems(device)
        out += [(name, f"{name}: fp8 is not possible here: {reason}",
                 f"set {name}: auto, or place the node on an H100/H200/L40/RTX 40xx (device: cuda)") for name in wanted
                if reason]
        if self.p.attention_precision == "fp8" and not out and str(device).startswith("cuda") \
                and torch.cuda.is_available() and importlib.util.find_spec("cudnn") is None:
            out.append(("attention_precision", "attention_precision: fp8 needs the cuDNN frontend, which is not "
                        "installed", "pip install nvidia-cudnn-frontend (or fd's fp8 extra)"))
        if self.p.attention_precision == "fp8" and self.context_size() > 1:
            out.append(("attention_precision", "attention_precision: fp8 does not run under context parallelism "
                        "(the ring/Ulysses attention is bf16)", "set attention_precision: auto, or parallel.context: 1"))
        return out

    def finish(self, module):
        problems = self.device_problems(str(self.device))
        if problems:
            raise FdError(f"node {self.name!r}: {problems[0][1]} ({problems[0][2]})")
        module.backend = self.p.attention
        if self.p.compile == "on" or (self.p.compile == "auto" and str(self.device).startswith("cuda")):
            module.compile_elementwise(mode=None if self.p.compile_mode == "default" else self.p.compile_mode)
        if self.p.precision == "fp8":
            module.use_fp8_linears()
        if self.p.attention_precision == "fp8":
            from nodes.common.fp8_attention import CudnnFp8Attention
            module.use_fp8_attention(self.p.fp8_attention_scaling, self.p.fp8_attention_out,
                                     CudnnFp8Attention(self.p.fp8_attention_out))
        if self.context_size() > 1:
            module.parallel = self.parallel  # the DiT shards each frame's tokens over the group
        return module

    def loaded(self, module) -> None:
        self.model = module
        kv = torch.float8_e4m3fn if self.p.kv_dtype == "fp8" else None
        self.handle = WanDenoiser(module, module.cfg, self.dtype, self.p.attention, kv, self.p.context_pass,
                                  self.kv_scaling())

    def attention_in_use(self) -> str | None:
        """With ``attention_precision: fp8`` the self-attention is cuDNN's sdpa_fp8 and the backend param serves
        the cross-attention only: fd bench's JSON and fd viz say both."""
        base = super().attention_in_use()
        if self.p.attention_precision != "fp8":
            return base
        return (f"self: cuDNN sdpa_fp8 (e4m3, {self.p.fp8_attention_scaling} scales, {self.p.fp8_attention_out} "
                f"output); cross: {base}")

    def facts(self, sources) -> dict:
        """fd viz: the attention note (above), and how an FP8 KV cache is kept."""
        out = super().facts(sources)
        notes = list(out.get("notes", []))
        if self.p.kv_dtype == "fp8":
            notes.append("KV cache: e4m3, " + ("one running scale per layer, read by the FP8 attention as stored"
                                               if self.kv_scaling() == "tensor" else "a float32 scale per (token, head)"))
        return {**out, "notes": notes} if notes else out

    def kv_scaling(self) -> str:
        """An FP8 cache read by FP8 attention with tensor scales is kept at that scaling (one running scale per
        layer: attention reads it as stored); otherwise one scale per (token, head)."""
        fp8_reader = self.p.attention_precision == "fp8" and self.p.fp8_attention_scaling == "tensor"
        return "tensor" if self.p.kv_dtype == "fp8" and fp8_reader else "row"

    def run(self, inputs, state, step):
        if self.handle is None:
            raise FdError(f"node {self.name!r} ran before load()")
        return {"model": self.handle}


def is_diffusers_config(d: dict) -> bool:
    """A diffusers WanTransformer3DModel config.json, not a Wan-AI one (WanModel / LingBot WanModelFast
    configs carry ``_diffusers_version`` too, with Wan-AI key names: ``num_heads``)."""
    return bool(DIFFUSERS_KEYS & set(d)) and not ("num_heads" in d and "num_attention_heads" not in d)


def open_dit_checkpoint(ref: str, ema: bool = True):
    """Open a DiT checkpoint lazily; a training file's generator state dict is picked by ``ema``."""
    from nodes.checkpoint import open_checkpoint, resolve
    from nodes.checkpoint.load import TORCH_SUFFIXES
    from nodes.checkpoint.wan_layouts import SELF_FORCING_ENTRIES

    text = str(ref)
    if not text.endswith(TORCH_SUFFIXES):
        return open_checkpoint(text)  # safetensors file, sharded index (shards fetched too) or folder
    path = resolve(text, kind="file")
    wanted = SELF_FORCING_ENTRIES if ema else SELF_FORCING_ENTRIES[::-1]
    top = _torch_top_level(path)
    return open_checkpoint(path, select=next((e for e in wanted if e in top), None))


def _torch_top_level(path: Path) -> set:
    """Top-level keys of a torch file (memory-mapped: nothing is read); empty when it cannot be read,
    which open_checkpoint then reports with its own message."""
    for mmap in (True, False):  # legacy (pre-zip) files cannot be memory-mapped
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            return set(obj.keys()) if isinstance(obj, dict) else set()
        except Exception:
            continue
    return set()


def strip_fsdp(sd):
    """Some training files keep FSDP's wrapper in their names (``_fsdp_wrapped_module.``); drop it."""
    if not any(FSDP_INFIX in k for k in sd):
        return sd
    names = {k.replace(FSDP_INFIX, ""): k for k in sd}
    if hasattr(sd, "renamed"):
        return sd.renamed(names)
    return {new: sd[old] for new, old in names.items()}


NODE_TYPES = (WanDiTNode,)
