"""Atomic outputs: write under a temporary name beside the target, rename into place on success.

A crash or an aborted session leaves no half-written file under the final name;
``os.replace`` is atomic on one filesystem, which a sibling temp name guarantees.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


class AtomicPath:
    def __init__(self, final: str | os.PathLike, directory: bool = False):
        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{self.final.name}.partial-"
        if directory:
            self.tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=self.final.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=self.final.suffix, dir=self.final.parent)
            os.close(fd)
            self.tmp = Path(name)
        self.directory = directory

    def commit(self) -> Path:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, (0o777 if self.directory else 0o666) & ~umask)  # mkstemp/mkdtemp made it private
        if self.directory and self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        return self.final

    def discard(self) -> None:
        if self.directory:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            self.tmp.unlink(missing_ok=True)
