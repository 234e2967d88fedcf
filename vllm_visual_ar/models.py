"""Where model folders come from: the embedded default, or a converted folder the user names."""
from __future__ import annotations

import json
import os

EMBEDDED_MODEL_DIR = os.path.join(os.path.dirname(__file__), "embedded", "llamagen_mnist")


def resolve_model_dir(model: str | None) -> str:
    """Return an absolute model folder, or raise ValueError naming what is wrong with it."""
    path = os.path.abspath(model or EMBEDDED_MODEL_DIR)
    config = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ValueError(f"model folder {model!r} does not exist")
    if not os.path.isfile(config):
        raise ValueError(f"model folder {model!r} has no config.json (convert a checkpoint first: "
                         "`vllm-visual-ar convert llamagen ...`)")
    with open(config) as f:
        arch = (json.load(f).get("architectures") or [None])[0]
    from vllm_visual_ar.model_executors.llamagen_config import ARCHITECTURE
    if arch != ARCHITECTURE:
        raise ValueError(f"model folder {model!r} holds architecture {arch!r}; this plugin serves {ARCHITECTURE!r}")
    return path
