"""Emu3-Gen's image decoder: the decoder of Emu3's vision tokenizer (a MoVQ-style video VQ-VAE),
codes -> pixels, built from transformers' own `Emu3VQVAE` modules (an installed dependency).

The network is transformers' (`transformers/models/emu3/modeling_emu3.py`: `Emu3VQVAEVectorQuantizer`,
`Emu3VQVAEConv3d` as `post_quant_conv`, `Emu3VQVAEDecoder`), which is a port of the release's
`Emu3VisionVQModel` (baaivision/Emu3, emu3/tokenizer/modeling_emu3visionvq.py). What is added here:

- Decoding an image the way `Emu3VQVAE.decode` (and the release's `Emu3VisionVQModel.decode`) does
  for a 3-d code tensor [N, rows, cols]: the codes become a 1-frame latent video [N, C, t=1, rows,
  cols]; `post_quant_conv` (causal 3x1x1 conv) and the decoder's temporal stack (causal 3x3x3
  resnet blocks, then log2(temporal_downsample_factor) nearest x2 temporal upsamples + causal convs)
  turn it into temporal_downsample_factor (4) frames, each decoded by the 2-d decoder
  (conv_in, middle and up blocks conditioned on the codebook vectors through SpatialNorm, norm_out,
  conv_out); the image is frame 0 (`video[:, 0]`). The 2-d decoder treats frames independently
  (they are folded into the batch), so only frame 0 is sent through it here: the same numbers for a
  quarter of the work. rows x cols codes -> (rows * 8) x (cols * 8) pixels with the release's 4-level
  `ch_mult` (spatial factor 2 ** (len(channel_multiplier) - 1), `Emu3VQVAE.spatial_scale_factor`;
  the release image processor's `spatial_factor` 8 is the same number); there is no spatial merge.
- Pixel range: the decoder's output is the normalised image in [-1, 1] (the release processor's
  `postprocess` docstring; mean = std = 0.5, `IMAGENET_STANDARD_MEAN/STD` in
  `Emu3VisionVQImageProcessor.__init__`), RGB, channels first. `postprocess` un-normalises
  ((x + 1) / 2), scales by 255, clips to [0, 255] and truncates (`astype(np.uint8)`). `decode`
  returns the output clamped to [-1, 1]; `pixels_to_uint8` is that truncating conversion.

Weight layouts read by `convert_emu3_vq`:
- the release's vision tokenizer folder (BAAI/Emu3-VisionTokenizer: config.json with model_type
  "Emu3VisionVQ" and the release's names `ch`, `ch_mult`, `z_channels`, `double_z`, ...; weights with
  the release's module names `decoder.mid.*`, `decoder.up.{i}.*`, attention blocks holding their
  own `norm` and 1x1-conv `q`/`k`/`v`/`proj_out`). transformers' converter
  (`convert_emu3_weights_to_hf.py`, KEYS_TO_MODIFY_MAPPING and `convert_state_dict_to_hf`) renames
  `mid` -> `middle_block`, `up` -> `up_block.up`, `attn_1.norm` -> `attn_norm`,
  `attn.{j}.norm` -> `attn_norms.{j}`, `q/k/v/proj_out` -> `q_proj/k_proj/v_proj/out_proj`, and
  squeezes those 1x1-conv kernels to linear weights; the same is done here (decoder side only);
- transformers' `Emu3ForConditionalGeneration` folder (config.json with a `vq_config` in
  transformers' names; VQ weights under `vqmodel.` as on the hub and as transformers 5 still saves
  them through its "emu3" conversion mapping, or `model.vqmodel.` as the module tree names them);
- a bare transformers `Emu3VQVAE` folder (model_type "emu3_vqgan", no prefix).
The output is `vq/config.json` (transformers' `Emu3VQVAEConfig` fields) and `vq/model.safetensors`
(transformers' `Emu3VQVAE` names: `quantize.embedding.weight`, `post_quant_conv.conv.*`,
`decoder.*`; encoder and `quant_conv` dropped).
"""
from __future__ import annotations

import glob
import json
import os
import re

import torch
import torch.nn as nn

from vllm_visual_ar.model_executors.chameleon_vq import VQ_CONFIG, raster_decoder, save_vq, weights_mismatch
from vllm_visual_ar.model_executors.vq import VQ_WEIGHTS

DECODER_PREFIXES = ("quantize.embedding.", "post_quant_conv.", "decoder.")
# Emu3VQVAEConfig fields (transformers' names) and the release's name for each where it differs.
HF_FIELDS = ("codebook_size", "embed_dim", "latent_channels", "double_latent", "in_channels", "out_channels",
             "temporal_downsample_factor", "base_channels", "channel_multiplier", "num_res_blocks",
             "attn_resolutions", "hidden_size", "num_attention_heads", "attention_dropout")
RELEASE_NAMES = {"latent_channels": "z_channels", "double_latent": "double_z", "base_channels": "ch",
                 "channel_multiplier": "ch_mult"}


def vq_config_from_release(cfg: dict) -> dict:
    """The release's Emu3VisionVQConfig dict -> Emu3VQVAEConfig fields. The release's attention is
    single-headed over the block's width (scale width ** -0.5); transformers' is
    `num_attention_heads` heads over `hidden_size`, the same for every attention block, so a block
    width other than base_channels * channel_multiplier[-1] cannot be represented and is refused."""
    out = {hf: cfg[RELEASE_NAMES.get(hf, hf)] for hf in HF_FIELDS if RELEASE_NAMES.get(hf, hf) in cfg}
    mult = list(out.get("channel_multiplier", [1, 2, 2, 4]))
    ch = out.get("base_channels", 256)
    width = ch * mult[-1]
    for level in cfg.get("attn_resolutions", [3]):
        if ch * mult[level] != width:
            raise ValueError(f"attention at level {level} is {ch * mult[level]} wide, not {width}: "
                             "transformers' Emu3VQVAE cannot hold it")
    out.update(hidden_size=width, num_attention_heads=1, attention_dropout=0.0)
    return out


ATTN_PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "proj_out": "out_proj"}
_RELEASE_ATTN = re.compile(r"^(decoder\.(?:mid\.attn_1|up\.\d+\.attn\.\d+))\.(norm|q|k|v|proj_out)\.(.+)$")


def rename_release_key(key: str) -> str:
    """One decoder-side key of the release's Emu3VisionVQModel -> transformers' Emu3VQVAE name."""
    m = _RELEASE_ATTN.match(key)
    if m:
        block, part, rest = m.groups()
        if part == "norm":  # the attention block's SpatialNorm moves next to it
            block = re.sub(r"\.attn_1$", ".attn_norm", block)
            block = re.sub(r"\.attn\.(\d+)$", r".attn_norms.\1", block)
        else:
            block = f"{block}.{ATTN_PROJ[part]}"
        key = f"{block}.{rest}"
    key = re.sub(r"^decoder\.mid\.", "decoder.middle_block.", key)
    return re.sub(r"^decoder\.up\.", "decoder.up_block.up.", key)


def release_to_hf_state(state: dict) -> dict:
    """Decoder side of a release state dict in transformers' names; the attention projections'
    1x1-conv kernels [C, C, 1, 1] become linear weights [C, C]."""
    out = {}
    for k, v in state.items():
        if not k.startswith(DECODER_PREFIXES):
            continue
        m = _RELEASE_ATTN.match(k)
        if m and m[2] in ATTN_PROJ and m[3] == "weight" and v.dim() == 4:
            v = v[:, :, 0, 0]
        out[rename_release_key(k)] = v
    return out


def _read_weights(src: str, wanted) -> dict[str, torch.Tensor]:
    """The tensors of a folder's *.safetensors (or, failing those, *.bin) whose names pass `wanted`;
    only those are read (an Emu3ForConditionalGeneration folder is mostly the LM)."""
    from safetensors import safe_open

    state = {}
    files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
    for path in files:
        with safe_open(path, "pt") as f:
            for k in f.keys():
                if wanted(k):
                    state[k] = f.get_tensor(k)
    if not files:
        bins = sorted(glob.glob(os.path.join(src, "*.bin")))
        if not bins:
            raise ValueError(f"no *.safetensors or *.bin weights in {src}")
        for path in bins:
            state.update({k: v for k, v in torch.load(path, map_location="cpu", weights_only=True).items()
                          if wanted(k)})
    return state


def read_emu3_vq(src: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Any of the layouts in the module docstring -> (Emu3VQVAEConfig fields, decoder-side state dict
    in transformers' Emu3VQVAE names)."""
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if "vq_config" in cfg:  # Emu3ForConditionalGeneration
        vq_cfg = {k: cfg["vq_config"][k] for k in HF_FIELDS if k in cfg["vq_config"]}
        prefix = re.compile(r"^(?:model\.)?vqmodel\.")
        state = _read_weights(src, lambda k: bool(prefix.match(k)) and prefix.sub("", k).startswith(DECODER_PREFIXES))
        state = {prefix.sub("", k): v for k, v in state.items()}
    elif cfg.get("model_type") == "emu3_vqgan":  # a bare Emu3VQVAE
        vq_cfg = {k: cfg[k] for k in HF_FIELDS if k in cfg}
        state = _read_weights(src, lambda k: k.startswith(DECODER_PREFIXES))
    elif cfg.get("model_type") == "Emu3VisionVQ" or "ch_mult" in cfg:  # the release's vision tokenizer
        vq_cfg = vq_config_from_release(cfg)
        state = release_to_hf_state(_read_weights(src, lambda k: k.startswith(DECODER_PREFIXES)))
    else:
        raise ValueError(f"{src}: neither an Emu3 vision tokenizer, an Emu3VQVAE nor an "
                         "Emu3ForConditionalGeneration folder")
    return vq_cfg, state


def _hf_config(fields: dict):
    from transformers import Emu3VQVAEConfig

    cfg = Emu3VQVAEConfig(**fields)
    cfg._attn_implementation = "sdpa"  # the modules are used outside a PreTrainedModel, which sets it
    return cfg


class Emu3ImageDecoder(nn.Module):
    """The decoding half of transformers' Emu3VQVAE (same submodule names, so its state dict keys)."""

    def __init__(self, fields: dict):
        super().__init__()
        from transformers.models.emu3.modeling_emu3 import (
            Emu3VQVAEConv3d,
            Emu3VQVAEDecoder,
            Emu3VQVAEVectorQuantizer,
        )

        cfg = _hf_config(fields)
        self.config = cfg
        self.quantize = Emu3VQVAEVectorQuantizer(cfg)
        self.post_quant_conv = Emu3VQVAEConv3d(cfg.embed_dim, cfg.latent_channels, kernel_size=(3, 1, 1),
                                               stride=(1, 1, 1))
        self.decoder = Emu3VQVAEDecoder(cfg)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config.channel_multiplier) - 1)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [N, rows, cols] -> frame 0 of the decoded video [N, 3, rows * ds, cols * ds], not
        clamped: `Emu3VQVAE.decode(codes)` (3-d codes = images) computed for frame 0 only."""
        dec = self.decoder
        quant = self.quantize.embedding(codes).permute(0, 3, 1, 2)[:, :, None]  # [N, C, t=1, rows, cols]
        z = self.post_quant_conv(quant)
        # Emu3VQVAEDecoder.forward: latents and codebook vectors go through the temporal stack together
        # (stacked on the batch axis), [N, C, T, h, w] throughout.
        both = torch.cat((z, quant), dim=0)
        for layer in dec.time_res_stack:
            both = layer(both)
        for layer in dec.time_conv:
            both = layer(both)
            both = both * torch.sigmoid(both)
        h, zq = both[:, :, 0].chunk(2, dim=0)  # frame 0: the image (`video[:, 0]`)
        h = dec.up_block(dec.middle_block(dec.conv_in(h), zq), zq)
        h = dec.norm_out(h, zq)
        return dec.conv_out(h * torch.sigmoid(h))


def load_emu3_vq(model_dir: str, device: str = "cpu") -> Emu3ImageDecoder:
    from safetensors.torch import load_file

    with open(os.path.join(model_dir, VQ_CONFIG)) as f:
        fields = json.load(f)
    with torch.device("meta"):
        model = Emu3ImageDecoder(fields)
    model.load_state_dict(load_file(os.path.join(model_dir, VQ_WEIGHTS)), strict=True, assign=True)
    return model.to(device).eval()  # eval: the temporal blocks' BatchNorm3d use their running statistics


def load_image_decoder(model_dir: str, device: str = "cpu"):
    """Emu3-Gen's decoder: codebook indices [N, rows * cols] (raster order; 0..codebook_size-1, not
    LM token ids) -> RGB [N, 3, rows * 8, cols * 8] in [-1, 1]; `grid=(rows, cols)` (Emu3 generates
    non-square images; None means square)."""
    decode = raster_decoder(load_emu3_vq(model_dir, device), device)
    decode.to_uint8 = pixels_to_uint8
    return decode


def pixels_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images [N, 3, H, W] -> uint8 [N, H, W, 3] as Emu3's processor `postprocess` makes them:
    (x + 1) / 2 * 255, clipped to [0, 255], truncated."""
    x = (images.detach().float().cpu() + 1.0) / 2.0 * 255.0
    return x.clamp(0, 255).permute(0, 2, 3, 1).to(torch.uint8)


def convert_emu3_vq(src: str, out: str) -> str:
    """An Emu3 vision tokenizer (release folder), an Emu3VQVAE folder or an
    Emu3ForConditionalGeneration folder -> `out/vq/config.json` + `out/vq/model.safetensors` (see the
    module docstring). The weights must fill the decoder exactly. Returns `out`."""
    fields, state = read_emu3_vq(src)
    with torch.device("meta"):
        expected = Emu3ImageDecoder(fields).state_dict()
    if problem := weights_mismatch(expected, state):
        raise ValueError(f"{src}: weights do not match its config: {problem}")
    save_vq(out, state, fields)
    return out
