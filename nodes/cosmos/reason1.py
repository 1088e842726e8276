"""`cosmos.reason1_encoder`: Cosmos-Predict2.5's text features from Cosmos-Reason1 (Qwen2.5-VL-7B's language model).

What upstream computes (cosmos_predict2/_src/predict2/text_encoders/text_encoder.py, ``compute_text_embeddings_
online`` with ``embedding_concat_strategy: full_concat``, the 2B configs' choice):

- the prompt as a chat: system "You are a helpful assistant who will provide prompts to an image generator.",
  then the user's text; the tokenizer's chat template, no generation prompt;
- token ids padded with the pad id (or truncated) to 512; NO attention mask: the model runs causally over the
  padding as well, and the padding rows are kept (unlike T5's zeroed rows);
- every decoder layer's output (``hidden_states[1:]``: layers 1 .. L-1, then the last one after the final RMSNorm),
  each normalised over its features ``(h - mean) / (std + 1e-8)`` (unbiased std), concatenated:
  [1, 512, L * hidden] (28 x 3584 = 100352 for the 7B). The DiT's ``crossattn_proj`` maps that to 1024.

Only the language model is built and loaded (the vision tower and LM head of the checkpoint are skipped): the
weights are transformers' ``Qwen2_5_VLTextModel`` under either key layout (``model.layers.*`` of older saves,
``model.language_model.layers.*`` of newer ones). It is the largest part of a Predict2.5 pipeline (~14 GiB in
bf16, 7x the DiT): with ``offload: true`` it goes back to host memory once the session's prompts are encoded
(the memory plan then leaves it out of the blocks' peak), and comes back for a new prompt.
"""
from __future__ import annotations

import torch

from engine.errors import FdError
from engine.node import Param, Port
from engine.types import TEXT, TEXT_EMBEDDING
from nodes.common.model_node import Built
from nodes.common.prompt_encoder import CACHE_SIZE, PromptEncoderNode
from nodes.common.params import checkpoint_param, dtype_bytes, dtype_param, seed_param

from .text import BYTES

SYSTEM_PROMPT = "You are a helpful assistant who will provide prompts to an image generator."
LANGUAGE_PREFIXES = ("model.language_model.", "model.")   # newer transformers saves first
LANGUAGE_PARTS = ("embed_tokens.", "layers.", "norm.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json",
                   "chat_template.jinja", "vocab.json", "merges.txt")
NORM_EPS = 1e-8


def chat_messages(prompt: str) -> list[dict]:
    """Upstream's conversation for one prompt (content as typed parts, as Qwen2.5-VL's processor takes them)."""
    return [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": [{"type": "text", "text": prompt}]}]


def chat_text(prompt: str) -> str:
    """Qwen's ChatML rendering of ``chat_messages`` (what its template gives for text-only parts); used with the
    offline byte tokenizer, whose vocabulary has no template."""
    return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
            f"<|im_start|>user\n{prompt}<|im_end|>\n")


def pad_ids(ids: list[int], text_len: int, pad_id: int) -> torch.Tensor:
    """[1, text_len]: the ids, then ``pad_id`` (or cut at text_len), as upstream pads."""
    ids = list(ids)[:text_len]
    return torch.tensor([ids + [pad_id] * (text_len - len(ids))], dtype=torch.long)


def normalized_layers(hidden_states) -> torch.Tensor:
    """``hidden_states`` (embeddings first, then every layer's output, the last one normed) -> the concatenation
    of layers 1.. each normalised over features with the unbiased std, in float32."""
    out = []
    for h in hidden_states[1:]:
        h = h.float()
        out.append((h - h.mean(dim=-1, keepdim=True)) / (h.std(dim=-1, keepdim=True) + NORM_EPS))
    return torch.cat(out, dim=-1)


def language_weights(sd):
    """The language model's tensors of a Qwen2.5-VL checkpoint, named as ``Qwen2_5_VLTextModel``'s
    (vision tower, LM head and anything else dropped)."""
    keys = list(sd)
    prefix = next((p for p in LANGUAGE_PREFIXES if any(k.startswith(p + "layers.") for k in keys)), None)
    if prefix is None:
        prefix = "" if any(k.startswith("layers.") for k in keys) else None
    if prefix is None:
        raise ValueError("no language-model layers (model.layers.*, model.language_model.layers.* or layers.*)")
    keep = {k[len(prefix):]: k for k in keys if k.startswith(prefix) and k[len(prefix):].startswith(LANGUAGE_PARTS)}
    if hasattr(sd, "renamed"):
        return sd.renamed(keep)
    return {new: sd[old] for new, old in keep.items()}


def text_config_of(d: dict):
    """transformers' text config from a config.json dict: Qwen2.5-VL (flat legacy layout or ``text_config``)."""
    from transformers import Qwen2_5_VLConfig
    if d.get("model_type") not in ("qwen2_5_vl", None):
        raise ValueError(f"model_type {d.get('model_type')!r}: expected a Qwen2.5-VL config (Cosmos-Reason1)")
    return Qwen2_5_VLConfig(**{k: v for k, v in d.items() if k != "model_type"}).text_config


class CosmosReason1EncoderNode(PromptEncoderNode):
    type_name = "cosmos.reason1_encoder"
    doc = ("Cosmos-Predict2.5 text encoder: Cosmos-Reason1 (Qwen2.5-VL-7B's language model, transformers), every "
           "layer's normalised output concatenated: a prompt (and an optional negative prompt) to "
           "[1, text_len, layers x hidden]. Cached per prompt.")
    inputs = (Port("prompt", TEXT, "the prompt"),
              Port("negative", TEXT, "a negative prompt for guidance, encoded by the same weights", optional=True))
    outputs = (Port("embeds", TEXT_EMBEDDING, "[1, text_len, layers x hidden] (padding rows kept, as upstream)"),
               Port("negative_embeds", TEXT_EMBEDDING, "the negative prompt's features (when `negative` is wired)"))
    params = (
        checkpoint_param("random", "Cosmos-Reason1 / Qwen2.5-VL weights (a folder, a safetensors index or file; "
                         "only the language model is read)"),
        Param("config", str, None, "its config.json (default: next to the checkpoint)", nullable=True),
        Param("tokenizer", str, BYTES, "the tokenizer: a folder, or its tokenizer.json (local or hf://; it and its "
              "sibling tokenizer files are fetched), or 'bytes' (offline byte tokenizer of random tiny models)"),
        Param("text_len", int, 512, "tokens per prompt (padded with the pad id / truncated)", min=1),
        Param("hidden_size", int, 3584, "width (random weights; 7B: 3584)", min=1),
        Param("intermediate_size", int, 18944, "MLP width (random weights; 7B: 18944)", min=1),
        Param("num_layers", int, 28, "decoder layers (random weights; 7B: 28)", min=1),
        Param("num_heads", int, 28, "attention heads (random weights; 7B: 28)", min=1),
        Param("num_kv_heads", int, 4, "key/value heads (random weights; 7B: 4)", min=1),
        Param("vocab_size", int, 152064, "vocabulary (random weights; >= 259 for the bytes tokenizer)", min=1),
        CACHE_SIZE,
        dtype_param(),
        seed_param(),
    )

    # ------------------------------------------------------------------ sizes
    @property
    def feature_width(self) -> int:
        """Width of the output: layers x hidden (the DiT's crossattn_proj input)."""
        if self.model is not None:
            return self.model.config.num_hidden_layers * self.model.config.hidden_size
        return self.p.num_layers * self.p.hidden_size

    def _random_config(self):
        from transformers import Qwen2_5_VLConfig
        p = self.p
        if p.hidden_size % p.num_heads or p.num_heads % p.num_kv_heads:
            raise FdError(f"node {self.name!r}: hidden_size {p.hidden_size} / num_heads {p.num_heads} / num_kv_heads "
                          f"{p.num_kv_heads} do not split into whole heads and groups")
        half = p.hidden_size // p.num_heads // 2        # M-RoPE sections (t, h, w) in the 7B's 16:24:24 ratio
        sections = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
        cfg = Qwen2_5_VLConfig(hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                               num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads,
                               num_key_value_heads=p.num_kv_heads, vocab_size=p.vocab_size,
                               rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": sections},
                               bos_token_id=None, eos_token_id=None).text_config
        cfg._attn_implementation = "sdpa"
        return cfg

    def estimate_bytes(self) -> int:
        """Closed form (planning must not import transformers): embeddings, per layer q/k/v (+ biases), o, the
        gated MLP and two RMSNorms, the final norm. Checked against the real class in tests/test_cosmos_reason1.py."""
        p = self.p
        h, kv = p.hidden_size, p.hidden_size // p.num_heads * p.num_kv_heads
        per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * p.intermediate_size + 2 * h
        count = p.vocab_size * h + p.num_layers * per_layer + h
        return count * dtype_bytes(p.dtype, self.device)

    # ------------------------------------------------------------------ loading
    def build_random(self):
        from transformers import Qwen2_5_VLTextModel
        return Qwen2_5_VLTextModel(self._random_config())

    def open_weights(self):
        from nodes.checkpoint import CheckpointError, open_checkpoint
        sd = open_checkpoint(self.p.checkpoint)
        try:
            return language_weights(sd)
        except ValueError as e:
            raise CheckpointError(f"{self.p.checkpoint} is not a Qwen2.5-VL / Cosmos-Reason1 checkpoint: {e}") from e

    def _config_ref(self) -> str:
        if self.p.config:
            return self.p.config
        ref = str(self.p.checkpoint).rstrip("/")
        if not ref.endswith((".json", ".safetensors", ".bin", ".pt", ".pth")):
            return ref + "/config.json"                      # a folder
        return ref.rsplit("/", 1)[0] + "/config.json" if "/" in ref else "config.json"

    def build_from(self, sd) -> Built:
        import json

        from transformers import Qwen2_5_VLTextModel

        from nodes.checkpoint import resolve
        path = resolve(self._config_ref(), kind="file")
        try:
            cfg = text_config_of(json.loads(path.read_text()))
        except ValueError as e:
            raise FdError(f"node {self.name!r} ({self.type_name}): {path}: {e}") from e
        cfg._attn_implementation = "sdpa"
        with torch.device("meta"):
            return Built(Qwen2_5_VLTextModel(cfg), sd)

    def constants(self, module) -> None:
        """RoPE inverse frequencies: a buffer no checkpoint holds (random init and meta building lose it)."""
        rot = module.rotary_emb
        with torch.device("cpu"):
            fresh = type(rot)(rot.config)
        rot.register_buffer("inv_freq", fresh.inv_freq.to(self.device), persistent=False)
        rot.register_buffer("original_inv_freq", fresh.original_inv_freq.to(self.device), persistent=False)
        rot.attention_scaling = fresh.attention_scaling

    def load(self, progress=None) -> None:
        super().load(progress)
        if self.p.tokenizer != BYTES:
            self.tokenizer = self._load_tokenizer(str(self.p.tokenizer))
        elif self.model.config.vocab_size < 259:
            raise FdError(f"node {self.name!r}: tokenizer 'bytes' needs vocab_size >= 259")

    def _load_tokenizer(self, ref: str):
        from transformers import AutoTokenizer

        from nodes.checkpoint import CheckpointError, resolve
        if ref.endswith(".json"):   # one file of the tokenizer folder: fetch it and the siblings that exist
            folder = resolve(ref, kind="file").parent
            base = ref.rsplit("/", 1)[0]
            for name in TOKENIZER_FILES:
                try:
                    resolve(f"{base}/{name}", kind="file")
                except CheckpointError:
                    pass
        else:
            folder = resolve(ref, kind="folder")
        tok = AutoTokenizer.from_pretrained(str(folder))
        if tok.pad_token_id is None:
            raise FdError(f"node {self.name!r}: the tokenizer in {folder} has no pad token (upstream pads with it)")
        return tok

    # ------------------------------------------------------------------ encoding
    def token_ids(self, prompt: str) -> torch.Tensor:
        """[1, text_len]: the chat-formatted prompt's ids, padded with the pad id."""
        if self.tokenizer is None:
            ids = [b + 3 for b in chat_text(prompt).encode("utf-8")]
            return pad_ids(ids, self.p.text_len, 0)
        tok = self.tokenizer
        if tok.chat_template:
            text = tok.apply_chat_template(chat_messages(prompt), tokenize=False, add_generation_prompt=False,
                                           add_vision_id=False)
        else:
            text = chat_text(prompt)
        return pad_ids(tok(text, add_special_tokens=False)["input_ids"], self.p.text_len, tok.pad_token_id)

    def encode_uncached(self, prompt: str) -> torch.Tensor:
        """[1, text_len, layers x hidden] of ``prompt``."""
        out = self.model(input_ids=self.token_ids(prompt).to(self.device), output_hidden_states=True, use_cache=False)
        return normalized_layers(out.hidden_states).to(self.dtype)


NODE_TYPES = (CosmosReason1EncoderNode,)
