"""OpenAI-compatible video jobs next to the realtime WebSocket: ``/v1/videos``, ``/v1/videos/sync``, ``/v1/models``.

The shape follows OpenAI's Videos API (what the official ``openai`` SDK sends and parses: ``prompt, model,
seconds, size, input_reference`` as multipart form or JSON; a ``video`` job object with ``status`` in queued /
in_progress / completed / failed and ``progress`` 0-100) and vLLM-Omni's extensions where they mean something
for a spec (``width, height, num_frames, fps, num_inference_steps, seed``; ``POST /v1/videos/sync`` answers
with the MP4 bytes). One server serves one spec, so ``model`` is that spec's name (or omitted); asking for
another packaged spec is a 404 that says which one is served.

A job is an asyncio task owned by the server, not by the request that made it: it survives the client
disconnecting, waits in the same FIFO as the live sessions (``SessionManager.enqueue``; a full queue is 429),
and its MP4 is written atomically. The store is bounded: past ``max_video_jobs`` the oldest finished job is
evicted, and when every kept job is unfinished a new one is refused with 429.

Where a job runs is the ``render`` callable's business (render.py: on a local replica; ray_app.py: on
whichever Ray replica is least loaded, retried on another when one dies).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from engine.files import AtomicPath

MAX_PROMPT_CHARS = 2000
MAX_UPLOAD_BYTES = 16 << 20
MAX_SECONDS = 3600
MAX_FRAMES = 100_000
INTS = ("width", "height", "num_frames", "fps", "num_inference_steps", "seed")
FIELDS = ("prompt", "model", "seconds", "size", "input_reference", "negative_prompt") + INTS


class ApiError(Exception):
    """An OpenAI-style error: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                409: "invalid_request_error", 429: "rate_limit_error"}.get(self.status, "server_error")
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# --------------------------------------------------------------------------- what the served spec can do
@dataclass
class ServedModel:
    """The facts about the served spec a request is checked against."""
    name: str
    fps: int
    max_blocks: int
    inputs: dict[str, Any]
    frame_size: tuple[int, int] | None = None        # (width, height), known after warm-up
    block_frames: list[int] = field(default_factory=list)   # frames of blocks 0 and 1, once a job ran them
    steps: int | None = None                         # the AR sampler's denoising steps per block
    created: int = field(default_factory=lambda: int(time.time()))

    def learn(self, block: int, frames: int) -> None:
        """Streaming decoders emit fewer frames for block 0 (e.g. TAEHV: 9, then 12 per block)."""
        if block == len(self.block_frames) and block < 2:
            self.block_frames.append(frames)

    @property
    def max_frames(self) -> int | None:
        if self.max_blocks == 1 and self.block_frames:
            return self.block_frames[0]
        if len(self.block_frames) < 2:
            return None
        return self.block_frames[0] + (self.max_blocks - 1) * self.block_frames[1]


def served_model(server) -> ServedModel:
    spec = server.source.spec
    steps = None
    for ns in spec.nodes.values():
        if ns.type == "ar.sampler" and isinstance((ns.params or {}).get("steps"), (list, tuple)):
            steps = len(ns.params["steps"])
    return ServedModel(spec.name, server.source.fps, server.source.max_blocks, dict(spec.inputs), steps=steps)


def packaged_spec_names() -> list[str]:
    from importlib import resources
    return sorted(p.name[:-5] for p in resources.files("specs").iterdir() if p.name.endswith(".yaml"))


# --------------------------------------------------------------------------- one request
@dataclass
class VideoRequest:
    prompt: str | None
    seed: int | None
    num_frames: int | None          # None: the spec's whole run (num_blocks blocks)
    fps: int
    model: str

    def inputs(self) -> dict[str, Any]:
        return {k: v for k, v in (("prompt", self.prompt), ("seed", self.seed)) if v is not None}

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "seed": self.seed, "num_frames": self.num_frames, "fps": self.fps,
                "model": self.model}


def _int_field(fields: dict, name: str, lo: int, hi: int) -> int | None:
    v = fields.get(name)
    if v is None or v == "":
        return None
    try:
        n = int(v) if not isinstance(v, bool) else None
        if n is None or (isinstance(v, float) and v != n) or (isinstance(v, str) and str(n) != v.strip()):
            raise ValueError
    except (TypeError, ValueError):
        raise ApiError(400, f"{name} must be an integer, got {v!r}", name) from None
    if not lo <= n <= hi:
        raise ApiError(400, f"{name} must be in [{lo}, {hi}], got {n}", name)
    return n


def parse_request(fields: dict, model: ServedModel) -> VideoRequest:
    """Check every field against the served spec; a bad one is a 400 that names it and says what would work."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)} (accepted: {', '.join(FIELDS)})", unknown[0])
    name = fields.get("model") or model.name
    if name != model.name:
        hint = (f"start `fd serve {name}` to serve it" if name in packaged_spec_names()
                else f"packaged specs: {', '.join(packaged_spec_names())}")
        raise ApiError(404, f"model {name!r} is not served here; this server serves {model.name!r} ({hint})",
                       "model", "model_not_found")
    prompt = fields.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string", "prompt")
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise ApiError(400, f"prompt is too long ({len(prompt)} > {MAX_PROMPT_CHARS} characters)", "prompt")
    if prompt is not None and "prompt" not in model.inputs:
        raise ApiError(400, f"the spec {model.name!r} has no prompt input; omit prompt", "prompt")
    if fields.get("negative_prompt"):
        raise ApiError(400, "negative_prompt: the served spec has no negative prompt (distilled AR models "
                       "sample without classifier-free guidance)", "negative_prompt")
    if fields.get("input_reference") is not None:
        raise ApiError(400, f"input_reference: the spec {model.name!r} takes no image at run time (an "
                       "image-to-video spec sets its image when it is loaded: fd serve SPEC inputs.image=...)",
                       "input_reference")
    seed = _int_field(fields, "seed", 0, 2**63 - 1)
    if seed is not None and "seed" not in model.inputs:
        raise ApiError(400, f"the spec {model.name!r} has no seed input; omit seed", "seed")
    fps = _int_field(fields, "fps", 1, 240) or model.fps
    steps = _int_field(fields, "num_inference_steps", 1, 10_000)
    if steps is not None and model.steps is not None and steps != model.steps:
        raise ApiError(400, f"num_inference_steps={steps}: the spec {model.name!r} samples {model.steps} steps per "
                       f"block (its distilled schedule); omit it or pass {model.steps}", "num_inference_steps")
    _check_size(fields, model)
    num_frames = _int_field(fields, "num_frames", 1, MAX_FRAMES)
    seconds = fields.get("seconds")
    if seconds not in (None, ""):
        try:
            s = float(seconds)
        except (TypeError, ValueError):
            raise ApiError(400, f"seconds must be a number, got {seconds!r}", "seconds") from None
        if not 0 < s <= MAX_SECONDS:
            raise ApiError(400, f"seconds must be in (0, {MAX_SECONDS}], got {seconds!r}", "seconds")
        by_seconds = max(1, round(s * fps))
        if num_frames is not None and num_frames != by_seconds:
            raise ApiError(400, f"seconds={seconds} at fps={fps} is {by_seconds} frames but num_frames={num_frames}; "
                           "give one of them", "num_frames")
        num_frames = by_seconds
    if num_frames is not None and model.max_frames is not None and num_frames > model.max_frames:
        raise ApiError(400, f"{num_frames} frames asked for, but the spec {model.name!r} makes at most "
                       f"{model.max_frames} in its {model.max_blocks} blocks at {model.fps} fps; restart fd serve "
                       "with inputs.num_blocks=N for longer videos", "seconds")
    return VideoRequest(prompt, seed, num_frames, fps, model.name)


def _check_size(fields: dict, model: ServedModel) -> None:
    """The frame size is the spec's (its latent grid is compiled in); a request may only restate it."""
    want = None
    size = fields.get("size")
    if size not in (None, ""):
        try:
            w, h = (int(x) for x in str(size).lower().split("x"))
        except ValueError:
            raise ApiError(400, f"size must be WIDTHxHEIGHT, got {size!r}", "size") from None
        want = ("size", w, h)
    w, h = _int_field(fields, "width", 1, 16384), _int_field(fields, "height", 1, 16384)
    if w is not None or h is not None:
        if want and ((w is not None and w != want[1]) or (h is not None and h != want[2])):
            raise ApiError(400, f"size {size} disagrees with width/height {w}x{h}", "size")
        want = ("width/height", w, h)
    if want is None or model.frame_size is None:
        return
    fw, fh = model.frame_size
    if (want[1] is not None and want[1] != fw) or (want[2] is not None and want[2] != fh):
        raise ApiError(400, f"{want[0]} {want[1]}x{want[2]}: the spec {model.name!r} renders {fw}x{fh} (its latent "
                       f"size); omit {want[0]} or ask for {fw}x{fh}, or restart fd serve with other "
                       "inputs.latent_width/latent_height", want[0].split("/")[0])


async def read_fields(request: Request) -> dict:
    """JSON body or multipart/urlencoded form (the SDK sends multipart); an uploaded file becomes bytes."""
    ctype = request.headers.get("content-type", "")
    if "application/json" in ctype:
        try:
            body = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        return body
    if "multipart/form-data" in ctype or "application/x-www-form-urlencoded" in ctype:
        form = await request.form(max_files=1, max_fields=32, max_part_size=MAX_UPLOAD_BYTES)
        out: dict[str, Any] = {}
        for key, value in form.multi_items():
            out[key] = await value.read() if hasattr(value, "read") else value
        await form.close()
        return out
    raise ApiError(400, f"send JSON or multipart/form-data, not {ctype or 'no content type'!r}")


# --------------------------------------------------------------------------- jobs
STATUSES = ("queued", "in_progress", "completed", "failed")


@dataclass
class Job:
    id: str
    request: VideoRequest
    created_at: int
    status: str = "queued"
    progress: int = 0
    frames: int = 0
    size: tuple[int, int] | None = None
    completed_at: int | None = None
    error: dict | None = None
    path: Path | None = None
    queue_position: int | None = None
    task: asyncio.Task | None = None
    attempts: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: str | None = None     # why, once DELETE or a shutdown asked it to stop
    seq: int = 0                     # creation order (created_at has 1 s resolution)
    replica: str | None = None       # Ray mode: the replica running it (the last one, after a retry)

    def cancel(self, reason: str) -> None:
        """Stop the job: a queued one at once (it only holds a ticket), a running one at its next block
        boundary (a block in flight finishes first: the replica's thread is never abandoned mid-block)."""
        if self.cancelled is None:
            self.cancelled = reason
        if self.status == "queued" and self.task is not None and not self.task.done():
            self.task.cancel()

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed")

    def set_progress(self, done: int, total: int) -> None:
        self.status = "in_progress"
        self.queue_position = None
        self.progress = min(99, int(100 * done / max(1, total)))

    def object(self) -> dict:
        r = self.request
        frames = self.frames or r.num_frames
        size = self.size
        return {"id": self.id, "object": "video", "model": r.model, "status": self.status,
                "progress": self.progress, "created_at": self.created_at, "completed_at": self.completed_at,
                "expires_at": None, "prompt": r.prompt, "remixed_from_video_id": None,
                "seconds": _seconds(frames, r.fps), "size": f"{size[0]}x{size[1]}" if size else "",
                "error": self.error, "num_frames": frames, "fps": r.fps, "seed": r.seed,
                "queue_position": self.queue_position, "attempts": self.attempts, "replica": self.replica}


def _seconds(frames: int | None, fps: int) -> str:
    return "" if not frames else f"{frames / fps:g}"


class JobCancelled(Exception):
    pass


# render(job, on_progress) -> (mp4 bytes, frames, (width, height)); raises JobCancelled / ApiError / anything
Render = Callable[[Job], Awaitable[tuple[bytes, int, tuple[int, int]]]]


class VideoJobs:
    """The job store: bounded, in memory (job objects) plus a directory (their MP4s)."""

    def __init__(self, server, render: Render):
        self.server = server
        self.config = server.config
        self._render = render
        self.jobs: dict[str, Job] = {}
        self._dir: Path | None = None
        self._own_dir = False
        self._model: ServedModel | None = None
        self._seq = itertools.count()

    # ---- the served spec, learned as the server warms up and runs
    @property
    def model(self) -> ServedModel:
        if self._model is None:
            self._model = served_model(self.server)
        size = self.server.frame_size()
        if size is not None:
            self._model.frame_size = tuple(size)
        return self._model

    @property
    def directory(self) -> Path:
        if self._dir is None:
            if self.config.video_dir:
                self._dir = Path(self.config.video_dir)
                self._dir.mkdir(parents=True, exist_ok=True)
            else:
                self._dir, self._own_dir = Path(tempfile.mkdtemp(prefix="fd-serve-videos-")), True
        return self._dir

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for j in self.jobs.values():
            out[j.status] += 1
        return out

    # ---- lifecycle of a job
    def submit(self, request: VideoRequest) -> Job:
        if self.server.warmup_error:
            raise ApiError(503, self.server.warmup_error)
        busy = self.server.queue_full()
        if busy:                       # refused now, not accepted and failed later
            raise ApiError(429, busy, code="queue_full")
        self._make_room()
        job = Job(f"video_{secrets.token_hex(12)}", request, int(time.time()), seq=next(self._seq))
        self.jobs[job.id] = job
        job.task = asyncio.get_running_loop().create_task(self._run(job), name=job.id)
        return job

    def _make_room(self) -> None:
        while len(self.jobs) >= self.config.max_video_jobs:
            oldest = next((j for j in self.jobs.values() if j.finished), None)
            if oldest is None:
                raise ApiError(429, f"server busy: {len(self.jobs)} video jobs are queued or running "
                               f"(max {self.config.max_video_jobs}); retry later", code="too_many_jobs")
            self.delete(oldest.id)

    async def _run(self, job: Job) -> None:
        try:
            data, frames, size = await self._render(job)
            target = AtomicPath(self.directory / f"{job.id}.mp4")
            try:
                await asyncio.get_running_loop().run_in_executor(None, target.tmp.write_bytes, data)
                job.path = target.commit()
            except BaseException:
                target.discard()
                raise
            job.frames, job.size = frames, tuple(size)
            job.status, job.progress = "completed", 100
        except (JobCancelled, asyncio.CancelledError):
            job.status, job.error = "failed", {"code": "cancelled", "message": job.cancelled or "cancelled"}
        except ApiError as e:
            job.status, job.error = "failed", {"code": e.code or "invalid_request", "message": e.message}
        except Exception as e:  # a failing node fails this job, not the server
            job.status, job.error = "failed", {"code": "generation_failed", "message": f"{type(e).__name__}: {e}"}
        finally:
            job.queue_position = None
            job.completed_at = int(time.time())
            job.done.set()

    def get(self, video_id: str) -> Job:
        job = self.jobs.get(video_id)
        if job is None:
            raise ApiError(404, f"no video {video_id!r} (finished videos are evicted after "
                           f"{self.config.max_video_jobs} newer ones)", "video_id", "video_not_found")
        return job

    def delete(self, video_id: str) -> Job:
        """Cancel a queued or running job (it stops at the next block boundary) and forget it and its MP4."""
        job = self.get(video_id)
        job.cancel("cancelled by DELETE")
        self.jobs.pop(video_id, None)
        if job.path is not None:
            job.path.unlink(missing_ok=True)
        return job

    async def shutdown(self) -> None:
        tasks = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        for j in self.jobs.values():
            j.cancel("the server shut down")
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        if self._own_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


# --------------------------------------------------------------------------- HTTP
def video_routes(server, prefix: str = "/v1") -> list[Route]:
    """The job API's routes under ``prefix`` (``""`` where a proxy mounts the app at /v1, as Ray Serve does)."""
    jobs = server.videos

    def guarded(handler):
        async def endpoint(request: Request) -> Response:
            if not server.authorized(request):
                return ApiError(401, "unauthorized: send the server's token as a Bearer token (the SDK's api_key)",
                                code="invalid_api_key").response()
            try:
                return await handler(request)
            except ApiError as e:
                return e.response()
        return endpoint

    async def create(request: Request) -> Response:
        job = jobs.submit(parse_request(await read_fields(request), jobs.model))
        return JSONResponse(job.object())

    async def create_sync(request: Request) -> Response:
        job = jobs.submit(parse_request(await read_fields(request), jobs.model))
        await job.done.wait()
        if job.status != "completed":
            code = job.error["code"]
            status = {"generation_failed": 500, "cancelled": 409, "queue_full": 429}.get(code, 400)
            raise ApiError(status, job.error["message"], code=code)
        return FileResponse(job.path, media_type="video/mp4", headers={"X-Video-Id": job.id})

    async def retrieve(request: Request) -> Response:
        return JSONResponse(jobs.get(request.path_params["video_id"]).object())

    async def content(request: Request) -> Response:
        job = jobs.get(request.path_params["video_id"])
        variant = request.query_params.get("variant", "video")
        if variant != "video":
            raise ApiError(400, f"variant {variant!r}: only 'video' (the MP4) is served", "variant")
        if job.status != "completed" or job.path is None:
            raise ApiError(409 if not job.finished else 404,
                           f"video {job.id} is {job.status}" + (f": {job.error['message']}" if job.error else "")
                           + ("; poll GET /v1/videos/{id} until it is completed" if not job.finished else ""),
                           code="video_not_ready")
        return FileResponse(job.path, media_type="video/mp4", filename=f"{job.id}.mp4")

    async def remove(request: Request) -> Response:
        job = jobs.delete(request.path_params["video_id"])
        return JSONResponse({"id": job.id, "object": "video.deleted", "deleted": True})

    async def listing(request: Request) -> Response:
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order must be asc or desc, got {order!r}", "order")
        limit = _int_field(dict(request.query_params), "limit", 1, 100) or 20
        items = sorted(jobs.jobs.values(), key=lambda j: j.seq, reverse=order == "desc")
        after = request.query_params.get("after")
        if after:
            ids = [j.id for j in items]
            if after not in ids:
                raise ApiError(404, f"after: no video {after!r}", "after", "video_not_found")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return JSONResponse({"object": "list", "data": [j.object() for j in page],
                             "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
                             "has_more": len(items) > limit})

    async def models(request: Request) -> Response:
        m = jobs.model
        return JSONResponse({"object": "list", "data": [{"id": m.name, "object": "model", "created": m.created,
                                                         "owned_by": "fd"}]})

    async def dispatch(request: Request) -> Response:
        return await (create(request) if request.method == "POST" else listing(request))

    async def one(request: Request) -> Response:
        return await (remove(request) if request.method == "DELETE" else retrieve(request))

    return [Route(f"{prefix}/videos", guarded(dispatch), methods=["GET", "POST"]),
            Route(f"{prefix}/videos/sync", guarded(create_sync), methods=["POST"]),
            Route(f"{prefix}/videos/{{video_id}}", guarded(one), methods=["GET", "DELETE"]),
            Route(f"{prefix}/videos/{{video_id}}/content", guarded(content), methods=["GET"]),
            Route(f"{prefix}/models", guarded(models), methods=["GET"])]
