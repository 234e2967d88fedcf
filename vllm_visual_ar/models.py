"""Where model folders come from: an embedded model (by name; llamagen-mnist is the default), or a
converted folder the user names."""
from __future__ import annotations

import os

_EMBEDDED = os.path.join(os.path.dirname(__file__), "embedded")
EMBEDDED_MODELS = {
    "llamagen-mnist": os.path.join(_EMBEDDED, "llamagen_mnist"),  # class-to-image LlamaGen, 16x16 codes
    "var-mnist": os.path.join(_EMBEDDED, "var_mnist"),            # VAR drafter + refiner (CoDe), one VQVAE
    "t2i-mnist": os.path.join(_EMBEDDED, "t2i_mnist"),            # text-to-image, Lumina-mGPT's layout
}
EMBEDDED_MODEL_DIR = EMBEDDED_MODELS["llamagen-mnist"]


def resolve_model_dir(model: str | None) -> str:
    """Return an absolute model folder, or raise ValueError naming what is wrong with it."""
    path = os.path.abspath(EMBEDDED_MODELS.get(model or "llamagen-mnist", model or ""))
    config = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ValueError(f"model folder {model!r} does not exist (embedded models: {', '.join(EMBEDDED_MODELS)})")
    if not os.path.isfile(config):
        raise ValueError(f"model folder {model!r} has no config.json (convert a checkpoint first: "
                         "`vllm-visual-ar convert llamagen|var ...`)")
    from vllm_visual_ar.families import family_of

    try:
        family = family_of(path)
    except ValueError as e:
        raise ValueError(f"model folder {model!r}: {e}") from None
    if missing := family.missing_files(path):
        raise ValueError(f"model folder {model!r} lacks {', '.join(missing)} (its config.json calls for them)")
    return path
