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
    p.add_argument("--allow-origin", dest="allow_origins", action="append", default=[], metavar="ORIGIN",
                   help="a web page origin (e.g. https://my.app) that may use the server besides its own page; "
                        "repeatable. Others are refused with 403")


def run_serve(args) -> int:
    import asyncio

    from rich.console import Console

    from engine.errors import FdError

    try:
        import aiohttp  # noqa: F401  (the server's only extra dependency)
    except ImportError:
        raise FdError("fd serve needs aiohttp: pip install 'fdreams[serve]'") from None
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

    try:
        asyncio.run(serve_forever(spec, config, on_listening=listening))
    except OSError as e:
        raise FdError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    except KeyboardInterrupt:
        console.print("stopped")
    return 0
