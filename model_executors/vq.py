"""LlamaGen's VQ image tokenizer (VQGAN-style encoder/decoder with an L2-normalised codebook).

Module and parameter names follow LlamaGen's `tokenizer/tokenizer_image/vq_model.py`, so the official
`vq_ds16_c2i.pt` state dict and the tiny embedded tokenizer load through the same code; only the
sizes come from `VQConfig`. The encoder is used to train the embedded tokenizer; serving needs the
decoder only (`decode_codes`).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    z_channels: int = 256
    image_channels: int = 3

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VQConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.norm2 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, c, h * w).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(y.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 2, 0)

    def forward(self, x):
        # Asymmetric (right/bottom) padding, as in taming-transformers.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _run_level(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """One resolution level: res blocks (each followed by attention at the lowest resolution),
    then the level's down- or upsampler if it has one."""
    for i, res in enumerate(block.res):
        h = res(h)
        if len(block.attn) > 0:
            h = block.attn[i](h)
    for resample in ("downsample", "upsample"):
        if hasattr(block, resample):
            h = getattr(block, resample)(h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, n_res = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        self.conv_in = nn.Conv2d(cfg.image_channels, ch, 3, 1, 1)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for level, m in enumerate(mult):
            block = nn.Module()
            block.res = nn.ModuleList()
            block.attn = nn.ModuleList()
            for _ in range(n_res):
                block.res.append(ResnetBlock(block_in, ch * m))
                block_in = ch * m
                if level == len(mult) - 1:
                    block.attn.append(AttnBlock(block_in))
            if level != len(mult) - 1:
                block.downsample = Downsample(block_in)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList(
            [ResnetBlock(block_in, block_in), AttnBlock(block_in), ResnetBlock(block_in, block_in)])
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = _run_level(block, h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, n_res = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = nn.ModuleList(
            [ResnetBlock(block_in, block_in), AttnBlock(block_in), ResnetBlock(block_in, block_in)])
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(len(mult))):
            block = nn.Module()
            block.res = nn.ModuleList()
            block.attn = nn.ModuleList()
            for _ in range(n_res + 1):
                block.res.append(ResnetBlock(block_in, ch * mult[level]))
                block_in = ch * mult[level]
                if level == len(mult) - 1:
                    block.attn.append(AttnBlock(block_in))
            if level != 0:
                block.upsample = Upsample(block_in)
            self.conv_blocks.append(block)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.image_channels, 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            h = _run_level(block, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.l2_norm = cfg.codebook_l2_norm
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def quantize(self, z: torch.Tensor):
        """z: [B, C, H, W] -> (straight-through z_q, codes [B, H, W], codebook loss, commit loss)."""
        z = z.permute(0, 2, 3, 1)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        book = self.codebook()
        dist = torch.cdist(z.reshape(-1, z.shape[-1]), book)
        codes = dist.argmin(dim=1).view(z.shape[:-1])
        z_q = book[codes]
        codebook_loss = F.mse_loss(z_q, z.detach())
        commit_loss = F.mse_loss(z, z_q.detach())
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2), codes, codebook_loss, commit_loss


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    def encode(self, images: torch.Tensor):
        return self.quantize.quantize(self.quant_conv(self.encoder(images)))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [B, H, W] int -> images [B, C, H*ds, W*ds] in [-1, 1] (not clamped)."""
        z_q = self.quantize.codebook()[codes].permute(0, 3, 1, 2)
        return self.decode(z_q)


VQ_WEIGHTS = os.path.join("vq", "model.safetensors")

# Keys in official checkpoints that are training state, not weights.
_IGNORED_KEYS = ("quantize.codebook_used",)


def load_vq(model_dir: str, device: str = "cpu") -> VQModel:
    """Load the tokenizer of a converted model folder (`vq` section of config.json, weights in
    `vq/model.safetensors`: a subfolder, because vLLM loads every *.safetensors at the top level)."""
    from safetensors.torch import load_file

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = VQConfig.from_dict(json.load(f)["vq"])
    model = VQModel(cfg)
    state = load_file(os.path.join(model_dir, VQ_WEIGHTS))
    load_vq_state_dict(model, state)
    return model.to(device).eval()


def load_image_decoder(model_dir: str, device: str = "cpu"):
    """The family interface's decoder: image codes [N, grid * grid] (raster order) -> images
    [N, C, H, W] in [-1, 1]; `decode.preview(codes so far)` draws the complete rows of a partial
    image and leaves the rest black."""
    vq = load_vq(model_dir, device)

    @torch.no_grad()
    def decode(codes: torch.Tensor, grid=None) -> torch.Tensor:  # grid: one size, always square
        grid = round(codes.shape[-1] ** 0.5)
        return vq.decode_codes(codes.view(-1, grid, grid))

    @torch.no_grad()
    def preview(codes: list[int], total: int, grid=None) -> torch.Tensor:
        grid = round(total ** 0.5)
        rows = len(codes) // grid
        known = list(codes[: rows * grid]) + [codes[0] if codes else 0] * (total - rows * grid)
        image = decode(torch.tensor([known]))
        image[:, :, rows * image.shape[2] // grid:] = -1  # rows not generated yet: black
        return image

    decode.vq, decode.preview = vq, preview  # the tokenizer itself: relaxed SJD reads its codebook
    return decode


def load_vq_state_dict(model: nn.Module, state: dict, ignored_keys=_IGNORED_KEYS) -> None:
    """A tokenizer's weights (LlamaGen's VQ, VAR's VQVAE): training state in `ignored_keys` dropped,
    the encoder optional; anything else missing or unexpected is an error."""
    state = {k: v for k, v in state.items() if k not in ignored_keys}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The encoder is optional in a serving folder (only the decoder is needed).
    missing = [k for k in missing if not k.startswith(("encoder.", "quant_conv."))]
    if missing or unexpected:
        raise ValueError(f"VQ checkpoint does not match its config: missing={missing[:5]} "
                         f"unexpected={unexpected[:5]}")


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images [B, C, H, W] -> uint8 [B, H, W, C], as LlamaGen's sample scripts save them."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu()
