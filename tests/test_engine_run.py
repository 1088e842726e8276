"""Plan phases and order, placement records, capture decisions, session streaming, prompt switch, reset."""
import pytest
import torch

from engine import SpecErrors, load_plan
from engine.placement import place
from engine.plan import decide_capture
from engine.session import Pipeline
from engine_fixtures import GOOD, Accumulate, FakeEncoder, Recorder, registry, write


@pytest.fixture
def plan(tmp_path):
    return load_plan(write(tmp_path, GOOD), registry=registry(), cuda_devices=0)


def test_phases_and_order(plan):
    assert plan.session_nodes == ["enc"]
    assert plan.block_nodes == ["acc", "rec"]
    assert list(plan.order) == ["enc", "acc", "rec"]
    assert plan.graph.edges["enc", "acc"]["type"] == "text_embedding"


def test_placement_is_recorded(plan):
    for n in plan.order:
        assert plan.nodes[n].placement.device == "cpu"
        assert plan.nodes[n].context().device == "cpu"
    assert "no CUDA device" in plan.nodes["enc"].placement.reason


def test_auto_placement_by_memory_estimate():
    enc = FakeEncoder("enc", {})                       # estimates 3 GiB
    acc = Accumulate("acc", {})                        # estimates 0
    gib = 2**30
    out = place({"enc": ("auto", enc), "acc": ("auto", acc)}, free_bytes=[2 * gib, 10 * gib])
    assert out["enc"].device == "cuda:1" and out["enc"].estimate_bytes == 3 * gib
    out = place({"enc": ("auto", enc)}, free_bytes=[1 * gib])
    assert out["enc"].device == "cpu" and "does not fit" in out["enc"].reason
    out = place({"enc": ("cuda", enc)}, free_bytes=[1 * gib])
    assert out["enc"].device == "cuda:0" and out["enc"].reason == "set in the spec"


def test_capture_decisions():
    acc = Accumulate("acc", {})
    assert decide_capture(acc, "auto", "cuda:0").captured
    assert not decide_capture(acc, "auto", "cpu").captured
    assert "capture: false" in decide_capture(acc, False, "cuda:0").reason
    enc = FakeEncoder("enc", {})
    assert "once per session" in decide_capture(enc, "auto", "cuda:0").reason
    from engine_fixtures import Needy
    assert "not marked capturable" in decide_capture(Needy("n", {"level": 1}), "auto", "cuda:0").reason


def test_stream_order_prompt_switch_and_reset(plan):
    FakeEncoder.calls.clear()
    Recorder.log.clear()
    session = Pipeline(plan).open_session()
    results = list(session.stream())                   # inputs.num_blocks = 3
    assert [r.block for r in results] == [0, 1, 2]
    assert [b for _, b, _ in Recorder.log] == [0, 1, 2]  # the sink saw every block, in order
    assert FakeEncoder.calls == ["hello"]               # session phase ran once
    v = [x for _, _, x in Recorder.log]
    assert v[1] == pytest.approx(2 * v[0]) and v[2] == pytest.approx(3 * v[0])
    session.set_input("prompt", "a different prompt")
    session.step()
    assert FakeEncoder.calls == ["hello", "a different prompt"]  # re-encoded only because its input changed
    assert Recorder.log[-1][2] != pytest.approx(4 * v[0])         # the state was kept and new embeds added
    session.step()
    assert len(FakeEncoder.calls) == 2
    session.reset()
    session.step()
    assert Recorder.log[-1][2] == pytest.approx(float(torch.tensor(
        sum(map(ord, "a different prompt")) % 97.0) * 2.0))
    assert all(ms >= 0 for ms in results[0].timings_ms.values()) and "acc" in results[0].timings_ms
    session.close()


def test_unknown_session_input_is_a_user_error(plan):
    from engine import FdError
    session = Pipeline(plan).open_session()
    with pytest.raises(FdError, match="no input 'promt'"):
        session.set_input("promt", "x")


def test_plan_raises_all_errors(tmp_path):
    with pytest.raises(SpecErrors) as e:
        load_plan(write(tmp_path, GOOD.replace("test.accumulate", "nope").replace("{dim: 4}", "{dim: -1}")),
                  registry=registry())
    assert {x.code for x in e.value.errors} == {"unknown_node_type", "bad_param"}
