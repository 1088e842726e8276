"""Turn a checkpoint reference from a spec into a local path.

References:
  hf://org/repo/path/in/repo          one file of a Hugging Face model repo
  hf://org/repo/path/in/repo@rev      ... at a branch, tag or commit (rev may hold '/': refs/pr/1)
  hf://org/repo@rev/path/in/repo      ... same, revision after the repo name (rev without '/')
  hf://org/repo  /  hf://org/repo/sub  a whole snapshot / one folder of it (kind="folder")
  hf://datasets/org/repo/...          a dataset repo (likewise spaces/)
  /abs/path, rel/path, ~/path         a local file or folder

Downloads go to the Hugging Face cache (HF_HOME / HF_HUB_CACHE, read at call
time). Offline (HF_HUB_OFFLINE=1, or no network) only the cache is used, and a
missing file is reported with the exact ``hf download`` command that fetches it.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from . import CheckpointError

HF_SCHEME = "hf://"
_REPO_TYPES = {"datasets": "dataset", "spaces": "space", "models": "model"}


@dataclass(frozen=True)
class HfRef:
    repo_id: str
    path: str              # inside the repo; "" for the whole repo
    revision: str | None
    repo_type: str = "model"

    def download_command(self, kind: str = "file") -> str:
        """The CLI call that puts this file (or folder) into the Hugging Face cache."""
        parts = ["hf", "download", self.repo_id]
        if self.path:
            parts.append(self.path if kind == "file" else f"--include '{self.path}/*'")
        if self.repo_type != "model":
            parts += ["--repo-type", self.repo_type]
        if self.revision:
            parts += ["--revision", self.revision]
        return " ".join(parts)

    def __str__(self) -> str:
        kind = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return f"{HF_SCHEME}{kind}{self.repo_id}" + (f"/{self.path}" if self.path else "") + (
            f"@{self.revision}" if self.revision else "")


def parse_hf_ref(ref: str) -> HfRef:
    """Split ``hf://[datasets/]org/repo[@rev][/path][@rev]`` into its parts."""
    if not ref.startswith(HF_SCHEME):
        raise CheckpointError(f"{ref!r} is not an hf:// reference")
    body = ref[len(HF_SCHEME):].strip("/")
    repo_type = "model"
    first, _, rest = body.partition("/")
    if first in _REPO_TYPES:
        repo_type, body = _REPO_TYPES[first], rest
    parts = body.split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise CheckpointError(f"{ref!r}: expected hf://org/repo[/path/in/repo][@revision]")
    org, repo = parts[0], parts[1]
    path = parts[2] if len(parts) > 2 else ""
    revision = None
    if "@" in repo:                                   # hf://org/repo@rev/path
        repo, revision = repo.split("@", 1)
    elif "@" in path:                                 # hf://org/repo/path@rev
        path, revision = path.rsplit("@", 1)
    if not revision and "@" in ref[len(HF_SCHEME):]:
        raise CheckpointError(f"{ref!r}: empty revision after '@'")
    return HfRef(f"{org}/{repo}", path.strip("/"), revision, repo_type)


def offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub itself reads it once, at import)."""
    from huggingface_hub import constants
    env = os.environ.get("HF_HUB_OFFLINE")
    if env is not None:
        return env.strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path | None:
    """The hub cache the environment names now, or None for huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return None


def resolve(ref: str | os.PathLike, *, kind: str = "file") -> Path:
    """The local path of ``ref`` (downloading from the Hub when allowed); ``kind`` is "file" or "folder"."""
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    text = os.fspath(ref)
    if text.startswith(HF_SCHEME):
        return _resolve_hf(parse_hf_ref(text), kind)
    return _resolve_local(Path(text).expanduser(), kind)


def _resolve_hf(ref: HfRef, kind: str) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub import errors as hf_errors

    is_offline = offline()
    common = dict(repo_id=ref.repo_id, repo_type=ref.repo_type, revision=ref.revision,
                  cache_dir=hub_cache_dir(), local_files_only=is_offline)
    try:
        if kind == "file":
            if not ref.path:
                raise CheckpointError(f"{ref}: names a whole repo, but a file is needed "
                                      f"(hf://{ref.repo_id}/<file in repo>)")
            return Path(hf_hub_download(filename=ref.path, **common))
        patterns = [f"{ref.path}/*"] if ref.path else None
        root = Path(snapshot_download(allow_patterns=patterns, **common))
        folder = root / ref.path if ref.path else root
        if not folder.is_dir():
            raise CheckpointError(f"{ref}: the snapshot of {ref.repo_id} has no folder {ref.path!r}")
        return folder
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as e:
        raise CheckpointError(_not_cached_message(ref, kind, is_offline)) from e
    except hf_errors.GatedRepoError as e:
        raise CheckpointError(_gated_message(ref, kind)) from e
    except hf_errors.RepositoryNotFoundError as e:
        raise CheckpointError(f"{ref}: repo {ref.repo_id!r} ({ref.repo_type}) does not exist "
                              "or is private (log in with `hf auth login`)") from e
    except hf_errors.RevisionNotFoundError as e:
        raise CheckpointError(f"{ref}: repo {ref.repo_id} has no revision {ref.revision!r}") from e
    except hf_errors.EntryNotFoundError as e:
        raise CheckpointError(f"{ref}: repo {ref.repo_id} has no file {ref.path!r}"
                              + (f" at revision {ref.revision}" if ref.revision else "")) from e
    except hf_errors.HfHubHTTPError as e:
        # a gated repo answers 401 (not logged in) or 403 (licence not accepted / token without access)
        # without always being recognised as gated
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise CheckpointError(_gated_message(ref, kind, status)) from e
        raise


def _gated_message(ref: HfRef, kind: str, status: int | None = None) -> str:
    why = f"the Hub answered {status} for" if status else "gated:"
    return (f"{ref}: {why} {ref.repo_id}; accept its licence on https://huggingface.co/{ref.repo_id} "
            "and log in with a token that may read it (`hf auth login` / `huggingface-cli login`, or set "
            f"HF_TOKEN), then: {ref.download_command(kind)}")


def _not_cached_message(ref: HfRef, kind: str, is_offline: bool) -> str:
    what = f"file {ref.path!r}" if kind == "file" else (
        f"folder {ref.path!r}" if ref.path else "snapshot")
    cache = f"the cache {hub_cache_dir()}" if hub_cache_dir() else "the default Hugging Face cache (~/.cache/huggingface/hub)"
    why = ("offline mode is on (HF_HUB_OFFLINE=1)" if is_offline
           else "the Hub could not be reached")
    return (f"{ref}: {what} of repo {ref.repo_id}"
            + (f" at revision {ref.revision}" if ref.revision else "")
            + f" is not in {cache} and {why}.\n"
            f"  Get it on a machine with network (same HF_HOME): {ref.download_command(kind)}\n"
            f"  or download it anywhere with --local-dir DIR and put the local path in the spec"
            + ("; unset HF_HUB_OFFLINE to let fd download it." if is_offline else "."))


def _resolve_local(path: Path, kind: str) -> Path:
    if kind == "file" and path.is_file():
        return path
    if kind == "folder" and path.is_dir():
        return path
    if path.exists():
        want, got = ("a file", "a folder") if kind == "file" else ("a folder", "a file")
        raise CheckpointError(f"{path}: expected {want}, found {got}")
    raise CheckpointError(_missing_local_message(path))


def _missing_local_message(path: Path) -> str:
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    if parent != path.parent:
        return f"{path}: not found (folder {path.parent} does not exist; nearest existing: {parent})"
    entries = sorted(p.name for p in parent.iterdir())
    close = difflib.get_close_matches(path.name, entries, n=5, cutoff=0.4)
    if close:
        return f"{path}: not found; closest in {parent}: {', '.join(close)}"
    shown = ", ".join(entries[:10]) + (f", ... ({len(entries)} entries)" if len(entries) > 10 else "")
    return f"{path}: not found; {parent} holds: {shown or '(empty)'}"
