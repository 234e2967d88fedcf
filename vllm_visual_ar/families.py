"""Model families behind one description: what the offline API, the CLI, the endpoint, the plugin
registration and the engine read about a model, instead of one family's config fields.

A family is its config class, its vLLM model class, how a guidance scale reads (which value means
unguided) and how guidance mixes logits, and its image decoder. Its decoding order is named by the config (`config.decoding`:
None = token by token, where the raster/ZipAR/SJD strategies apply; "next_scale" = VAR's one
forward per scale, `samplers/next_scale.py`). Adding a family is one entry here plus its modules in
`model_executors/`.
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass


def load_object(path: str):
    """'module:name' -> the object."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str
    model_type: str
    config_class: str      # "module:Class" (a transformers PretrainedConfig)
    model_class: str       # "module:Class" (the vLLM model), imported lazily by vLLM
    decoder_loader: str    # "module:function": model_dir -> decode(codes [N, tokens]) -> images [N, C, H, W] in [-1, 1]
    unguided_scale: float  # the guidance_scale that means "no guidance" (one stream per image)
    # "module:function" (cond, uncond, scale) -> guided logits, as the runner mixes token-by-token
    # models; None where the family's own decoding order mixes guidance itself (VAR's ramp).
    guidance_mix: str | None = None

    def config(self, model_dir: str):
        return load_object(self.config_class).from_pretrained(model_dir)

    def decoder(self, model_dir: str):
        return load_object(self.decoder_loader)(model_dir)

    def guided(self, guidance_scale: float) -> bool:
        return guidance_scale != self.unguided_scale

    def missing_files(self, model_dir: str) -> list[str]:
        """Weight files the folder's config.json calls for that are not there (a CoDe folder also
        needs its refiner's), so a broken folder is refused before an engine starts."""
        from vllm_visual_ar.model_executors.vq import VQ_WEIGHTS

        needed = ["model.safetensors", VQ_WEIGHTS, *getattr(self.config(model_dir), "extra_weight_files", ())]
        return [f for f in needed if not os.path.isfile(os.path.join(model_dir, f))]


FAMILIES = (
    Family("llamagen", "LlamaGenForClassToImage", "llamagen",
           "vllm_visual_ar.model_executors.llamagen_config:LlamaGenConfig",
           "vllm_visual_ar.model_executors.llamagen:LlamaGenForClassToImage",
           "vllm_visual_ar.model_executors.vq:load_image_decoder", unguided_scale=1.0,
           guidance_mix="vllm_visual_ar.samplers.sampling:cfg_mix"),
    # VAR's cfg t mixes (1 + t) cond - t uncond: 0 is unguided (models/var.py::autoregressive_infer_cfg).
    Family("var", "VARForClassToImage", "var",
           "vllm_visual_ar.model_executors.var_config:VARConfig",
           "vllm_visual_ar.model_executors.var:VARForClassToImage",
           "vllm_visual_ar.model_executors.var_vq:load_image_decoder", unguided_scale=0.0),
)


def family_of(config_or_dir) -> Family:
    """The family of a model config (anything with `architectures`) or of a model folder."""
    if isinstance(config_or_dir, str):
        with open(os.path.join(config_or_dir, "config.json")) as f:
            archs = json.load(f).get("architectures") or []
    else:
        archs = getattr(config_or_dir, "architectures", None) or []
    for family in FAMILIES:
        if family.architecture in archs:
            return family
    raise ValueError(f"architecture {archs[0] if archs else None!r} is not one this plugin serves "
                     f"({', '.join(f.architecture for f in FAMILIES)})")
