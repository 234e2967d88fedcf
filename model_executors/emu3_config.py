"""Config for Emu3's original release folders (BAAI/Emu3-Gen and siblings), read without remote code.

Their config.json names `model_type: "Emu3"` and an `auto_map` into the release's own
`configuration_emu3.Emu3Config` (baaivision/Emu3, emu3/mllm/configuration_emu3.py). That class is a
flat Llama-style config: vocab_size, hidden_size, intermediate_size, num_hidden_layers,
num_attention_heads, num_key_value_heads, hidden_act, max_position_embeddings, rms_norm_eps,
rope_theta, rope_scaling ({"type": "linear"|"dynamic", "factor": float} or null),
attention_dropout, tie_word_embeddings, plus Emu3's special token ids (img/boi/eoi/eol/eof) and
image_area. transformers' `Emu3TextConfig` holds the same fields under the same names (the LM part of
HF's converted layout) and turns the legacy rope_theta/rope_scaling pair into `rope_parameters`,
keeping unknown keys (the token ids, image_area, pretraining_tp) as attributes. So the only thing
missing is the model_type key: registering this subclass under "Emu3" with `AutoConfig.register`
makes transformers treat the folder as local code and ignore its auto_map, no trust_remote_code.
"""
from transformers import Emu3TextConfig


class Emu3GenConfig(Emu3TextConfig):
    model_type = "Emu3"
