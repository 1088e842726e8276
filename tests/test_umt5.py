"""UMT5 text encoder parity (golden case ``wan_t5``) and the prompt -> context path."""
import pytest
import torch
from goldens import case_json, tensors

from nodes.text.umt5 import TextEncoder, build_umt5_encoder, config_from_state_dict, encode, to_hf_state_dict

CASE = "wan_t5"


@pytest.fixture(scope="module")
def case():
    cj = case_json(CASE)
    sd = tensors(CASE, cj["files"]["weights"])
    return cj, sd, tensors(CASE, cj["files"]["inputs"]), tensors(CASE, cj["files"]["outputs"])


def tol(cj):
    return dict(atol=cj["tolerance"]["atol"], rtol=cj["tolerance"]["rtol"])


def test_config_inferred_from_shapes(case):
    cj, sd, _, _ = case
    cfg = config_from_state_dict(sd)
    for k, v in cj["hf_umt5_config"].items():
        assert getattr(cfg, k) == v, k


def test_wan_layout_matches_golden(case):
    cj, sd, inputs, outputs = case
    model = build_umt5_encoder(sd)
    raw = encode(model, inputs["ids"], inputs["mask"], zero_padding=False)
    torch.testing.assert_close(raw, outputs["hidden_states"], **tol(cj))
    ctx = encode(model, inputs["ids"], inputs["mask"])
    torch.testing.assert_close(ctx, outputs["context_padding_zeroed"], **tol(cj))
    lens = inputs["mask"].sum(1)
    for b, n in enumerate(lens.tolist()):
        assert ctx[b, n:].abs().sum().item() == 0.0
        assert ctx[b, :n].abs().amax(-1).gt(0).all()


def test_hf_layout_loads(case):
    """Diffusers' text_encoder folder: HF keys, tied embedding stored once."""
    cj, sd, inputs, outputs = case
    hf = to_hf_state_dict(sd)
    hf.pop("encoder.embed_tokens.weight")
    model = build_umt5_encoder(hf)
    assert model.encoder.embed_tokens.weight is model.shared.weight
    ctx = encode(model, inputs["ids"], inputs["mask"])
    torch.testing.assert_close(ctx, outputs["context_padding_zeroed"], **tol(cj))


def test_unknown_wan_key_is_rejected(case):
    _, sd, _, _ = case
    with pytest.raises(KeyError):
        to_hf_state_dict({**sd, "blocks.0.attn.extra.weight": torch.zeros(1)})


def _tiny_tokenizer_folder(path, vocab_size):
    """A local T5 (Unigram) tokenizer with ids < vocab_size: <pad>=0, </s>=1, <unk>=2 like umt5."""
    from transformers import T5Tokenizer

    words = ["a", "cat", "dog", "runs", "on", "the", "beach", "&", "b"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in words] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz&"]
    assert len(vocab) <= vocab_size
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(str(path))
    return str(path)


def test_text_encoder_tokenizes_and_encodes(case, tmp_path):
    cj, sd, inputs, _ = case
    vocab = config_from_state_dict(sd).vocab_size
    text_len = inputs["ids"].shape[1]
    enc = TextEncoder(sd, _tiny_tokenizer_folder(tmp_path, vocab), text_len=text_len)
    prompts = ["a cat runs on the beach", "  a&amp;amp;b \n dog ", "a cat " * text_len]
    ids, mask = enc.tokenize(prompts)
    assert ids.shape == mask.shape == (3, text_len)
    n = mask.sum(1)
    assert n[2] == text_len  # truncated
    for b in range(3):
        assert ids[b, n[b] - 1] == enc.tokenizer.eos_token_id
        assert (ids[b, n[b]:] == enc.tokenizer.pad_token_id).all()
    # Wan's cleaning: HTML unescaped twice, whitespace collapsed
    same_ids, _ = enc.tokenize("a&b dog")
    torch.testing.assert_close(ids[1:2], same_ids)
    ctx = enc(prompts)
    assert ctx.shape == (3, text_len, cj["hf_umt5_config"]["d_model"])
    torch.testing.assert_close(ctx, encode(enc.model, ids, mask), atol=0.0, rtol=0.0)
    assert ctx[0, n[0]:].abs().max().item() == 0.0 and ctx[0, : n[0]].abs().amax(-1).gt(0).all()
