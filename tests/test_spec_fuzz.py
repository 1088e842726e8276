"""Seeded mutations of the shipped specs through ``fd validate --json`` (spec_mutator.py). The contract: exit 0
or 2, never 1 or a traceback; on 2 every error names a file and a line (command-line overrides name themselves).
CI runs FD_FUZZ_N (default 60) cases; run a large N locally: FD_FUZZ_N=2000 python -m pytest tests/test_spec_fuzz.py
"""
from __future__ import annotations

import json
import os
import traceback

from flashdreams_cli.main import main
from spec_mutator import case

SEED = int(os.environ.get("FD_FUZZ_SEED", "20"))
N = int(os.environ.get("FD_FUZZ_N", "60"))


def judge(argv, capsys) -> str | None:
    """None when the contract holds, else why not."""
    try:
        rc = main([*argv, "--json"])
    except SystemExit as e:        # argparse: exit 2 with usage is a user error too
        return None if e.code == 2 else f"SystemExit({e.code})"
    except BaseException as e:     # noqa: BLE001 - anything escaping main() is an exit-1 bug
        return "".join(traceback.format_exception_only(e)).strip()
    out = capsys.readouterr().out
    if rc not in (0, 2):
        return f"exit {rc}"
    if rc == 0:
        return None
    doc = json.loads(out)
    errors = doc.get("errors") or [e for s in doc.get("specs", []) for e in s.get("errors", [])]
    if not errors:
        return "exit 2 without errors[]"
    for e in errors:
        if e["file"] and e["file"].startswith("<"):
            continue               # <override N: ...> / <--set N: ...> name the command-line argument
        if not e["file"] or e["line"] is None:
            return f"no file:line: {e}"
    return None


def test_mutated_shipped_specs_exit_0_or_2_with_locations(tmp_path, capsys):
    bad = []
    for i in range(N):
        what, argv = case(SEED, i, tmp_path)
        why = judge(argv, capsys)
        if why:
            bad.append(f"#{i} {what}: {why}")
    print(f"spec fuzz: seed {SEED}, {N} cases, {N - len(bad)} passed")
    assert not bad, "\n".join(bad)
