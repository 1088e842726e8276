"""Wan's UMT5-XXL text encoder on transformers' ``UMT5EncoderModel``.

Wan ships the encoder as ``models_t5_umt5-xxl-enc-bf16.pth`` with its own key
names (``wan/modules/t5.py``); the math is HF UMT5's (per-layer relative
position bias, gated-GELU(tanh) FFN, RMS norms, unscaled attention logits), so
a key rename is all it takes. Diffusers' ``text_encoder`` folder already has HF
keys. The config is read off the tensor shapes, so any size loads.

Self-Forcing zeroes the hidden states at padded positions before the DiT sees
them (official Wan cuts them off and the DiT zero-pads: the same tensor);
``encode`` returns that.
"""
from __future__ import annotations

import html
import re
from typing import Mapping, Sequence

import torch
from transformers import UMT5Config, UMT5EncoderModel

# Wan key -> HF UMT5EncoderModel key; "{i}" is the layer index. The gate
# (GELU-tanh) branch is Wan's ffn.gate.0 -> wi_0, the linear branch fc1 -> wi_1.
WAN_TO_HF_KEYS: tuple[tuple[str, str], ...] = (
    ("token_embedding.weight", "shared.weight"),
    ("blocks.{i}.norm1.weight", "encoder.block.{i}.layer.0.layer_norm.weight"),
    ("blocks.{i}.attn.q.weight", "encoder.block.{i}.layer.0.SelfAttention.q.weight"),
    ("blocks.{i}.attn.k.weight", "encoder.block.{i}.layer.0.SelfAttention.k.weight"),
    ("blocks.{i}.attn.v.weight", "encoder.block.{i}.layer.0.SelfAttention.v.weight"),
    ("blocks.{i}.attn.o.weight", "encoder.block.{i}.layer.0.SelfAttention.o.weight"),
    ("blocks.{i}.pos_embedding.embedding.weight",
     "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("blocks.{i}.norm2.weight", "encoder.block.{i}.layer.1.layer_norm.weight"),
    ("blocks.{i}.ffn.gate.0.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight"),
    ("blocks.{i}.ffn.fc1.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight"),
    ("blocks.{i}.ffn.fc2.weight", "encoder.block.{i}.layer.1.DenseReluDense.wo.weight"),
    ("norm.weight", "encoder.final_layer_norm.weight"),
)

TIED_EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")
RELATIVE_MAX_DISTANCE = 128  # Wan's relative_max_dist; not recoverable from the weights
TEXT_LEN = 512  # Wan's text_len: prompts are padded / truncated to this many tokens


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_WAN_RULES = tuple((_compile(src), dst) for src, dst in WAN_TO_HF_KEYS)


def is_wan_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    return "token_embedding.weight" in sd


def to_hf_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan-layout or HF-layout state dict -> HF ``UMT5EncoderModel`` keys (tied embedding filled in).

    Unknown Wan keys raise: a silent drop would hide a wrong checkpoint.
    """
    if is_wan_layout(sd):
        out = {}
        for k, v in sd.items():
            for rx, dst in _WAN_RULES:
                m = rx.match(k)
                if m:
                    out[dst.format(**m.groupdict())] = v
                    break
            else:
                raise KeyError(f"unexpected key in Wan T5 state dict: {k!r}")
    else:
        out = dict(sd)
    emb = next((out[k] for k in TIED_EMBEDDING_KEYS if k in out), None)
    if emb is None:
        raise KeyError("state dict has no token embedding (token_embedding / shared / encoder.embed_tokens)")
    for k in TIED_EMBEDDING_KEYS:
        out.setdefault(k, emb)
    return out


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> UMT5Config:
    """UMT5Config from tensor shapes (vocab, d_model, heads, d_kv, d_ff, layers, buckets)."""
    sd = to_hf_state_dict(sd)
    vocab, d_model = sd["shared.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.block."))
    attn = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = sd[attn + "relative_attention_bias.weight"].shape
    d_kv = sd[attn + "q.weight"].shape[0] // heads
    d_ff = sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]
    return UMT5Config(
        vocab_size=int(vocab), d_model=int(d_model), d_kv=int(d_kv), d_ff=int(d_ff), num_layers=int(layers),
        num_heads=int(heads), relative_attention_num_buckets=int(buckets),
        relative_attention_max_distance=RELATIVE_MAX_DISTANCE, feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6, dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)


def build_umt5_encoder(sd: Mapping[str, torch.Tensor], *, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> UMT5EncoderModel:
    """Build on the meta device and load ``sd`` (Wan or HF layout) strictly by assignment."""
    hf = to_hf_state_dict(sd)
    with torch.device("meta"):
        model = UMT5EncoderModel(config_from_state_dict(hf))
    model.load_state_dict(hf, strict=True, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight  # assign=True broke the tie
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


@torch.no_grad()
def encode(model: UMT5EncoderModel, ids: torch.Tensor, mask: torch.Tensor, zero_padding: bool = True) -> torch.Tensor:
    """Token ids/mask [B, L] -> hidden states [B, L, d_model]; rows at padded positions zeroed.

    Like Self-Forcing, "padded" means index >= mask.sum(1) (masks are left-aligned).
    """
    dev = model.shared.weight.device
    ids, mask = ids.to(dev), mask.to(dev)
    h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    if zero_padding:
        keep = torch.arange(ids.shape[1], device=dev)[None] < mask.gt(0).sum(1, keepdim=True)
        h = h * keep[..., None].to(h.dtype)
    return h


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: fix mojibake (if ftfy is installed), unescape HTML twice, collapse spaces."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    """Prompt strings -> UMT5 context [B, text_len, d_model] with zeroed padding (what the Wan DiT takes)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], tokenizer_path: str, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, text_len: int = TEXT_LEN):
        from transformers import AutoTokenizer

        self.model = build_umt5_encoder(state_dict, device=device, dtype=dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)  # a local folder, e.g. <ckpt>/google/umt5-xxl
        self.text_len = text_len

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        t = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", truncation=True,
                           max_length=self.text_len, add_special_tokens=True, return_tensors="pt")
        return t.input_ids, t.attention_mask

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        ids, mask = self.tokenize(prompts)
        return encode(self.model, ids, mask)
