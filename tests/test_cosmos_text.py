"""`cosmos.text_encoder`: T5 through transformers, as upstream's CosmosT5TextEncoder (pad to text_len, rows past
the prompt zeroed), loaded from a transformers folder of a whole T5 model (decoder and LM head dropped)."""
from __future__ import annotations

import pytest
import torch

from engine.errors import FdError
from engine.node import Step
from nodes.cosmos.text import CosmosT5EncoderNode, byte_ids

TINY = dict(vocab_size=300, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)


def _saved_t5(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(**TINY, feed_forward_proj="relu", dropout_rate=0.0)).eval()
    model.save_pretrained(tmp_path / "t5", safe_serialization=True)
    return model


def test_whole_t5_folder_loads_as_an_encoder_and_zeroes_the_padding(tmp_path):
    ref_model = _saved_t5(tmp_path)
    node = CosmosT5EncoderNode("text", {"checkpoint": str(tmp_path / "t5" / "model.safetensors"),
                                        "tokenizer": "bytes", "text_len": 12, "dtype": "fp32"}, "cpu")
    node.load()
    out = node.run({"prompt": "a cat", "negative": "dark"}, None, Step(None, {}))
    emb = out["embeds"]
    assert emb.shape == (1, 12, TINY["d_model"])
    ids, mask = byte_ids("a cat", 12, TINY["vocab_size"])
    with torch.no_grad():
        ref = ref_model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    n = int(mask.sum())
    torch.testing.assert_close(emb[:, :n], ref[:, :n], atol=1e-5, rtol=1e-5)
    assert torch.all(emb[:, n:] == 0) and emb[:, :n].abs().sum() > 0
    assert not torch.allclose(out["negative_embeds"], emb)
    assert node.run({"prompt": "a cat"}, None, Step(None, {}))["embeds"] is emb  # cached


def test_random_tiny_encoder_and_bytes_tokenizer_limits():
    node = CosmosT5EncoderNode("text", {"checkpoint": "random", **TINY, "text_len": 8, "dtype": "fp32"}, "cpu")
    node.load()
    assert node.run({"prompt": "hello"}, None, Step(None, {}))["embeds"].shape == (1, 8, TINY["d_model"])
    small = CosmosT5EncoderNode("text", {"checkpoint": "random", **{**TINY, "vocab_size": 100}, "dtype": "fp32"},
                                "cpu")
    with pytest.raises(FdError, match="vocab_size >= 259"):
        small.load()
