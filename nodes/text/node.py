"""`wan.text_encoder`: prompts to UMT5 embeddings, once per prompt.

Prompt caching, offload and the prompt/negative ports' run are the shared
``nodes.common.prompt_encoder.PromptEncoderNode``'s.

``tokenizer: bytes`` is an offline stand-in for random tiny models (no tokenizer files
needed): UTF-8 bytes shifted by 3 (0 pad, 1 end of sequence, 2 unknown, as ByT5),
then the end token. It is meaningless for real UMT5 weights; use the google/umt5-xxl
tokenizer folder with them.
"""
from __future__ import annotations

import torch

from engine.errors import FdError
from engine.node import Param, Port
from engine.types import TEXT, TEXT_EMBEDDING
from nodes.common.model_node import Built
from nodes.common.prompt_encoder import CACHE_SIZE, PromptEncoderNode
from nodes.common.params import checkpoint_param, dtype_bytes, dtype_param, seed_param

WAN_T5 = "hf://Wan-AI/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER = "hf://Wan-AI/Wan2.1-T2V-1.3B/google/umt5-xxl"
BYTES = "bytes"
BYTE_OFFSET, PAD_ID, EOS_ID = 3, 0, 1


def byte_tokenize(prompts: list[str], text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``bytes`` tokenizer: ids/mask [B, text_len], left-aligned, end token last, truncated to fit."""
    ids = torch.full((len(prompts), text_len), PAD_ID, dtype=torch.long)
    for i, p in enumerate(prompts):
        toks = [b + BYTE_OFFSET for b in p.encode("utf-8")][:text_len - 1] + [EOS_ID]
        ids[i, :len(toks)] = torch.tensor(toks)
    return ids, (ids != PAD_ID).long()


class TextEncoderNode(PromptEncoderNode):
    type_name = "wan.text_encoder"
    doc = ("UMT5-XXL text encoder of Wan 2.1 (models_t5_umt5-xxl-enc-bf16.pth or an HF folder): a prompt (and an "
           "optional negative prompt) to [1, text_len, dim] embeddings with padded rows zeroed. Cached per prompt.")
    inputs = (Port("prompt", TEXT, "the prompt"),
              Port("negative", TEXT, "a negative prompt for CFG, encoded by the same weights", optional=True))
    outputs = (Port("embeds", TEXT_EMBEDDING, "[1, text_len, dim], rows past the prompt zeroed"),
               Port("negative_embeds", TEXT_EMBEDDING, "the negative prompt's embeddings (when `negative` is wired)"))
    params = (
        checkpoint_param(WAN_T5, "UMT5 encoder weights (Wan .pth or HF UMT5EncoderModel layout)"),
        Param("tokenizer", str, WAN_TOKENIZER, "tokenizer folder (local or hf://), or 'bytes' for the offline byte "
              "tokenizer of random tiny models"),
        Param("text_len", int, 512, "tokens per prompt (padded / truncated)", min=1),
        Param("dim", int, 4096, "d_model (random weights)", min=1),
        Param("ffn_dim", int, 10240, "d_ff (random weights)", min=1),
        Param("num_heads", int, 64, "attention heads (random weights)", min=1),
        Param("head_dim", int, 64, "d_kv (random weights)", min=1),
        Param("num_layers", int, 24, "encoder layers (random weights)", min=1),
        Param("vocab_size", int, 256384, "vocabulary (random weights; >= 259 for the bytes tokenizer)", min=1),
        Param("num_buckets", int, 32, "relative position buckets (random weights)", min=1),
        CACHE_SIZE,
        dtype_param(),
        seed_param(),
    )

    def _random_config(self):
        from transformers import UMT5Config

        from .umt5 import RELATIVE_MAX_DISTANCE
        return UMT5Config(vocab_size=self.p.vocab_size, d_model=self.p.dim, d_kv=self.p.head_dim, d_ff=self.p.ffn_dim,
                          num_layers=self.p.num_layers, num_heads=self.p.num_heads,
                          relative_attention_num_buckets=self.p.num_buckets,
                          relative_attention_max_distance=RELATIVE_MAX_DISTANCE, feed_forward_proj="gated-gelu",
                          layer_norm_epsilon=1e-6, dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)

    def estimate_bytes(self) -> int:
        """Counted from the size params, not on a meta module: planning need not import transformers."""
        p = self.p
        per_layer = (4 * p.dim * p.num_heads * p.head_dim + 3 * p.dim * p.ffn_dim + 2 * p.dim
                     + p.num_buckets * p.num_heads)
        count = p.vocab_size * p.dim + p.num_layers * per_layer + p.dim
        return count * dtype_bytes(p.dtype, self.device)

    def build_random(self):
        from transformers import UMT5EncoderModel
        return UMT5EncoderModel(self._random_config())

    def build_from(self, checkpoint) -> Built:
        from transformers import UMT5EncoderModel

        from .umt5 import config_from_state_dict, to_hf_state_dict
        hf = to_hf_state_dict(checkpoint)  # Wan or HF layout -> HF names
        with torch.device("meta"):
            model = UMT5EncoderModel(config_from_state_dict(hf))
        return Built(model, hf)

    def finish(self, model):
        model.encoder.embed_tokens.weight = model.shared.weight  # random init / assignment broke the tie
        return model

    def load(self, progress=None) -> None:
        super().load(progress)
        if self.p.tokenizer == BYTES:
            if self.model.config.vocab_size < 256 + BYTE_OFFSET:
                raise FdError(f"node {self.name!r}: tokenizer 'bytes' needs vocab_size >= {256 + BYTE_OFFSET}")
        else:
            from transformers import AutoTokenizer

            from nodes.checkpoint import resolve
            self.tokenizer = AutoTokenizer.from_pretrained(str(resolve(self.p.tokenizer, kind="folder")))

    def _tokenize(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        from .umt5 import clean_prompt
        if self.tokenizer is None:
            return byte_tokenize([clean_prompt(prompt)], self.p.text_len)
        t = self.tokenizer([clean_prompt(prompt)], padding="max_length", truncation=True, max_length=self.p.text_len,
                           add_special_tokens=True, return_tensors="pt")
        return t.input_ids, t.attention_mask

    def encode_uncached(self, prompt: str) -> torch.Tensor:
        """[1, text_len, dim] embeddings of ``prompt``, rows past it zeroed."""
        from .umt5 import encode
        ids, mask = self._tokenize(prompt)
        return encode(self.model, ids, mask)


NODE_TYPES = (TextEncoderNode,)
