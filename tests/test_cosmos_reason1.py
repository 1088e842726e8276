"""cosmos.reason1_encoder (Predict2.5's text features) against plain transformers calls on a tiny random
Qwen2.5-VL built here (offline): the whole vision-language model saved as a checkpoint folder (vision tower and
LM head included, which the node must skip), a tiny byte-level tokenizer with a ChatML template, and a
reference that loads the folder with ``Qwen2_5_VLForConditionalGeneration.from_pretrained``, reads every
decoder layer's output and the final norm's through forward hooks, and normalises / concatenates by hand as
upstream's ``compute_text_embeddings_online`` (full_concat) does.
"""
from __future__ import annotations

import json

import pytest
import torch

from engine.errors import FdError
from nodes.cosmos.reason1 import CosmosReason1EncoderNode

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SYSTEM = "You are a helpful assistant who will provide prompts to an image generator."   # upstream's, verbatim
TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
            "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
            "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SIZES = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=300)


def _tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    return tok


def _checkpoint(tmp_path, legacy_keys: bool):
    """A random tiny Qwen2.5-VL saved whole; ``legacy_keys``: the older ``model.layers.*`` layout."""
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    cfg = Qwen2_5_VLConfig(**SIZES, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                     "mrope_section": [2, 2, 2]},
                           vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2,
                                          "out_hidden_size": SIZES["hidden_size"]},
                           bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():   # not the init's near-zero weights: every layer should matter
            p.copy_(torch.randn_like(p) * (0.2 if p.ndim > 1 else 0.1) + (1.0 if p.ndim == 1 else 0.0))
    folder = tmp_path / "reason1"
    model.save_pretrained(folder, safe_serialization=True)
    if legacy_keys:
        files = list(folder.glob("*.safetensors"))
        sd = {}
        for f in files:
            sd.update(load_file(f))
            f.unlink()
        for idx in folder.glob("*.index.json"):
            idx.unlink()
        sd = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
              for k, v in sd.items()}
        assert any(k.startswith("model.layers.") for k in sd) and any(k.startswith("visual.") for k in sd)
        save_file(sd, folder / "model.safetensors")
    return folder


def _reference(folder, ids: torch.Tensor) -> torch.Tensor:
    from transformers import Qwen2_5_VLForConditionalGeneration
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    lm = model.model.language_model
    outs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in lm.layers[:-1]]
    hooks.append(lm.norm.register_forward_hook(lambda m, a, o: outs.append(o)))
    with torch.no_grad():
        model(input_ids=ids)                  # no attention mask: causal over the padding too, as upstream
    for h in hooks:
        h.remove()
    assert len(outs) == lm.config.num_hidden_layers
    return torch.cat([(h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-8) for h in outs], dim=-1)


@pytest.mark.parametrize("legacy_keys", [False, True])
def test_features_match_transformers_layer_by_layer(tmp_path, legacy_keys):
    folder = _checkpoint(tmp_path, legacy_keys)
    tok = _tokenizer(tmp_path / "tok")
    text_len = 144
    node = CosmosReason1EncoderNode("text", {"checkpoint": str(folder), "tokenizer": str(tmp_path / "tok"),
                                             "text_len": text_len, "dtype": "fp32"}, "cpu")
    node.load()
    prompt = "a red cube on a table"
    out = node.run({"prompt": prompt, "negative": "blurry"}, None, None)
    chat = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
    ids = tok.encode(chat).ids
    pad = tok.token_to_id("<|endoftext|>")
    assert len(ids) < text_len
    want_ids = torch.tensor([ids + [pad] * (text_len - len(ids))])
    assert torch.equal(node.token_ids(prompt), want_ids)
    ref = _reference(folder, want_ids)
    emb = out["embeds"]
    assert emb.shape == (1, text_len, SIZES["num_hidden_layers"] * SIZES["hidden_size"]) == ref.shape
    torch.testing.assert_close(emb, ref, rtol=1e-4, atol=1e-4)
    assert emb[0, len(ids):].abs().sum() > 0                     # padding rows kept (not zeroed as T5's)
    assert not torch.allclose(out["negative_embeds"], emb)
    assert node.feature_width == emb.shape[-1]


def test_long_prompts_are_truncated_to_text_len(tmp_path):
    _tokenizer(tmp_path / "tok")
    node = CosmosReason1EncoderNode("text", {"tokenizer": str(tmp_path / "tok"), "text_len": 40, "hidden_size": 16,
                                             "intermediate_size": 24, "num_layers": 2, "num_heads": 2,
                                             "num_kv_heads": 1, "vocab_size": 300, "dtype": "fp32"}, "cpu")
    node.load()
    ids = node.token_ids("x" * 200)
    assert ids.shape == (1, 40) and int(ids[0, -1]) != node.tokenizer.pad_token_id
    assert node.run({"prompt": "x" * 200}, None, None)["embeds"].shape == (1, 40, 32)


def test_estimate_is_the_parameter_count_of_the_real_class():
    from transformers import Qwen2_5_VLTextModel
    for params in ({}, {"hidden_size": 48, "intermediate_size": 80, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
                        "vocab_size": 300}):
        node = CosmosReason1EncoderNode("text", {**params, "dtype": "fp32"}, "cpu")
        with torch.device("meta"):
            model = Qwen2_5_VLTextModel(node._random_config())
        assert node.estimate_bytes() == 4 * sum(p.numel() for p in model.parameters())
    # the 7B language model (Cosmos-Reason1), without vision tower and LM head: ~7.07e9 parameters
    assert 7.0e9 < CosmosReason1EncoderNode("text", {"dtype": "fp32"}, "cpu").estimate_bytes() / 4 < 7.1e9


def test_a_t5_checkpoint_is_refused_with_its_name(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "t5.safetensors"
    save_file({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2)}, path)
    node = CosmosReason1EncoderNode("text", {"checkpoint": str(path), "dtype": "fp32"}, "cpu")
    with pytest.raises(FdError, match="not a Qwen2.5-VL / Cosmos-Reason1 checkpoint"):
        node.load()


def test_config_of_another_family_is_refused(tmp_path):
    folder = _checkpoint(tmp_path, False)
    (tmp_path / "t5.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    node = CosmosReason1EncoderNode("text", {"checkpoint": str(folder), "config": str(tmp_path / "t5.json"),
                                             "dtype": "fp32"}, "cpu")
    with pytest.raises(FdError, match="expected a Qwen2.5-VL config"):
        node.load()
