"""Lumina-mGPT's image decoder: Meta's Chameleon VQGAN (taming-transformers' VQModel), codes -> pixels.

Lumina-mGPT decodes generated images with Meta's own tokenizer code, not transformers' (whose
`ChameleonVQVAE` has the encoder only; transformers' and Lumina's Chameleon converters even drop the
`decoder.*` weights): `lumina_mgpt/data/item_processor.py::FlexARItemProcessor.decode_image` ->
`lumina_mgpt/model/chameleon_vae_ori/image_tokenizer.py::ImageTokenizer.pil_from_img_toks`, with the
`VQModel` of `chameleon_vae_ori/vqgan.py` built from `ckpts/chameleon/tokenizer/vqgan.yaml`
(`model.params`: `n_embed`, `embed_dim`, `ddconfig`) and the Lightning checkpoint `vqgan.ckpt`
(`torch.load(path)["state_dict"]`, loaded non-strict by `VQModel.init_from_ckpt`).

What decoding does there, and here:
- codebook lookup: `VectorQuantizer2.get_codebook_entry` is a plain `nn.Embedding` row per index
  (no l2 normalisation), viewed as [1, h, w, embed_dim] in raster order (`decode_image` passes
  h = rows, w = cols) and permuted to channels first. Its optional `remap` (an index table from the
  yaml) is not supported: a yaml that sets it is refused rather than decoded wrongly;
- `VQModel.decode`: `post_quant_conv` (1x1, embed_dim -> z_channels), then `Decoder.forward`:
  conv_in, mid (resnet, attention, resnet), the levels from the lowest resolution up, each
  `num_res_blocks + 1` resnet blocks (each followed by an attention block when the level's
  resolution is in `attn_resolutions`), a nearest x2 upsample (+ 3x3 conv when `resamp_with_conv`)
  on every level but the first, then GroupNorm(32, eps 1e-6), swish, conv_out (tanh if `tanh_out`).
  The attention placement follows their bookkeeping: the lowest level is at
  `resolution // 2 ** (len(ch_mult) - 1)`, doubled after each upsample; it depends on the yaml's
  `resolution`, not on the size of the image being decoded. The resnet blocks have no time
  embedding (temb_channels 0) and a 1x1 `nin_shortcut` where the width changes; dropout is a no-op
  in eval. These are the modules of `vq.py` (LlamaGen's tokenizer descends from the same code, with
  the same parameter names and arithmetic), so they are reused here;
- post-processing (`ImageTokenizer._pil_from_chw_tensor`): clamp to [-1, 1], (x + 1) / 2, * 255,
  `astype(np.uint8)` (truncation, not rounding), RGB. `decode` returns the clamped [-1, 1] RGB
  tensor (the plugin's convention); `pixels_to_uint8` is Lumina's exact truncating conversion.

Folder layout (`convert_chameleon_vq`): `vq/config.json` (the yaml's sizes, under the yaml's names)
and `vq/model.safetensors` with the release's own parameter names, decoder side only
(`quantize.embedding.weight`, `post_quant_conv.*`, `decoder.*`).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from vllm_visual_ar.model_executors.vq import VQ_WEIGHTS, AttnBlock, ResnetBlock, _norm

VQ_CONFIG = os.path.join("vq", "config.json")
DECODER_PREFIXES = ("quantize.embedding.", "post_quant_conv.", "decoder.")


@dataclass
class ChameleonVQConfig:
    """The decoder side of Chameleon's vqgan.yaml (`model.params`, `ddconfig` flattened). The
    defaults are transformers' `ChameleonVQVAEConfig` defaults (8192 x 256 codebook, ch 128,
    ch_mult 1,1,2,2,4, 2 res blocks, no attention resolutions, resolution 512, z 256), which its
    converter fills from Meta's vqgan.yaml; the converter here always reads the yaml itself."""
    n_embed: int = 8192
    embed_dim: int = 256
    z_channels: int = 256
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)
    resolution: int = 512
    out_ch: int = 3
    resamp_with_conv: bool = True
    attn_type: str = "vanilla"  # or "none" (an identity); taming's "linear" is refused by their make_attn too
    tanh_out: bool = False

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ChameleonVQConfig":
        cfg = cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        cfg.ch_mult, cfg.attn_resolutions = list(cfg.ch_mult), list(cfg.attn_resolutions or [])
        if cfg.attn_type not in ("vanilla", "none"):
            raise ValueError(f"attn_type {cfg.attn_type!r} is not supported (vanilla or none)")
        return cfg

    @classmethod
    def from_yaml(cls, path: str) -> "ChameleonVQConfig":
        import yaml

        with open(path) as f:
            params = yaml.safe_load(f)["model"]["params"]
        dd = dict(params.get("ddconfig") or {})
        if params.get("remap") is not None:
            raise ValueError("vqgan.yaml sets `remap` (an index remapping Chameleon does not use); not supported")
        if dd.get("give_pre_end"):
            raise ValueError("vqgan.yaml sets give_pre_end: the decoder would not produce pixels")
        if dd.get("use_linear_attn"):
            dd["attn_type"] = "linear"  # as their Decoder.__init__ does; refused by from_dict
        return cls.from_dict({**dd, "n_embed": params["n_embed"], "embed_dim": params["embed_dim"]})


class _Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv when `with_conv` (taming's Upsample)."""

    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


def _attn(ch: int, cfg: ChameleonVQConfig) -> nn.Module:
    return AttnBlock(ch) if cfg.attn_type == "vanilla" else nn.Identity()


class ChameleonDecoder(nn.Module):
    """taming's `Decoder`, module names kept (`mid.block_1`, `up.{level}.block.{i}`, ...)."""

    def __init__(self, cfg: ChameleonVQConfig):
        super().__init__()
        levels = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = _attn(block_in, cfg)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        up = [None] * levels
        for level in reversed(range(levels)):  # lowest resolution first, as the forward runs
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, cfg.ch * cfg.ch_mult[level]))
                block_in = cfg.ch * cfg.ch_mult[level]
                if res in cfg.attn_resolutions:
                    stage.attn.append(_attn(block_in, cfg))
            if level != 0:
                stage.upsample = _Upsample(block_in, cfg.resamp_with_conv)
                res *= 2
            up[level] = stage
        self.up = nn.ModuleList(up)  # indexed by level, as theirs (`self.up.insert(0, up)`)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, 1, 1)
        self.tanh_out = cfg.tanh_out

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != 0:
                h = stage.upsample(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


class ChameleonVQDecoder(nn.Module):
    """The decoding half of Chameleon's VQModel (names as in the release state dict)."""

    def __init__(self, cfg: ChameleonVQConfig):
        super().__init__()
        self.config = cfg
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(cfg.n_embed, cfg.embed_dim)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = ChameleonDecoder(cfg)

    def codebook_entries(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [N, rows, cols] -> quantized latents [N, embed_dim, rows, cols]."""
        return self.quantize.embedding(codes).permute(0, 3, 1, 2)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [N, rows, cols] -> decoder output [N, out_ch, rows * ds, cols * ds], not clamped."""
        return self.decoder(self.post_quant_conv(self.codebook_entries(codes)))


def load_chameleon_vq(model_dir: str, device: str = "cpu") -> ChameleonVQDecoder:
    from safetensors.torch import load_file

    with open(os.path.join(model_dir, VQ_CONFIG)) as f:
        cfg = ChameleonVQConfig.from_dict(json.load(f))
    with torch.device("meta"):
        model = ChameleonVQDecoder(cfg)
    model.load_state_dict(load_file(os.path.join(model_dir, VQ_WEIGHTS)), strict=True, assign=True)
    return model.to(device).eval()


def grid_of(num_codes: int, grid) -> tuple[int, int]:
    """(rows, cols): as given (checked against the code count), or a square."""
    if grid is None:
        side = round(num_codes ** 0.5)
        grid = (side, side)
    rows, cols = int(grid[0]), int(grid[1])
    if rows * cols != num_codes:
        raise ValueError(f"{num_codes} codes do not fill a {rows} x {cols} grid")
    return rows, cols


def raster_decoder(vq: nn.Module, device: str):
    """The family interface over a `decode_codes(codes [N, rows, cols])` module: `decode(codes
    [N, rows * cols] raster order, grid=(rows, cols) or None for a square) -> [N, 3, H, W]` clamped to
    [-1, 1], and `decode.preview(codes so far, total, grid)`: the complete rows, the rest black."""

    @torch.no_grad()
    def decode(codes: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        codes = torch.as_tensor(codes).to(device=device, dtype=torch.long)
        rows, cols = grid_of(codes.shape[-1], grid)
        return vq.decode_codes(codes.reshape(-1, rows, cols)).clamp(-1, 1)

    @torch.no_grad()
    def preview(codes: list[int], total: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
        rows, cols = grid_of(total, grid)
        done = len(codes) // cols
        known = list(codes[: done * cols]) + [codes[0] if codes else 0] * (total - done * cols)
        image = decode(torch.tensor([known]), (rows, cols))
        image[:, :, done * image.shape[2] // rows:] = -1  # rows not generated yet: black
        return image

    decode.vq, decode.preview = vq, preview
    return decode


def load_image_decoder(model_dir: str, device: str = "cpu"):
    """Lumina-mGPT's decoder: codebook indices [N, rows * cols] (raster order; 0..n_embed-1, not
    LM token ids) -> RGB [N, 3, rows * 16, cols * 16] in [-1, 1] for Chameleon's tokenizer."""
    decode = raster_decoder(load_chameleon_vq(model_dir, device), device)
    decode.to_uint8 = pixels_to_uint8
    return decode


def pixels_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images [N, 3, H, W] -> uint8 [N, H, W, 3] as Lumina-mGPT saves them
    (`ImageTokenizer._pil_from_chw_tensor`: clamp, (x + 1) / 2, * 255, truncated)."""
    x = (images.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) / 2.0
    return (x.permute(0, 2, 3, 1) * 255).to(torch.uint8)


# -- conversion -----------------------------------------------------------------------------------
def weights_mismatch(expected: dict, state: dict) -> str | None:
    """How a state dict fails to fill a module's (`expected`) exactly, or None."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        return f"missing={missing[:5]} unexpected={unexpected[:5]} wrong shapes={wrong[:5]}"
    return None


def save_vq(out: str, state: dict, config: dict) -> None:
    """A decoder's weights and config under out/vq/, as the families' decoder loaders read them."""
    from safetensors.torch import save_file

    os.makedirs(os.path.join(out, "vq"), exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, VQ_WEIGHTS))
    with open(os.path.join(out, VQ_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def _load_release_ckpt(path: str, trust_pickle: bool) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # a Lightning checkpoint may pickle more than tensors
        if trust_pickle:
            raise
        raise ValueError(f"{path} does not load with weights_only=True ({type(e).__name__}: {e}); if "
                         "it comes from a source you trust, convert with trust_pickle=True") from e
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a Lightning checkpoint {{'state_dict': ...}} or a state dict")
    return state


def convert_chameleon_vq(ckpt_path: str, yaml_path: str, out: str, trust_pickle: bool = False) -> str:
    """Chameleon's `tokenizer/vqgan.ckpt` + `tokenizer/vqgan.yaml` -> `out/vq/config.json` and
    `out/vq/model.safetensors` (decoder side, release names). The weights must fit the yaml exactly
    (every decoder parameter present, shapes equal); the encoder, `quant_conv` and the training
    loss's weights are dropped. Returns `out`."""
    cfg = ChameleonVQConfig.from_yaml(yaml_path)
    state = _load_release_ckpt(ckpt_path, trust_pickle)
    kept = {k: v.contiguous() for k, v in state.items() if k.startswith(DECODER_PREFIXES)}
    with torch.device("meta"):
        model = ChameleonVQDecoder(cfg)
    if problem := weights_mismatch(model.state_dict(), kept):
        raise ValueError(f"{ckpt_path} does not match {yaml_path}: {problem}")
    save_vq(out, kept, cfg.to_dict())
    return out
