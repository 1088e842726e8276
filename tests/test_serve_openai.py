"""fd serve's OpenAI-compatible video API, driven by the official `openai` SDK itself (base_url=.../v1): create,
poll, download a playable MP4 (decoded with PyAV and compared with the engine's own frames), list, delete a
finished, a queued and a running job, /v1/videos/sync, /v1/models, bad requests, and the token as api_key.
Jobs wait in the same queue as live WebSocket sessions. The tiny CPU spec (random weights) renders 96x64."""
from __future__ import annotations

import asyncio
import io
import time

import json
import urllib.error
import urllib.request
import numpy as np
import pytest

openai = pytest.importorskip("openai")

from engine.frames import to_uint8_frames  # noqa: E402
from engine.registry import Registry  # noqa: E402
from engine.runner import World, open_pipeline  # noqa: E402
from engine.spec import load_spec  # noqa: E402
from flashdreams_cli.serve import BackgroundServer, ServeConfig  # noqa: E402
from flashdreams_cli.serve.client import Client  # noqa: E402
from flashdreams_cli.serve.sessions import stream_source  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # the SDK marks the Sora API deprecated
SPEC = "tiny_self_forcing"
H264_TOL = 12          # mean |decoded - exact| in uint8 levels (crf 18 on noise-like random-weight frames)


def tiny(tmp_path, blocks: int = 4):
    return load_spec(SPEC, [f"inputs.num_blocks={blocks}", f"sinks.video.params.path={tmp_path / 'never.mp4'}"])


def engine_frames(spec, prompt: str, seed: int, n: int) -> np.ndarray:
    """The first ``n`` frames straight from the engine (no server): the reference a download must match."""
    registry = Registry.default()
    source = stream_source(spec, registry)
    pipe = open_pipeline(source.served, registry=registry, world=World())
    out = []
    with pipe.open_session(prompt=prompt, seed=seed) as s:
        while sum(len(f) for f in out) < n:
            out.append(to_uint8_frames(s.step().outputs[source.frames.node][source.frames.port]))
    return np.concatenate(out)[:n]


def http(method: str, url: str, body: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def decode_mp4(data: bytes) -> tuple[np.ndarray, float]:
    import av
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(stream)])
        return frames, float(stream.average_rate)


def wait_status(client, video_id: str, statuses: tuple[str, ...], timeout: float = 60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = client.videos.retrieve(video_id)
        if v.status in statuses:
            return v
        time.sleep(0.05)
    raise AssertionError(f"{video_id} still {v.status} after {timeout} s")


def test_openai_sdk_round_trip(tmp_path):
    spec = tiny(tmp_path)
    with BackgroundServer(spec, ServeConfig(port=0, video_dir=str(tmp_path / "videos"))) as bg:
        client = openai.OpenAI(base_url=bg.url + "/v1", api_key="no-token-needed", max_retries=0)
        assert [m.id for m in client.models.list()] == [SPEC]

        job = client.videos.create(model=SPEC, prompt="a red fox", seconds="1", size="96x64",
                                   extra_body={"seed": 3})
        assert job.object == "video" and job.model == SPEC and job.status in ("queued", "in_progress")
        done = wait_status(client, job.id, ("completed", "failed"))
        assert done.status == "completed" and done.progress == 100, done.error
        assert done.size == "96x64" and done.seconds == "1" and done.completed_at >= done.created_at

        mp4 = client.videos.download_content(job.id).content
        frames, fps = decode_mp4(mp4)
        assert frames.shape == (16, 64, 96, 3) and fps == 16          # 1 s at the spec's 16 fps
        ref = engine_frames(spec, "a red fox", 3, 16)
        other = engine_frames(spec, "a red fox", 4, 16)              # another seed: other noise
        err = np.abs(frames.astype(int) - ref.astype(int)).mean()
        assert err < H264_TOL, f"the MP4 is not the engine's video (mean error {err:.1f})"
        assert np.abs(frames.astype(int) - other.astype(int)).mean() > 2 * err   # the check tells videos apart
        assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == [f"{job.id}.mp4"]   # no partials left

        # the job outlived the client that made it; a new client lists it
        client.close()
        client = openai.OpenAI(base_url=bg.url + "/v1", api_key="x", max_retries=0)
        second = client.videos.create(model=SPEC, prompt="a snowy forest", extra_body={"num_frames": 5})
        wait_status(client, second.id, ("completed",))
        listed = [v.id for v in client.videos.list()]
        assert set(listed) == {job.id, second.id}
        first_page = client.videos.list(order="asc", limit=1)      # iterating a page would fetch the next ones
        assert [v.id for v in first_page.data] == [job.id] and first_page.has_more
        assert [v.id for v in client.videos.list(order="asc", limit=1, after=job.id).data] == [second.id]
        assert decode_mp4(client.videos.download_content(second.id).content)[0].shape[0] == 5

        deleted = client.videos.delete(job.id)
        assert deleted.deleted and deleted.id == job.id and deleted.object == "video.deleted"
        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve(job.id)
        assert not (tmp_path / "videos" / f"{job.id}.mp4").exists()

        # synchronous: the MP4 bytes in the response (vLLM-Omni's /v1/videos/sync), JSON body here
        status, headers, body = http("POST", bg.url + "/v1/videos/sync",
                                     {"prompt": "a red fox", "seed": 3, "num_frames": 16})
        assert status == 200 and headers["content-type"] == "video/mp4"
        synced = decode_mp4(body)[0]
        # the same request's video (not asserted bit-equal to the first job's MP4: one full-suite run under load
        # gave a few pixel levels of difference after H.264, not yet explained; see the issue-22 note)
        assert synced.shape == frames.shape
        assert np.abs(synced.astype(int) - ref.astype(int)).mean() < H264_TOL
        assert np.abs(synced.astype(int) - other.astype(int)).mean() > 2 * err

        # bad requests are 4xx with a message that says what would work
        with pytest.raises(openai.NotFoundError, match="serves 'tiny_self_forcing'"):
            client.videos.create(model="self_forcing", prompt="x")
        with pytest.raises(openai.BadRequestError, match="renders 96x64"):
            client.videos.create(model=SPEC, prompt="x", size="1280x720")
        with pytest.raises(openai.BadRequestError, match="at most"):
            client.videos.create(model=SPEC, prompt="x", seconds="12")      # 4 blocks make 45 frames
        with pytest.raises(openai.BadRequestError, match="num_inference_steps"):
            client.videos.create(model=SPEC, prompt="x", extra_body={"num_inference_steps": 50})
        with pytest.raises(openai.BadRequestError, match="input_reference"):
            client.videos.create(model=SPEC, prompt="x", input_reference=("ref.png", b"\x89PNG", "image/png"))


def test_jobs_queue_with_live_sessions_and_cancel(tmp_path):
    """A job waits behind a live WebSocket session (one replica), DELETE drops it from the queue; a running job
    stops at its next block boundary and frees the replica long before its last block."""
    spec = tiny(tmp_path, blocks=400)
    with BackgroundServer(spec, ServeConfig(port=0, max_queue=1, max_batch=1)) as bg:   # one session at a time
        client = openai.OpenAI(base_url=bg.url + "/v1", api_key="x", max_retries=0)

        ws = asyncio.run_coroutine_threadsafe(Client.open(bg.url), bg.loop).result(30)
        asyncio.run_coroutine_threadsafe(ws.start(prompt="live"), bg.loop).result(10)
        asyncio.run_coroutine_threadsafe(ws.wait_for("started", timeout=30), bg.loop).result(35)
        queued = client.videos.create(model=SPEC, prompt="waits", extra_body={"num_frames": 9})
        time.sleep(0.3)
        v = client.videos.retrieve(queued.id)
        assert v.status == "queued" and v.model_extra["queue_position"] == 1
        assert len(bg.server.manager.waiting) == 1
        with pytest.raises(openai.RateLimitError, match="busy"):      # max_queue=1: the next one is refused
            client.videos.create(model=SPEC, prompt="no room", extra_body={"num_frames": 9})
        client.videos.delete(queued.id)
        assert not bg.server.manager.waiting                         # it left the queue at once
        asyncio.run_coroutine_threadsafe(ws.close(), bg.loop).result(30)

        running = client.videos.create(model=SPEC, prompt="long")    # all 400 blocks unless cancelled
        wait_status(client, running.id, ("in_progress",))
        job = bg.server.videos.jobs[running.id]
        client.videos.delete(running.id)
        end = time.monotonic() + 30
        while len(bg.server.manager.free) != 1 and time.monotonic() < end:
            time.sleep(0.05)
        assert len(bg.server.manager.free) == 1 and job.status == "failed" and job.error["code"] == "cancelled"
        assert job.progress < 50
        assert [v.id for v in client.videos.list()] == []


def test_token_is_the_sdk_api_key(tmp_path):
    with BackgroundServer(tiny(tmp_path), ServeConfig(port=0, token="s3cret")) as bg:
        wrong = openai.OpenAI(base_url=bg.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.videos.create(model=SPEC, prompt="x")
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert http("GET", bg.url + "/v1/videos")[0] == 401
        client = openai.OpenAI(base_url=bg.url + "/v1", api_key="s3cret", max_retries=0)
        job = client.videos.create(model=SPEC, prompt="a fox", extra_body={"num_frames": 9})
        assert wait_status(client, job.id, ("completed", "failed")).status == "completed"
        with pytest.raises(openai.AuthenticationError):
            wrong.videos.download_content(job.id)
        assert decode_mp4(client.videos.download_content(job.id).content)[0].shape == (9, 64, 96, 3)
