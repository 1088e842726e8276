"""`fd serve`: the argparse hook and the command (the server itself lives in flashdreams_cli/serve/)."""
from __future__ import annotations

import os


def add_parser(sub, spec_args) -> None:
    p = sub.add_parser("serve", help="serve a spec interactively: WebSocket stream + browser page")
    spec_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; use a --token when widening)")
    p.add_argument("--port", type=int, default=8188, help="port (0 picks a free one)")
    p.add_argument("--token", default=os.environ.get("FD_SERVE_TOKEN"),
                   help="require this token (?token= in the URL, a Bearer header, or a first {type: auth} "
                        "message); default $FD_SERVE_TOKEN")
    p.add_argument("--max-queue", type=int, default=8, help="clients that may wait for a replica (default 8)")
    p.add_argument("--idle-timeout", type=float, default=60.0,
                   help="seconds a paused or finished session may sit before it is freed (default 60)")
    p.add_argument("--replicas", type=int, default=1, help="pipeline copies (default 1)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="sessions a replica steps together, one forward for all of them (default 8)")
    p.add_argument("--pace", choices=("realtime", "asap"), default="realtime",
                   help="generate each session at the spec's fps (realtime, default) or as fast as possible; "
                        "a client may ask for either (start options.pace)")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality 1-100 (default 85)")
    ray = p.add_argument_group("Ray Serve (pip install 'fdreams[ray]'; docs/deploy.md)")
    ray.add_argument("--ray", action="store_true",
                     help="serve through Ray Serve: replicas on the GPUs and hosts of a Ray cluster behind Ray's "
                          "HTTP proxy (--host/--port are the proxy's)")
    ray.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                     help="cluster to join (e.g. auto, or head-ip:6379); default $RAY_ADDRESS, else a local Ray")
    ray.add_argument("--autoscale", metavar="MIN:MAX",
                     help="instead of --replicas: between MIN and MAX replicas, following live + waiting sessions")
    ray.add_argument("--num-gpus", type=float, default=None,
                     help="GPUs per replica (default 1 when the cluster has GPUs, else 0); 2 or 4 for a "
                          "context-parallel spec (one host, STRICT_PACK placement group)")
    ray.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    p.add_argument("--allow-origin", dest="allow_origins", action="append", default=[], metavar="ORIGIN",
                   help="a web page origin (e.g. https://my.app) that may use the server besides its own page; "
                        "repeatable. Others are refused with 403")


def run_serve(args) -> int:
    import asyncio

    from rich.console import Console

    from engine.errors import FdError

    try:
        import prometheus_client  # noqa: F401  (the server's extra dependencies)
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise FdError(f"fd serve needs {e.name}: pip install 'fdreams[serve]'") from None
    from engine.runner import read_spec
    from .serve import ServeConfig, serve_forever
    from .serve.server import LOOPBACK

    if not 1 <= args.quality <= 100:
        raise FdError(f"--quality {args.quality}: must be 1..100")
    if args.replicas < 1 or args.max_queue < 0 or args.idle_timeout <= 0 or args.max_batch < 1:
        raise FdError("--replicas and --max-batch must be >= 1, --max-queue >= 0, --idle-timeout > 0")
    spec = read_spec(args.spec, args.overrides, args.set_files)
    console = Console(stderr=True)
    config = ServeConfig(host=args.host, port=args.port, token=args.token, max_queue=args.max_queue,
                         idle_timeout=args.idle_timeout, replicas=args.replicas, quality=args.quality,
                         max_batch=args.max_batch, pace=args.pace,
                         allow_origins=tuple(args.allow_origins))
    if args.host not in LOOPBACK and not args.token:
        console.print(f"[yellow]warning:[/] binding {args.host} without --token: anyone who can reach this "
                      "port can drive the model")

    def listening(server):
        q = f"/?token={args.token}" if args.token else "/"
        console.print(f"[green]fd serve[/] {spec.name}: http://{args.host}:{server.port}{q}  "
                      f"(warming up; /healthz turns 200 when ready)")

    if args.ray:
        return run_ray(args, spec, config, console)
    if args.autoscale:
        raise FdError("--autoscale needs --ray (one host: --replicas N)")
    try:
        asyncio.run(serve_forever(spec, config, on_listening=listening))
    except OSError as e:
        raise FdError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    except KeyboardInterrupt:
        console.print("stopped")
    return 0


def parse_autoscale(text: str | None) -> tuple[int, int] | None:
    from engine.errors import FdError

    if not text:
        return None
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise FdError(f"--autoscale {text!r}: write MIN:MAX, e.g. 1:4") from None
    if not 0 <= lo <= hi or hi < 1:
        raise FdError(f"--autoscale {text!r}: need 0 <= MIN <= MAX and MAX >= 1")
    return lo, hi


def run_ray(args, spec, config, console) -> int:
    """Deploy the spec's replicas on a Ray cluster (flashdreams_cli/serve/ray_app.py) and wait until Ctrl-C."""
    from engine.errors import FdError

    autoscale = parse_autoscale(args.autoscale)
    try:
        import ray
        from ray import serve
    except ImportError:
        raise FdError("fd serve --ray needs Ray Serve: pip install 'fdreams[ray]'") from None
    from .serve import ray_app

    # Ray's HTTP proxy reports a replica that died mid-stream to its clients; the proxy reads this when it
    # starts, so it takes effect for a Ray started here (a `ray start` cluster: export it before ray start)
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", ray_app.PROXY_CALLBACK)
    ray.init(address=args.ray_address or None)
    gpus = args.num_gpus
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    if gpus > 1:
        raise FdError(f"--num-gpus {gpus:g}: a replica spanning several GPUs (a context-parallel spec) needs one "
                      "rank per GPU, and fd serve drives one rank per replica today; see docs/deploy.md")
    bundles = None
    # the parsed spec (overrides and --set files applied) travels to the replicas: no spec file needed on them
    ray_app.run(spec, [], config, replicas=args.replicas, autoscale=autoscale, num_gpus=gpus,
                num_cpus=args.num_cpus, placement_bundles=bundles)
    scale = f"{autoscale[0]}..{autoscale[1]} replicas" if autoscale else f"{args.replicas} replica(s)"
    console.print(f"[green]fd serve --ray[/] {args.spec}: {scale}, {gpus:g} GPU each; "
                  f"http://{args.host}:{args.port}/  (OpenAI API at /v1; Ctrl-C stops)")
    import time
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        serve.shutdown()
    return 0
