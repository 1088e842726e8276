"""`cosmos.text_encoder`: Cosmos-Predict2's T5 text encoder (transformers ``T5EncoderModel``), once per prompt.

As upstream's ``CosmosT5TextEncoder``: the prompt is tokenized to ``text_len`` (512) tokens, padded and
truncated, run through the T5 encoder with its attention mask, and the rows past the prompt's length are
zeroed. Predict2 uses T5-11B's encoder (d_model 1024 = the DiT's cross-attention width).

Weights load through the ModelNode recipe: ``checkpoint`` names the weights (safetensors, a sharded index or
a torch file of a ``T5EncoderModel`` or a whole ``T5ForConditionalGeneration``: decoder and LM head are
dropped), ``config`` the transformers config.json (default: the one next to the weights). With
``offload: true`` in the spec the weights go back to host memory once the session's prompts are encoded.
"""
from __future__ import annotations

import torch

from engine.errors import FdError
from engine.node import Param, Port
from engine.types import TEXT, TEXT_EMBEDDING
from nodes.common.model_node import Built
from nodes.common.prompt_encoder import CACHE_SIZE, PromptEncoderNode
from nodes.common.params import checkpoint_param, dtype_bytes, dtype_param, seed_param

BYTES = "bytes"
DROPPED = ("decoder.", "lm_head.")

T5_RELATIVE_BUCKETS = 32  # transformers T5Config default, which _random_config keeps


def byte_ids(prompt: str, text_len: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Offline stand-in tokenizer for random tiny models: UTF-8 bytes + 3, then the end token 1, pad 0."""
    if vocab < 259:
        raise ValueError(f"the bytes tokenizer needs vocab_size >= 259, got {vocab}")
    toks = [b + 3 for b in prompt.encode("utf-8")][: text_len - 1] + [1]
    ids = torch.zeros(1, text_len, dtype=torch.long)
    ids[0, : len(toks)] = torch.tensor(toks)
    return ids, (ids != 0).long()


def encoder_weights(sd):
    """The encoder's tensors of a T5 checkpoint (decoder / LM head dropped), ``encoder.embed_tokens`` tied to
    ``shared`` when the file stores only one of them."""
    keep = {k: k for k in sd if not k.startswith(DROPPED)}
    if "encoder.embed_tokens.weight" not in keep and "shared.weight" in keep:
        keep["encoder.embed_tokens.weight"] = "shared.weight"
    if "shared.weight" not in keep and "encoder.embed_tokens.weight" in keep:
        keep["shared.weight"] = "encoder.embed_tokens.weight"
    if hasattr(sd, "renamed"):
        return sd.renamed(keep)
    return {new: sd[old] for new, old in keep.items()}


class CosmosT5EncoderNode(PromptEncoderNode):
    type_name = "cosmos.text_encoder"
    doc = ("Cosmos-Predict2 T5 text encoder (transformers T5EncoderModel, e.g. T5-11B's encoder, 1024-d): a prompt "
           "(and an optional negative prompt) to [1, text_len, d_model], rows past the prompt zeroed. Cached per "
           "prompt.")
    inputs = (Port("prompt", TEXT, "the prompt"),
              Port("negative", TEXT, "a negative prompt for guidance, encoded by the same weights", optional=True))
    outputs = (Port("embeds", TEXT_EMBEDDING, "[1, text_len, d_model], rows past the prompt zeroed"),
               Port("negative_embeds", TEXT_EMBEDDING, "the negative prompt's embeddings (when `negative` is wired)"))
    params = (
        checkpoint_param("random", "T5 weights (T5EncoderModel or a whole T5 model; safetensors, index or torch file)"),
        Param("config", str, None, "transformers config.json of the weights (default: next to the checkpoint)",
              nullable=True),
        Param("tokenizer", str, BYTES, "T5TokenizerFast folder, or its tokenizer.json (local or hf://; only that "
              "file is fetched), or 'bytes' for the offline byte tokenizer of random tiny models"),
        Param("text_len", int, 512, "tokens per prompt (padded / truncated)", min=1),
        Param("d_model", int, 1024, "width (random weights; T5-11B: 1024)", min=1),
        Param("d_ff", int, 65536, "feed-forward width (random weights; T5-11B: 65536)", min=1),
        Param("num_heads", int, 128, "attention heads (random weights)", min=1),
        Param("d_kv", int, 128, "head size (random weights)", min=1),
        Param("num_layers", int, 24, "encoder layers (random weights)", min=1),
        Param("vocab_size", int, 32128, "vocabulary (random weights; >= 259 for the bytes tokenizer)", min=1),
        CACHE_SIZE,
        dtype_param(),
        seed_param(),
    )

    def _random_config(self):
        from transformers import T5Config
        p = self.p
        return T5Config(vocab_size=p.vocab_size, d_model=p.d_model, d_kv=p.d_kv, d_ff=p.d_ff, num_layers=p.num_layers,
                        num_heads=p.num_heads, feed_forward_proj="relu", dropout_rate=0.0, is_encoder_decoder=False,
                        use_cache=False)

    def estimate_bytes(self) -> int:
        """Closed form (planning must not import transformers); tests/test_memory_plan.py checks it against
        the real T5 class."""
        p = self.p
        per_layer = 4 * p.d_model * p.num_heads * p.d_kv + 2 * p.d_model * p.d_ff + 2 * p.d_model
        rel_bias = T5_RELATIVE_BUCKETS * p.num_heads   # the first layer's relative position bias
        count = p.vocab_size * p.d_model + p.num_layers * per_layer + p.d_model + rel_bias
        return count * dtype_bytes(p.dtype, self.device)

    def build_random(self):
        from transformers import T5EncoderModel
        return T5EncoderModel(self._random_config())

    def open_weights(self):
        from nodes.checkpoint import open_checkpoint
        return encoder_weights(open_checkpoint(self.p.checkpoint))

    def _config_ref(self) -> str:
        if self.p.config:
            return self.p.config
        ref = str(self.p.checkpoint).rstrip("/")
        return ref.rsplit("/", 1)[0] + "/config.json" if "/" in ref else "config.json"

    def build_from(self, sd) -> Built:
        from transformers import T5Config, T5EncoderModel

        from nodes.checkpoint import resolve
        cfg = T5Config.from_json_file(str(resolve(self._config_ref(), kind="file")))
        cfg.is_encoder_decoder, cfg.use_cache, cfg.dropout_rate = False, False, 0.0
        with torch.device("meta"):
            return Built(T5EncoderModel(cfg), sd)

    def finish(self, model):
        model.encoder.embed_tokens.weight = model.shared.weight  # random init / assignment broke the tie
        return model

    def load(self, progress=None) -> None:
        super().load(progress)
        if self.p.tokenizer != BYTES:
            from transformers import T5TokenizerFast

            from nodes.checkpoint import resolve
            ref = str(self.p.tokenizer)
            if ref.endswith((".json", ".model")):  # a file of the tokenizer folder: fetch just it, use its folder
                folder = resolve(ref, kind="file").parent
            else:
                folder = resolve(ref, kind="folder")
            self.tokenizer = T5TokenizerFast.from_pretrained(str(folder))
        elif self.model.config.vocab_size < 259:
            raise FdError(f"node {self.name!r}: tokenizer 'bytes' needs vocab_size >= 259")

    def _tokenize(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            return byte_ids(prompt, self.p.text_len, self.model.config.vocab_size)
        t = self.tokenizer([prompt], padding="max_length", truncation=True, max_length=self.p.text_len,
                           return_tensors="pt")
        return t.input_ids, t.attention_mask

    def encode_uncached(self, prompt: str) -> torch.Tensor:
        """[1, text_len, d_model] of ``prompt``, rows past its tokens zeroed."""
        ids, mask = self._tokenize(prompt)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        return out * mask.to(out.device, out.dtype)[..., None]


NODE_TYPES = (CosmosT5EncoderNode,)
