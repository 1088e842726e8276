"""Node types of the world model: `world.dit`, `world.decode`, `world.actions`.

The two model nodes load ONE safetensors file (keys ``dit.*`` and ``decoder.*``) through the
ModelNode recipe and the checkpoint code every model uses, each taking its own prefix, with the
sizes from the config.json next to it (``nodes/world/config.py``). ``checkpoint`` unset (null) is the
file shipped inside this package (``nodes/world/weights/``); a path or ``hf://`` reference works
as for any model, and ``random`` builds the builtin config's sizes with random weights.

``world.actions`` turns the spec's action script (``"W*16 A*8 W*16"``) and, when wired, the live
control vector of ``fd serve`` into each block's action ids.
"""
from __future__ import annotations

from pathlib import Path

import torch

from engine.errors import FdError
from engine.node import BLOCK, SESSION, Node, Param, Port
from engine.types import CAUSAL_DENOISER, LATENT, LIST, PIXELS, TENSOR, TEXT, TEXT_EMBEDDING
from nodes.common.attention import BACKENDS
from nodes.common.model_node import Built, ModelNode
from nodes.common.params import dtype_param, seed_param

from .config import WorldConfig
from .env import ACTIONS, IDLE, parse_actions

WEIGHTS_DIR = Path(__file__).parent / "weights"
BUILTIN_FILE = WEIGHTS_DIR / "world_cpu.safetensors"
RETRAIN_HINT = ("train them with `python examples/world_cpu/train.py --out DIR` (see examples/world_cpu/README.md) "
                "and copy DIR/world_cpu.safetensors and DIR/config.json into nodes/world/weights/, or set "
                "checkpoint: random for random weights")


class _WorldModelNode(ModelNode):
    """The shared half of world.dit / world.decode: where the weights and their config.json are."""
    prefix = ""

    @property
    def random_weights(self) -> bool:
        return self.p.checkpoint == "random"

    def _ref(self) -> str:
        if self.p.checkpoint is None:
            if not BUILTIN_FILE.is_file():
                raise FdError(f"node {self.name!r}: the builtin world model weights ({BUILTIN_FILE}) are not "
                              f"installed; {RETRAIN_HINT}")
            return str(BUILTIN_FILE)
        return str(self.p.checkpoint)

    def world_config(self) -> WorldConfig:
        """The config.json next to the weights (the builtin one for random weights)."""
        from nodes.checkpoint.config_json import find_config_json
        if self.random_weights or self.p.checkpoint is None:
            path = WEIGHTS_DIR / "config.json"
        else:
            from nodes.checkpoint import resolve
            ref = self._ref()
            kind = "folder" if Path(ref).is_dir() else "file"
            local = resolve(ref, kind=kind)
            found = find_config_json(ref, [local / "x" if kind == "folder" else local])
            if found is None:
                raise FdError(f"node {self.name!r}: no config.json next to {ref} (the world model's sizes live there)")
            path = found[0]
        try:
            return WorldConfig.read(path)
        except (OSError, ValueError) as e:
            raise FdError(f"node {self.name!r}: {e}") from None

    def open_weights(self):
        from nodes.checkpoint import open_checkpoint
        ckpt = open_checkpoint(self._ref())
        mine = {k[len(self.prefix):]: k for k in ckpt if k.startswith(self.prefix)}
        if not mine:
            raise FdError(f"node {self.name!r}: {self._ref()} has no {self.prefix}* keys (not a world model file)")
        return ckpt.renamed(mine)


class WorldDiTNode(_WorldModelNode):
    type_name = "world.dit"
    doc = ("The world model's action-conditioned causal Wan DiT (LingBot's camera path carries the actions); its "
           "`context` output is the learned world context that ar.sampler takes as its text condition.")
    outputs = (Port("model", CAUSAL_DENOISER, "the DiT behind the causal-model contract (block condition `action`)"),
               Port("context", TEXT_EMBEDDING, "the learned world context [1, L, text_dim] (wire to ar.sampler.text)"))
    params = (
        Param("checkpoint", str, None, "world model weights: null (the file shipped in nodes/world/weights), a local "
              "file/folder, an hf:// reference, or 'random' (random weights of the shipped config's sizes)",
              nullable=True),
        Param("attention", str, "auto", "attention backend", choices=BACKENDS),
        dtype_param("fp32"),
        seed_param(),
    )
    phase = SESSION
    prefix = "dit."

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handle = None

    def build_random(self):
        from .model import ActionWanDiT
        cfg = self.world_config()
        return ActionWanDiT(cfg.dit, cfg.num_actions)

    def build_from(self, sd) -> Built:
        from .model import ActionWanDiT
        cfg = self.world_config()
        try:
            cfg.dit.check_state_dict(sd, where=self._ref())
        except (KeyError, ValueError) as e:
            raise FdError(f"node {self.name!r}: {e}") from None
        with torch.device("meta"):
            return Built(ActionWanDiT(cfg.dit, cfg.num_actions), sd)

    def cache_layout(self) -> dict:
        from nodes.common.params import resolve_dtype
        cfg, dtype = self.world_config().dit, resolve_dtype(self.p.dtype, self.device)
        return {"num_layers": cfg.num_layers, "num_heads": cfg.num_heads, "head_dim": cfg.head_dim,
                "patch": tuple(cfg.patch_size[1:]), "dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "text_len": cfg.text_len,
                "image_tokens": 0, "dtype": str(dtype).removeprefix("torch."), "dtype_bytes": dtype.itemsize}

    def finish(self, module):
        module.backend = self.p.attention
        return module

    def loaded(self, module) -> None:
        from .causal import WorldDenoiser
        self.model = module
        self.handle = WorldDenoiser(module, module.cfg, self.dtype, self.p.attention)

    def run(self, inputs, state, step):
        if self.handle is None:
            raise FdError(f"node {self.name!r} ran before load()")
        return {"model": self.handle, "context": self.model.context(1).detach()}


class WorldDecodeNode(_WorldModelNode):
    type_name = "world.decode"
    doc = "The world model's tiny frame decoder: latent frames [B, f, C, h, w] -> pixels [B, f, 3, 4h, 4w]."
    inputs = (Port("latent", LATENT, "latent frames of this block [B, f, C, h, w] (normalized, as the DiT makes them)"),)
    outputs = (Port("pixels", PIXELS, "frames [B, f, 3, H, W] in [-1, 1]"),)
    params = (
        Param("checkpoint", str, None, "world model weights: null (the file shipped in nodes/world/weights), a local "
              "file/folder, an hf:// reference, or 'random' (random weights of the shipped config's sizes)",
              nullable=True),
        dtype_param("fp32"),
        seed_param(),
    )
    phase = BLOCK
    prefix = "decoder."

    def build_random(self):
        from .model import FrameDecoder
        return FrameDecoder(self.world_config().decoder)

    def constants(self, module) -> None:
        if self.random_weights:   # random init zeroes buffers: the identity normalization
            module.latent_std.fill_(1.0)

    def build_from(self, sd) -> Built:
        from .model import FrameDecoder
        with torch.device("meta"):
            return Built(FrameDecoder(self.world_config().decoder), sd)

    def run(self, inputs, state, step):
        lat = inputs["latent"]
        model = self.require_model()
        with torch.no_grad():
            return {"pixels": model.decode_video(lat.to(self.device, self.dtype)).float()}


class WorldActionsNode(Node):
    type_name = "world.actions"
    doc = ("Each block's action ids from an action script (W/S forward/back, A/D turn left/right, Q/E strafe, "
           "'.' stand still; 'W*16 A*8') and, when wired, fd serve's live control, which wins while it is non-zero.")
    inputs = (Port("script", TEXT, "the action script, one letter per frame: 'W*16 A*8 W*16'", optional=True),
              Port("control", LIST, "live control (forward, right, yaw, pitch), each in -1..1 (fd serve: WASD + arrows): "
                   "forward -> W/S, right and yaw -> D/A (turn); both -> alternating letters", optional=True))
    outputs = (Port("action", TENSOR, "this block's action ids [1, frames_per_block] (int64)"),)
    params = (Param("frames_per_block", int, 4, "frames per block (= the sampler's)", min=1),
              Param("deadzone", float, 0.3, "live control: |value| below this counts as released", min=0.0, max=1.0))
    phase = BLOCK

    def _script(self, inputs) -> list[int]:
        text = inputs.get("script")
        if text is None:
            return []
        if not isinstance(text, str):
            raise FdError(f"node {self.name!r}: input `script` must be a string like 'W*16 A*8', got {text!r}")
        try:
            return parse_actions(text)
        except ValueError as e:
            raise FdError(f"node {self.name!r}: input `script`: {e}") from None

    def _live(self, control) -> list[int]:
        """The letters the control vector holds down ([] when released)."""
        try:
            fwd, right, yaw = (max(-1.0, min(1.0, float(v))) for v in list(control)[:3])
        except (TypeError, ValueError):
            raise FdError(f"node {self.name!r}: control must be [forward, right, yaw, pitch], got {control!r}") from None
        turn, dz = max(-1.0, min(1.0, right + yaw)), self.p.deadzone
        held = []
        if abs(fwd) >= dz:
            held.append(ACTIONS.index("W" if fwd > 0 else "S"))
        if abs(turn) >= dz:
            held.append(ACTIONS.index("D" if turn > 0 else "A"))
        return held

    def run(self, inputs, state, step):
        f, b = self.p.frames_per_block, int(step.block or 0)
        held = self._live(inputs["control"]) if inputs.get("control") is not None else []
        if held:
            ids = [held[i % len(held)] for i in range(f)]
        else:
            script = self._script(inputs)
            ids = [script[i] if i < len(script) else IDLE for i in range(b * f, (b + 1) * f)]
        return {"action": torch.tensor([ids], dtype=torch.long)}


NODE_TYPES = (WorldDiTNode, WorldDecodeNode, WorldActionsNode)
