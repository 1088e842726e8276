"""`fd`: run, check, draw and list declarative video-model pipelines.

Exit codes: 0 success, 2 a user error (bad spec, bad override, missing file),
1 an internal failure. User errors never print a Python traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console

EPILOG = """examples:
  fd exec preview_cpu                              run a packaged spec (writes out/preview_cpu.mp4)
  fd exec spec.yaml inputs.prompt="a red fox" --out fox.mp4
  fd exec spec.yaml nodes.decoder.type=taehv.decode  swap a node from the command line
  fd validate spec.yaml --json                     every error with file, line, column, node, field
  fd viz spec.yaml -o pipeline.svg                 draw the plan (also .html, .dot, .png)
  fd nodes ar.sampler                              a node type's ports and params
  fd plan self_forcing --device h100               memory per node and device before loading; fits?
  fd exec spec.yaml --blocks 4 --save-session s.fds   then: fd exec spec.yaml --resume s.fds inputs.prompt=...
  fd serve tiny_self_forcing                       stream to a browser at http://127.0.0.1:8188
"""


def _packaged_names() -> str:
    try:
        from engine.spec import packaged_spec_names
        return ", ".join(packaged_spec_names())
    except Exception:  # noqa: BLE001 - help text must never stop the CLI
        return "see specs/"


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="spec file, or the name of a packaged spec (" + _packaged_names() + ")")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. inputs.prompt='a cat' nodes.dit.device=cpu")
    p.add_argument("--set", dest="set_files", action="append", default=[], metavar="FILE",
                   help="merge another YAML file over the spec (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks of internal errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fd", description="fd: a declarative engine for real-time "
                                     "autoregressive video and world models.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("exec", help="run a spec end to end")
    _spec_args(p)
    p.add_argument("--out", help="send the spec's main video sink to this path")
    p.add_argument("--blocks", type=int, help="number of blocks (default: inputs.num_blocks)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--nproc", type=int, default=1, help="run on N local processes (context parallelism)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run GPU-sized models (2 GiB of weights or more) that device: auto put on the CPU")
    p.add_argument("--save-session", metavar="FILE",
                   help="after the last block, save the session (caches, RNG, block index, inputs) to FILE; "
                        "docs/sessions.md")
    p.add_argument("--resume", metavar="FILE",
                   help="continue a session saved with --save-session (same spec; inputs.X=... overrides change "
                        "its inputs, e.g. the prompt)")
    p = sub.add_parser("validate", help="check a spec (or several: fd validate a.yaml b.yaml) without loading "
                       "any weight")
    _spec_args(p)
    p.add_argument("--world-size", type=int, default=1, help="world size to check parallel groups against")
    p.add_argument("--here", action="store_true",
                   help="also ask 'can it run on this machine?': devices the spec pins that are absent are errors "
                        "(without it they are warnings)")
    p.add_argument("--no-device-check", action="store_true", help=argparse.SUPPRESS)   # the default now
    p = sub.add_parser("viz", help="draw the plan of a spec (terminal tree, or -o .svg/.html/.dot/.png)")
    _spec_args(p)
    p.add_argument("-o", "--output", help="write a drawing: .svg, .html (interactive, offline), .dot or .png (Graphviz)")
    p.add_argument("--layout", choices=("auto", "dot", "python"), default="auto",
                   help="SVG layout: Graphviz dot when installed (auto), or the pure-Python layered layout")
    p.add_argument("--run", type=int, default=0, metavar="N",
                   help="load the weights and run N blocks first, so the drawing shows per-node milliseconds")
    p = sub.add_parser("nodes", help="list node types, or describe one")
    p.add_argument("type", nargs="?", help="a node type name")
    p.add_argument("--json", action="store_true")
    p.add_argument("--debug", action="store_true")
    from . import bench as _bench
    _bench.add_parser(sub, _spec_args)
    from . import plan_cmd as _plan_cmd
    _plan_cmd.add_parser(sub, _spec_args)
    from . import serve_cmd as _serve_cmd
    _serve_cmd.add_parser(sub, _spec_args)
    return parser


def use_persistent_compile_cache() -> None:
    """torch.compile's on-disk caches (inductor FX graphs, Triton kernels) under ~/.cache/fd/inductor instead of
    torch's /tmp default, so a second start after a reboot is still warm (W1 on an H100: 18.5 s cold, 9.2 s
    warm; BENCHMARKS.md). Only the CLI does this, and only when the user has not chosen a folder."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "fd" / "inductor"))


def main(argv: list[str] | None = None) -> int:
    from engine.errors import FdError, SpecErrors

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:  # overrides written after options (`fd exec spec --quiet a.b=1`) land here
        if not hasattr(args, "overrides") or any(r.startswith("-") for r in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = list(args.overrides) + rest
    if args.command is None:
        parser.print_help()
        return 0
    use_persistent_compile_cache()
    console = Console(stderr=True, soft_wrap=True)
    try:
        return COMMANDS[args.command](args)
    except SpecErrors as e:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "errors": [x.to_json() for x in e.errors]}, indent=2))
        else:
            console.print(f"[bold red]{len(e.errors)} error(s) in the spec:[/]")
            from rich.text import Text
            for x in e.errors:
                console.print(Text("  ✗ ", style="red") + Text(str(x)), highlight=False)
        return 2
    except FdError as e:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "errors": [runtime_error_json(e)]}, indent=2))
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        if getattr(args, "debug", False):
            console.print_exception()
        else:
            console.print("[dim](run with --debug for the traceback)[/]")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; partial outputs were discarded[/]")
        return 130


def runtime_error_json(e) -> dict:
    """A runtime failure in the shape of a validation error (``errors[]`` items), so one parser reads both."""
    where = getattr(e, "where", None)
    return {"code": "runtime_error" if hasattr(e, "node") else "error", "message": str(e),
            "file": where.file if where else None, "line": where.line if where else None,
            "column": where.column if where else None, "node": getattr(e, "node", None), "field": None,
            "hint": None, "related": []}


def _split_specs(args) -> tuple[list[str], list[str]]:
    """``fd validate a.yaml b.yaml k=v``: positionals without ``=`` are more specs, not overrides."""
    specs, overrides = [args.spec], []
    for x in args.overrides:
        (overrides if "=" in x else specs).append(x)
    return specs, overrides


def cmd_validate(args) -> int:
    from engine import load_plan
    from engine.errors import SpecErrors
    from engine.validate import cpu_fallback_warnings, device_problems, unused_node_warnings

    specs, overrides = _split_specs(args)
    results, failed = [], []
    for ref in specs:
        try:
            plan = load_plan(ref, overrides, args.set_files, world_size=args.world_size, check_devices=args.here)
        except SpecErrors as e:
            failed.extend(e.errors)
            results.append({"ok": False, "spec": str(ref), "errors": [x.to_json() for x in e.errors]})
            continue
        warnings = (([] if args.here else device_problems(plan.spec)) + cpu_fallback_warnings(plan)
                    + unused_node_warnings(plan))
        results.append({"ok": True, "spec": plan.spec.file, "nodes": plan.order, "errors": [],
                        "warnings": [w.to_json() for w in warnings], "_plan": plan, "_warn": warnings})
    if len(specs) == 1 and failed:
        raise SpecErrors(failed)
    if args.json:
        clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
        print(json.dumps(clean[0] if len(clean) == 1 else {"ok": not failed, "specs": clean}, indent=2))
        return 2 if failed else 0
    out, err = Console(), Console(stderr=True, soft_wrap=True)
    from rich.text import Text
    for r in results:
        if not r["ok"]:
            err.print(f"[bold red]{len(r['errors'])} error(s) in {r['spec']}[/]")
            for x in r["errors"]:
                err.print(Text("  ✗ ", style="red") + Text(_error_line(x)), highlight=False)
            continue
        plan = r["_plan"]
        for w in r["_warn"]:
            err.print(Text("  ⚠ ", style="yellow") + Text(str(w)), highlight=False)
        out.print(f"[green]✓[/] {plan.spec.file}: {len(plan.order)} nodes "
                  f"({len(plan.session_nodes)} once per session, {len(plan.block_nodes)} per block)"
                  + (f", {len(r['_warn'])} warning(s)" if r["_warn"] else ""))
    return 2 if failed else 0


def _error_line(d: dict) -> str:
    from engine.errors import Location, Related, SpecError
    rel = tuple(Related(Location(x["file"], x["line"], x["column"]), x["why"]) for x in d.get("related", []))
    return str(SpecError(d["code"], d["message"], Location(d["file"], d["line"], d["column"]), d["node"],
                         d["field"], d["hint"], rel))


def cmd_viz(args) -> int:
    from engine import load_plan
    from engine import viz
    from engine.errors import FdError

    out = Path(args.output) if args.output else None
    if out is not None and out.suffix not in (".svg", ".html", ".dot", ".png"):
        raise FdError(f"-o {out}: unknown drawing format {out.suffix!r} (use .svg, .html, .dot or .png)")
    if out is not None and out.suffix == ".png" and not viz.dot_available():
        raise FdError(f"-o {out}: PNG needs Graphviz `dot` (apt-get install graphviz); .svg and .html do not")
    plan = load_plan(args.spec, args.overrides, args.set_files, check_devices=args.run > 0)
    timings = None
    if args.run > 0:   # per-node ms of every block, read from the block results (not from the plan)
        from engine.runner import World, open_pipeline
        timings = {}
        with open_pipeline(plan.spec, world=World()).load().open_session() as session:
            for block in session.stream(args.run):
                for name, ms in block.timings_ms.items():
                    timings.setdefault(name, []).append(ms)
    if out is None:
        Console(width=None if sys.stdout.isatty() else 100).print(viz.to_rich_tree(plan, timings))
        return 0
    from engine.files import AtomicPath
    target = AtomicPath(out)
    if out.suffix == ".png":
        target.tmp.write_bytes(viz.to_png(plan, timings))
    elif out.suffix == ".svg":
        target.tmp.write_text(viz.to_svg(plan, timings, engine=args.layout), encoding="utf-8")
    else:
        writer = {".html": viz.to_html, ".dot": viz.to_dot}[out.suffix]
        target.tmp.write_text(writer(plan, timings), encoding="utf-8")
    target.commit()
    Console(stderr=True).print(f"wrote {out}")
    return 0


def cmd_nodes(args) -> int:
    from engine import Registry
    from engine.errors import FdError

    reg = Registry.default()
    if args.type is None:
        if args.json:
            print(json.dumps({t.type_name: t.doc for t in reg}, indent=2))
            return 0
        from rich.table import Table
        table = Table("type", "phase", "description")
        for t in reg:
            table.add_row(t.type_name, "sink" if t.is_sink else t.phase, t.doc.split(". ")[0])
        Console().print(table)
        return 0
    t = reg.get(args.type)
    if t is None:
        near = reg.suggest(args.type)
        raise FdError(f"unknown node type {args.type!r}" + (f" (did you mean {', '.join(near)}?)" if near else ""))
    info = {"type": t.type_name, "doc": t.doc, "phase": t.phase, "sink": t.is_sink, "capturable": t.capturable,
            "context_parallel": t.context_parallel,
            "inputs": [{"name": p.name, "type": str(p.type), "optional": p.optional, "doc": p.doc} for p in t.inputs],
            "outputs": [{"name": p.name, "type": str(p.type), "doc": p.doc} for p in t.outputs],
            "params": [{"name": p.name, "type": p.type_name(), "required": p.required,
                        "default": None if p.required else p.default, "min": p.min, "max": p.max,
                        "choices": list(p.choices) if p.choices else None, "doc": p.doc} for p in t.params]}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    c = Console()
    c.print(f"[bold]{t.type_name}[/] ({'sink' if t.is_sink else t.phase})\n{t.doc}")
    for section in ("inputs", "outputs"):
        c.print(f"[cyan]{section}[/]")
        for p in info[section]:
            c.print(f"  {p['name']}: {p['type']}{' (optional)' if p.get('optional') else ''} — {p['doc']}")
    c.print("[cyan]params[/]")
    for p in info["params"]:
        dflt = "required" if p["required"] else f"default {p['default']!r}"
        bounds = "".join([f", >= {p['min']}" if p["min"] is not None else "",
                          f", <= {p['max']}" if p["max"] is not None else "",
                          f", one of {p['choices']}" if p["choices"] else ""])
        c.print(f"  {p['name']}: {p['type']} ({dflt}{bounds}) — {p['doc']}", highlight=False)
    return 0


def _exec_on_rank(world, argv: list[str]) -> int:
    """One local rank of ``fd exec --nproc N``: the same command line, run under RANK/WORLD_SIZE."""
    rc = main(argv)
    if rc:
        raise SystemExit(rc)
    return rc


def cmd_exec(args) -> int:
    from .run import run_exec
    return run_exec(args, rank_main=_exec_on_rank)


def cmd_bench(args) -> int:
    from .bench import run_bench
    return run_bench(args)


def cmd_plan(args) -> int:
    from .plan_cmd import run_plan
    return run_plan(args)


def cmd_serve(args) -> int:
    from .serve_cmd import run_serve
    return run_serve(args)


COMMANDS = {"plan": cmd_plan, "serve": cmd_serve, "exec": cmd_exec, "validate": cmd_validate, "viz": cmd_viz, "nodes": cmd_nodes, "bench": cmd_bench}

if __name__ == "__main__":
    sys.exit(main())
