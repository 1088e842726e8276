"""Small node types for engine tests: a session-phase encoder, a stateful block node, a recording sink."""
from __future__ import annotations

import textwrap
from pathlib import Path

import torch

from engine import Node, Param, Port, Registry
from engine.node import SESSION
from engine.types import LATENT, TEXT, TEXT_EMBEDDING, PIXELS


class FakeEncoder(Node):
    type_name = "test.encoder"
    doc = "Encodes a prompt into a tiny embedding; counts its calls."
    inputs = (Port("prompt", TEXT),)
    outputs = (Port("embeds", TEXT_EMBEDDING),)
    params = (Param("dim", int, 4, "embedding width", min=1, max=64),)
    phase = SESSION
    calls: list = []

    def estimate_bytes(self):
        return 3 * 2**30

    def run(self, inputs, state, step):
        FakeEncoder.calls.append(inputs["prompt"])
        v = float(sum(map(ord, inputs["prompt"])) % 97)
        return {"embeds": torch.full((1, 2, self.p.dim), v)}


class Accumulate(Node):
    type_name = "test.accumulate"
    doc = "Adds the embedding mean to a running latent (stateful per session)."
    inputs = (Port("embeds", TEXT_EMBEDDING), Port("latent", LATENT, optional=True))
    outputs = (Port("latent", LATENT),)
    params = (Param("mode", str, "sum", "how to combine", choices=("sum", "max")),
              Param("gain", float, 1.0, "scale", min=0.0, max=10.0))
    capturable = True

    def new_state(self):
        return {"total": torch.zeros(1, 1, 1, 2, 2)}

    def run(self, inputs, state, step):
        state["total"] = state["total"] + inputs["embeds"].mean() * self.p.gain
        return {"latent": state["total"].clone()}


class Recorder(Node):
    type_name = "test.recorder"
    doc = "Sink that records (block, value) in order."
    inputs = (Port("latent", LATENT),)
    params = (Param("tag", str, "rec"),)
    is_sink = True
    log: list = []

    def run(self, inputs, state, step):
        Recorder.log.append((self.p.tag, step.block, float(inputs["latent"].flatten()[0])))
        return {}


class Needy(Node):
    type_name = "test.needy"
    doc = "Requires a pixels input and a param."
    inputs = (Port("pixels", PIXELS),)
    outputs = (Port("pixels", PIXELS),)
    params = (Param("level", int, doc="a required level", min=0, max=5),)

    def run(self, inputs, state, step):
        return {"pixels": inputs["pixels"]}


class PromptPerBlock(Node):
    type_name = "test.prompt_per_block"
    doc = "A block-phase node producing text (to test phase ordering)."
    inputs = (Port("prompt", TEXT),)
    outputs = (Port("prompt", TEXT),)

    def run(self, inputs, state, step):
        return {"prompt": f"{inputs['prompt']} {step.block}"}


def registry() -> Registry:
    reg = Registry.default()
    for t in (FakeEncoder, Accumulate, Recorder, Needy, PromptPerBlock):
        reg.add(t)
    return reg


GOOD = """\
name: toy
inputs:
  prompt: hello
  num_blocks: 3
  gain: 2.0
nodes:
  enc:
    type: test.encoder
    in: {prompt: inputs.prompt}
    params: {dim: 4}
  acc:
    type: test.accumulate
    in: {embeds: enc.embeds}
    params: {gain: "${inputs.gain}"}
sinks:
  rec:
    type: test.recorder
    in: {latent: acc.latent}
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p
