"""FlashVSR LQ projector parity (golden ``flashvsr_lq_proj``): both releases, streamed and non-streamed."""
import pytest
import torch
from goldens import case_json, has_case, tensors

from nodes.flashvsr.lq_proj import LQProjConfig, LQProjector

CASE = "flashvsr_lq_proj"
MODE_OF_CLASS = {"Causal_LQ4x_Proj": "causal", "Buffer_LQ4x_Proj": "buffer"}


def variants():
    if not has_case(CASE):
        return [pytest.param(None, id="absent")]
    return [pytest.param(v, id=v) for v in sorted(case_json(CASE)["upstream"]["classes"])]


@pytest.fixture(scope="module")
def case():
    cj = case_json(CASE)
    sd = tensors(CASE, cj["files"]["weights"])
    model = LQProjector(LQProjConfig.from_state_dict(sd, in_dim=cj["config"]["in_dim"]))
    model.load_state_dict(sd, strict=True)
    inputs = tensors(CASE, cj["files"]["inputs"])
    lq = inputs["lq_video_u8"].float().permute(3, 0, 1, 2)[None] / 255.0 * 2.0 - 1.0
    return cj, model.eval(), lq, tensors(CASE, cj["files"]["outputs"])


def _setup(case, variant):
    if variant is None:
        case_json(CASE)  # skips (or fails under FD_GOLDENS)
    cj, model, lq, out = case
    mode = MODE_OF_CLASS[cj["upstream"]["classes"][variant]["class"]]
    tol = dict(atol=cj["tolerance"][variant]["atol"], rtol=cj["tolerance"][variant]["rtol"])
    return cj, model, lq, out, mode, tol


def test_sizes_read_from_weights(case):
    cj, model, _, _ = case
    c = cj["config"]
    assert (model.cfg.hidden1, model.cfg.hidden2, model.cfg.out_dim, model.cfg.layer_num) == \
        (c["hidden1"], c["hidden2"], c["out_dim"], c["layer_num"])
    assert model.cfg.unshuffle == c["pixel_unshuffle"][1] and list(model.cfg.kernel) == c["conv_kernel"]


@pytest.mark.parametrize("variant", variants())
@torch.no_grad()
def test_stream_calls_match_golden(case, variant):
    cj, model, lq, out, mode, tol = _setup(case, variant)
    stream = model.open_stream(mode)
    chunks: dict[int, list] = {}
    for call in cj["stream_calls"]:
        a, b = call["lq_frames"]
        got = stream(lq[:, :, a:b])
        if call["call"] == 0:
            assert got is None
            continue
        for layer, t in enumerate(got):
            torch.testing.assert_close(t, out[f"{variant}.call.{call['call']}.layer.{layer}"], **tol)
        chunks.setdefault(call["dit_chunk"], []).append(got)
    for k, calls in chunks.items():
        for layer in range(model.cfg.layer_num):
            torch.testing.assert_close(torch.cat([c[layer] for c in calls], 1), out[f"{variant}.chunk.{k}.layer.{layer}"],
                                       **tol)


@pytest.mark.parametrize("variant", variants())
@torch.no_grad()
def test_chunked_project_and_forward_match_golden(case, variant):
    """project() takes a DiT chunk's frames at once (chunk 0: 1 + 4n frames, later 4n); forward() the whole clip."""
    cj, model, lq, out, mode, tol = _setup(case, variant)
    stream = model.open_stream(mode)
    by_chunk: dict[int, list] = {}
    for call in cj["stream_calls"]:
        by_chunk.setdefault(call["dit_chunk"], []).append(call["lq_frames"])
    for k in sorted(by_chunk):
        a, b = by_chunk[k][0][0], by_chunk[k][-1][1]
        got = stream.project(lq[:, :, a:b])
        for layer, t in enumerate(got):
            torch.testing.assert_close(t, out[f"{variant}.chunk.{k}.layer.{layer}"], **tol)
    n = out[f"{variant}.forward.layer.0"].shape[1] // (lq.shape[-1] * lq.shape[-2] // model.cfg.unshuffle ** 2)
    for layer, t in enumerate(model(lq[:, :, :1 + 4 * n], mode)):
        torch.testing.assert_close(t, out[f"{variant}.forward.layer.{layer}"], **tol)


def test_causal_and_buffer_differ(case):
    """The two caches are different functions (guards against a mode flag that does nothing)."""
    _, model, lq, _ = case
    with torch.no_grad():
        a, b = model(lq[:, :, :9], "causal"), model(lq[:, :, :9], "buffer")
    assert (a[0] - b[0]).abs().max() > 1e-3


def test_bad_inputs(case):
    _, model, lq, _ = case
    stream = model.open_stream("causal")
    with pytest.raises(ValueError, match="takes 1 frame"):
        stream(lq[:, :, :4])
    stream(lq[:, :, :1])
    with pytest.raises(ValueError, match="takes 4 frame"):
        stream(lq[:, :, 1:3])
    with pytest.raises(ValueError, match="pixel-unshuffle"):
        model(lq[:, :, :5, :, :-3])
    with pytest.raises(ValueError, match="mode"):
        model.open_stream("nope")
