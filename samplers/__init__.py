"""Decoding strategies. Token-by-token models (LlamaGen) take a per-request strategy (raster,
`zipar.py`, `sjd.py`); a family whose model decodes in its own order names it in its config
(`config.decoding`), and the engine asks `family_decoding` for the scheduler and runner halves."""

# config.decoding -> (scheduler side, runner side), each "module:Class" built from the model config.
FAMILY_DECODINGS = {
    "next_scale": ("vllm_visual_ar.samplers.next_scale:NextScaleScheduling",
                   "vllm_visual_ar.samplers.next_scale:NextScaleRunner"),
}


def family_decoding(config, side: int):
    """The scheduler (side 0) or runner (side 1) class of the config's own decoding order, or None."""
    name = getattr(config, "decoding", None)
    if name is None:
        return None
    from vllm_visual_ar.families import load_object

    return load_object(FAMILY_DECODINGS[name][side])
