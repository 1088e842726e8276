"""The config.json that sits next to a model's weights (diffusers ``save_pretrained`` folders, Wan-AI repos)."""
from __future__ import annotations

import json
from pathlib import Path


def find_config_json(ref: str, files) -> tuple[Path, dict] | None:
    """The model's config.json: next to the weights (a folder, or the folder of an index / file); for an
    hf:// file reference, its sibling config.json if the repo has one. None when there is none."""
    from . import CheckpointError, resolve
    candidates = [Path(f).parent / "config.json" for f in files[:1]]
    text = str(ref)
    if text.startswith("hf://") and text.endswith((".safetensors", ".json")) and "/" in text[5:]:
        sibling = text.rsplit("/", 1)[0] + "/config.json"
        if sibling.count("/") >= 4:   # hf://org/repo/<path>/config.json: a file inside the repo
            try:
                candidates.append(resolve(sibling, kind="file"))
            except CheckpointError:
                pass
    for c in candidates:
        if c.is_file():
            try:
                return c, json.loads(c.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{c}: not valid JSON: {e}") from e
    return None
