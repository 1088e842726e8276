"""A toy causal world model that is not Wan: the smallest family that streams through ``ar.sampler``.

It shows the files a family adds (docs/new-model.md walks through them): a config, a model
with its OWN cache, the causal-model contract (``ToyCausal`` / ``ToyStream``), and a node whose
output port is ``causal_denoiser``.

The network: every latent pixel is a token; tokens get the timestep and the prompt (mean of
the text embeddings) added, plus an optional per-frame ``action`` (a block condition); each
token then attends to a memory of per-frame summaries (the mean hidden state of every frame
still in the window, the block's own frames included), and a linear head predicts the flow.
The memory is a static ring of ``window`` rows written through a device index, so a call
depends on Python ints only through the number of valid rows: the CUDA-graph key.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import Node, Param, Port
from engine.capture import GraphCache
from engine.types import CAUSAL_DENOISER
from nodes.common.causal import CausalModel, CausalStream, StreamSpec, copy_state_into


@dataclass(frozen=True)
class ToyConfig:
    channels: int = 4        # latent channels
    dim: int = 16
    text_dim: int = 8
    action_dim: int = 2


class ToyNet(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Linear(cfg.channels, cfg.dim)
        self.time = nn.Linear(1, cfg.dim)
        self.text = nn.Linear(cfg.text_dim, cfg.dim)
        self.action = nn.Linear(cfg.action_dim, cfg.dim)
        self.q, self.k, self.v = (nn.Linear(cfg.dim, cfg.dim) for _ in range(3))
        self.out = nn.Linear(cfg.dim, cfg.channels)

    def hidden(self, x, t, text, action=None):
        """x [B, f, C, H, W], t [B, 1] -> per-token hidden [B, f, H*W, dim]."""
        h = self.inp(x.flatten(3).transpose(2, 3)) + self.time(t[:, :, None, None] / 1000.0)
        h = h + self.text(text.mean(1))[:, None, None]
        if action is not None:
            h = h + self.action(action)[:, :, None]
        return h

    def predict(self, h, memory):
        """h [B, f, N, dim], memory [B, M, dim] (frame summaries) -> flow [B, f, C, N]."""
        q = self.q(h).flatten(1, 2)
        y = F.scaled_dot_product_attention(q[:, None], self.k(memory)[:, None], self.v(memory)[:, None])[:, 0]
        return self.out(h + y.unflatten(1, h.shape[1:3])).transpose(2, 3)


class ToyCausal(CausalModel):
    """The contract over a ToyNet: conditions ``text`` [B, L, text_dim], per block ``action`` [B, f, A]."""
    session_conditions = ("text",)
    block_conditions = ("action",)

    def __init__(self, net: ToyNet):
        self.net = net

    @property
    def device(self) -> torch.device:
        return self.net.inp.weight.device

    def patch_grid(self) -> tuple[int, int]:
        return (1, 1)

    def open_stream(self, spec: StreamSpec) -> "ToyStream":
        return ToyStream(self, spec)


class ToyStream(CausalStream):
    """The toy's own cache: a ring of per-frame summaries, ``window`` rows (every frame when unbounded)."""

    def __init__(self, model: ToyCausal, spec: StreamSpec):
        if spec.sink_frames:
            raise ValueError("the toy model keeps no sink frames")
        self.model, self.spec = model, spec
        self.window = spec.window_frames or spec.max_frames
        self.memory = torch.zeros(spec.batch, self.window, model.net.cfg.dim, device=model.device)
        self.text = None
        self.graphs = GraphCache(self._core, model.device, enabled=spec.graphs, name="toy")
        self._index: dict[tuple, torch.Tensor] = {}

    def set_conditions(self, text: torch.Tensor) -> None:
        text = text.to(self.model.device).expand(self.spec.batch, -1, -1)
        if self.text is None or self.text.shape != text.shape:
            self.text = text.clone()
            self.graphs.clear()
        else:
            self.text.copy_(text)   # captured graphs read this buffer

    def _rows(self, frame_start: int, f: int) -> tuple[torch.Tensor, int]:
        key = (frame_start % self.window, f)
        if key not in self._index:
            self._index[key] = torch.tensor([(frame_start + i) % self.window for i in range(f)],
                                            device=self.model.device)
        return self._index[key], min(frame_start + f, self.window)

    def denoise(self, x, t, frame_start, action=None):
        index, valid = self._rows(frame_start, x.shape[1])
        tt = torch.full((x.shape[0], 1), float(t), device=x.device)
        with torch.no_grad():
            flow = self.graphs((valid, x.shape, action is None), x=x, t=tt, index=index, action=action,
                               valid=torch.empty(valid, 0, device=x.device))
        return flow

    def _core(self, *, x, t, index, valid, action=None):
        net = self.model.net
        h = net.hidden(x, t, self.text, action)
        self.memory.index_copy_(1, index, h.mean(2))
        return net.predict(h, self.memory[:, :valid.shape[0]]).reshape(x.shape)

    def prepare(self, x, first_frame: int = 0, action=None) -> int:
        if not self.graphs.enabled:
            return 0
        keys = set()
        for frame in range(first_frame, first_frame + 2 * self.window + x.shape[1], x.shape[1]):
            keys.add(self._rows(frame, x.shape[1])[1])
            for _ in range(self.graphs.warmup + 1):
                self.denoise(x, 0.0, frame, action)
        self.reset()
        return len(keys)

    def reset(self) -> None:
        self.memory.zero_()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Session snapshots: the ring of summaries is all this stream keeps between blocks."""
        return {"memory": self.memory}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        copy_state_into({"memory": self.memory}, tensors, "toy memory")

    def graph_status(self) -> str:
        return self.graphs.status()


class ToyCausalNode(Node):
    type_name = "example.toy_causal"
    doc = "A toy causal world model (not Wan) with its own frame-summary cache; streams through ar.sampler."
    outputs = (Port("model", CAUSAL_DENOISER, "the toy model behind the causal-model contract"),)
    params = (
        Param("channels", int, 4, "latent channels", min=1),
        Param("dim", int, 16, "hidden size", min=1),
        Param("text_dim", int, 8, "text embedding width", min=1),
        Param("action_dim", int, 2, "action width", min=1),
        Param("init_seed", int, 0, "seed of the random weights"),
    )
    phase = "session"

    def load(self) -> None:
        torch.manual_seed(self.p.init_seed)
        cfg = ToyConfig(self.p.channels, self.p.dim, self.p.text_dim, self.p.action_dim)
        self.model = ToyCausal(ToyNet(cfg).to(self.device).eval().requires_grad_(False))

    def run(self, inputs, state, step):
        return {"model": self.model}
