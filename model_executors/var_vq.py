"""VAR's multi-scale residual VQVAE: the tokenizer of every VAR / CoDe model.

Written from FoundationVision/VAR `models/vqvae.py::VQVAE`, `models/basic_vae.py` and
`models/quant.py::VectorQuantizer2`; module and parameter names are theirs, so the official
`vae_ch160v4096z32.pth` and a tiny MNIST tokenizer load through the same code (sizes from the `vq`
section of config.json, see `var_config.DEFAULT_VQ`).

An image is K token maps of growing side pn_0 < ... < pn_{K-1} (`patch_nums`). All of them live in
one full-resolution feature map f_hat [B, Cz, H, W] (H = W = pn_{K-1}): scale k adds
phi_k(bicubic-upsample(codebook[codes_k])) to it, and the transformer's input for scale k+1 is f_hat
area-downsampled to pn_{k+1} (`MultiScaleQuantizer.add_scale` / `next_input`).

VAR's encoder and decoder differ in detail from LlamaGen's (`vq.py`): one fused 1x1 `qkv` conv per
attention block, attention after every res block of the lowest-resolution level only (`using_sa`)
and in the middle (`using_mid_sa`), decoder levels with num_res_blocks + 1 blocks, `up` indexed by
resolution level (level 0 runs last), and 3x3 quant_conv / post_quant_conv on the Cz-dim latent.

Only torch and numpy: this module also runs where vLLM is not installed.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# The resnet block, resampling and GroupNorm are LlamaGen's (both are taming-transformers' VQGAN).
from vllm_visual_ar.model_executors.vq import VQ_WEIGHTS, Downsample, ResnetBlock, Upsample, _norm, load_vq_state_dict

# Training state of the official quantizer (per-scale EMA code usage), not a weight.
VQ_TRAINING_BUFFERS = ("quantize.ema_vocab_hit_SV",)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention; q, k, v from one 1x1 conv (channels [q | k | v])."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)
        y = F.scaled_dot_product_attention(q, k, v, scale=c ** -0.5)
        return x + self.proj_out(y.transpose(1, 2).reshape(b, c, h, w))


def _level(n_blocks: int, in_ch: int, out_ch: int, with_attn: bool) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch) for i in range(n_blocks))
    level.attn = nn.ModuleList(AttnBlock(out_ch) for _ in range(n_blocks if with_attn else 0))
    return level


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


def _mid(ch: int, with_attn: bool) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(ch, ch)
    mid.attn_1 = AttnBlock(ch) if with_attn else nn.Identity()
    mid.block_2 = ResnetBlock(ch, ch)
    return mid


class Encoder(nn.Module):
    """basic_vae.py::Encoder: levels of num_res_blocks blocks, a stride-2 conv after all but the last."""

    def __init__(self, vq: dict):
        super().__init__()
        ch, mult, n = vq["ch"], list(vq["ch_mult"]), len(vq["ch_mult"])
        self.conv_in = nn.Conv2d(vq.get("in_channels", 3), ch, 3, 1, 1)
        self.down = nn.ModuleList()
        for i, m in enumerate(mult):
            level = _level(vq["num_res_blocks"], ch * ([1] + mult)[i], ch * m,
                           with_attn=i == n - 1 and vq.get("using_sa", True))
            if i != n - 1:
                level.downsample = Downsample(ch * m)
            self.down.append(level)
        self.mid = _mid(ch * mult[-1], vq.get("using_mid_sa", True))
        self.norm_out = _norm(ch * mult[-1])
        self.conv_out = nn.Conv2d(ch * mult[-1], vq["z_channels"], 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """basic_vae.py::Decoder: `up[i]` is resolution level i (num_res_blocks + 1 blocks, then a
    nearest x2 + conv upsampler unless i == 0), run from the lowest resolution (last level) up."""

    def __init__(self, vq: dict):
        super().__init__()
        ch, mult, n = vq["ch"], list(vq["ch_mult"]), len(vq["ch_mult"])
        self.conv_in = nn.Conv2d(vq["z_channels"], ch * mult[-1], 3, 1, 1)
        self.mid = _mid(ch * mult[-1], vq.get("using_mid_sa", True))
        levels = [None] * n
        block_in = ch * mult[-1]
        for i in reversed(range(n)):
            levels[i] = _level(vq["num_res_blocks"] + 1, block_in, ch * mult[i],
                               with_attn=i == n - 1 and vq.get("using_sa", True))
            block_in = ch * mult[i]
            if i != 0:
                levels[i].upsample = Upsample(block_in)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, vq.get("in_channels", 3), 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """quant.py::Phi: phi(h) = (1 - r) h + r conv3x3(h), r = |quant_resi|."""

    def __init__(self, channels: int, quant_resi: float):
        super().__init__(channels, channels, 3, 1, 1)
        self.ratio = abs(quant_resi)

    def forward(self, h):
        return h.mul(1 - self.ratio) + super().forward(h).mul(self.ratio)


class MultiScaleQuantizer(nn.Module):
    """quant.py::VectorQuantizer2 (the VQVAE's `quantize`): one codebook for every scale, the phi
    convs (`quant_resi`) and the residual recurrence over scales.

    share_quant_resi: 0 = one phi per scale (`quant_resi.{i}`, default_qresi_counts of them, 0 = K),
    1 = one phi for all scales (`quant_resi.qresi`), n >= 2 = n phis shared along the schedule
    (`quant_resi.qresi_ls.{i}`); |quant_resi| < 1e-6 makes phi the identity (no weights).
    """

    def __init__(self, codebook_size: int, z_channels: int, patch_nums, share_quant_resi: int = 4,
                 quant_resi: float = 0.5, using_znorm: bool = False, beta: float = 0.25,
                 default_qresi_counts: int = 0):
        super().__init__()
        self.patch_nums = [int(p) for p in patch_nums]
        self.codebook_size, self.z_channels = codebook_size, z_channels
        self.share_quant_resi, self.using_znorm, self.beta = share_quant_resi, using_znorm, beta
        self.embedding = nn.Embedding(codebook_size, z_channels)

        def make():
            return Phi(z_channels, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

        if share_quant_resi == 0:
            self.num_phi = default_qresi_counts or len(self.patch_nums)
            self.quant_resi = nn.ModuleList(make() for _ in range(self.num_phi))
        elif share_quant_resi == 1:
            self.num_phi = 1
            self.quant_resi = nn.Module()
            self.quant_resi.qresi = make()
        else:
            self.num_phi = share_quant_resi
            self.quant_resi = nn.Module()
            self.quant_resi.qresi_ls = nn.ModuleList(make() for _ in range(share_quant_resi))
        self.phi_table = [self.phi_index(k) for k in range(len(self.patch_nums))]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "ema_vocab_hit_SV", None)  # official training statistic: ignored
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- the residual recurrence ---------------------------------------------------------------
    def phi_index(self, k: int) -> int:
        """Which phi conv scale k uses: the tick nearest to k / (K-1) (quant.py::PhiPartiallyShared,
        PhiNonShared). Ticks are linspace(1/(3n), 1 - 1/(3n), n) for n = 4 phis, else
        linspace(1/(2n), 1 - 1/(2n), n); computed in float64 with the first minimum winning, as theirs,
        because some scales sit exactly between two ticks (official schedule: k = 2 and 7)."""
        if self.share_quant_resi == 1:
            return 0
        n, last = self.num_phi, len(self.patch_nums) - 1
        ticks = np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n == 4 else np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)
        return int(np.argmin(np.abs(ticks - (k / last if last else 0.0))))

    def phi(self, k: int) -> nn.Module:
        if self.share_quant_resi == 1:
            return self.quant_resi.qresi
        phis = self.quant_resi if self.share_quant_resi == 0 else self.quant_resi.qresi_ls
        return phis[self.phi_table[k]]

    def scale_residual(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """h [B, Cz, pn_k, pn_k] (a scale's code vectors) -> its contribution to f_hat [B, Cz, H, W]:
        bicubic upsample (not at the last scale, which is already full size), then phi_k."""
        if k != len(self.patch_nums) - 1:
            side = self.patch_nums[-1]
            h = F.interpolate(h, size=(side, side), mode="bicubic")
        return self.phi(k)(h)

    def contribution(self, k: int, codes: torch.Tensor) -> torch.Tensor:
        """Scale k's codes [B, pn_k^2] (row-major) -> their term of f_hat [B, Cz, H, W]."""
        pn = self.patch_nums[k]
        h = self.embedding(codes).transpose(1, 2).reshape(codes.shape[0], self.z_channels, pn, pn)
        return self.scale_residual(k, h)

    def add_scale(self, k: int, f_hat: torch.Tensor | None, codes: torch.Tensor) -> torch.Tensor:
        """f_hat [B, Cz, H, W] (None = zeros) plus scale k's codes [B, pn_k^2] (row-major) -> new
        f_hat; the input is not modified (quant.py::get_next_autoregressive_input adds in place)."""
        h = self.contribution(k, codes)
        return h if f_hat is None else f_hat + h

    def next_input(self, k: int, f_hat: torch.Tensor) -> torch.Tensor:
        """The transformer's input features of scale k+1 (k < K-1): f_hat area-downsampled to
        pn_{k+1}, flattened row-major -> [B, pn_{k+1}^2, Cz]."""
        pn = self.patch_nums[k + 1]
        return F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)

    def codes_to_fhat(self, codes: list[torch.Tensor]) -> torch.Tensor:
        f_hat = None
        for k, c in enumerate(codes):
            f_hat = self.add_scale(k, f_hat, c)
        return f_hat

    def codes_to_inputs(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Codes of scales 0..m-1 (m <= K-1) -> the input features of scales 1..m, concatenated
        [B, sum pn_1..m ^2, Cz]. All K-1 first scales give the teacher-forcing input of a whole image
        (quant.py::idxBl_to_var_input); a CoDe refiner's prefix takes the drafted scales."""
        f_hat, inputs = None, []
        for k, c in enumerate(codes):
            f_hat = self.add_scale(k, f_hat, c)
            inputs.append(self.next_input(k, f_hat))
        return torch.cat(inputs, 1)

    # -- encoding and training -----------------------------------------------------------------
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, Cz] -> nearest code ids [N]: L2 distance, or cosine with using_znorm."""
        book = self.embedding.weight.detach()
        if self.using_znorm:
            return (F.normalize(z, dim=-1) @ F.normalize(book, dim=-1).T).argmax(dim=1)
        dist = z.square().sum(1, keepdim=True) + book.square().sum(1)
        return torch.addmm(dist, z, book.T, alpha=-2).argmin(dim=1)

    def _quantize(self, f: torch.Tensor):
        """The encode recurrence on f [B, Cz, H, W] (no grad into f): at each scale the residual
        f - f_hat is area-downsampled (not at the last scale) and snapped to the codebook; the scale's
        contribution (with grad into codebook and phi) is added to f_hat. -> (codes, f_hat per scale)."""
        b, c = f.shape[:2]
        rest, f_hat, codes, hats = f.detach(), None, [], []
        last = len(self.patch_nums) - 1
        for k, pn in enumerate(self.patch_nums):
            z = rest if k == last else F.interpolate(rest, size=(pn, pn), mode="area")
            idx = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, c)).view(b, pn * pn)
            h = self.contribution(k, idx)
            f_hat = h if f_hat is None else f_hat + h
            rest = rest - h.detach()
            codes.append(idx)
            hats.append(f_hat)
        return codes, hats

    def f_to_codes(self, f: torch.Tensor) -> list[torch.Tensor]:
        """quant.py::f_to_idxBl_or_fhat: features [B, Cz, H, W] -> codes per scale [B, pn_k^2]."""
        with torch.no_grad():
            return self._quantize(f)[0]

    def forward(self, f: torch.Tensor):
        """VQVAE training (quant.py::VectorQuantizer2.forward): f [B, Cz, H, W] -> (f_hat with a
        straight-through gradient to f, vq loss, codes per scale). The loss averages over scales
        beta * |sg(f_hat_k) - f|^2 + |f_hat_k - sg(f)|^2 (f_hat_k: the sum after scale k). No code
        usage statistics and no torch.distributed (theirs needs a process group)."""
        f = f.float()
        codes, hats = self._quantize(f)
        loss = sum(self.beta * F.mse_loss(h.detach(), f) + F.mse_loss(h, f.detach()) for h in hats)
        return (hats[-1].detach() - f.detach()) + f, loss / len(hats), codes


class MultiScaleVQVAE(nn.Module):
    """models/vqvae.py::VQVAE with the sizes of a `vq` dict (config.json) and a scale schedule."""

    def __init__(self, vq: dict, patch_nums):
        super().__init__()
        self.vq = dict(vq)
        self.patch_nums = [int(p) for p in patch_nums]
        self.encoder = Encoder(vq)
        self.decoder = Decoder(vq)
        self.quantize = MultiScaleQuantizer(
            vq["codebook_size"], vq["z_channels"], self.patch_nums, vq.get("share_quant_resi", 4),
            vq.get("quant_resi", 0.5), vq.get("using_znorm", False),
            default_qresi_counts=vq.get("default_qresi_counts", 0))
        cz = vq["z_channels"]
        self.quant_conv = nn.Conv2d(cz, cz, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(cz, cz, 3, 1, 1)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vq["ch_mult"]) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    @classmethod
    def from_config(cls, config) -> "MultiScaleVQVAE":
        """From a VARConfig (or anything with `vq` and `patch_nums`)."""
        return cls(config.vq, config.patch_nums)

    @classmethod
    def from_folder(cls, path: str, device="cpu") -> "MultiScaleVQVAE":
        """A converted folder's tokenizer: the `vq` section and `patch_nums` of config.json, weights
        in `vq/model.safetensors` (a subfolder: vLLM loads every *.safetensors at the top level)."""
        from safetensors.torch import load_file

        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        model = cls(cfg["vq"], cfg["patch_nums"])
        load_vq_state(model, load_file(os.path.join(path, VQ_WEIGHTS)))
        return model.to(device).eval()

    def split_codes(self, codes) -> list[torch.Tensor]:
        """A list per scale, or flat codes [B, L] in scale order -> list of [B, pn_k^2]."""
        if isinstance(codes, torch.Tensor):
            return list(codes.split([p * p for p in self.patch_nums], dim=1))
        return list(codes)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat -> image in [-1, 1] (vqvae.py::fhat_to_img)."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    @torch.no_grad()
    def encode_codes(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] [B, C, H, W] -> codes per scale [B, pn_k^2] (vqvae.py::img_to_idxBl)."""
        return self.quantize.f_to_codes(self.quant_conv(self.encoder(images)))

    @torch.no_grad()
    def decode_codes(self, codes) -> torch.Tensor:
        """Codes (a list per scale or flat [B, L]) -> images in [0, 1] [B, C, H, W], as VAR's
        autoregressive_infer_cfg returns them."""
        f_hat = self.quantize.codes_to_fhat(self.split_codes(codes))
        return self.fhat_to_img(f_hat).add(1).mul(0.5)

    def forward(self, images: torch.Tensor):
        """Training: images in [-1, 1] -> (reconstruction in [-1, 1], not clamped; vq loss)."""
        f_hat, vq_loss, _ = self.quantize(self.quant_conv(self.encoder(images)))
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss


def load_vq_state(model: MultiScaleVQVAE, state: dict) -> None:
    """Load official or converted VQVAE weights: training buffers ignored, the encoder optional
    (serving decodes only); anything else missing or unexpected is an error."""
    load_vq_state_dict(model, state, VQ_TRAINING_BUFFERS)


def scale_ends(patch_nums) -> list[int]:
    """Cumulative token counts: scale k holds flat positions [ends[k-1], ends[k])."""
    out, total = [], 0
    for p in patch_nums:
        total += p * p
        out.append(total)
    return out


def load_image_decoder(model_dir: str, device: str = "cpu"):
    """The family interface's decoder: codes [N, L] (all scales, in order) -> images [N, C, H, W]
    in [-1, 1] (VAR's fhat_to_img, clamped); `decode.preview(codes so far)` decodes the scales
    complete so far, VAR's own coarse-to-fine picture."""
    vq = MultiScaleVQVAE.from_folder(model_dir, device)
    ends = scale_ends(vq.patch_nums)

    @torch.no_grad()
    def decode(codes: torch.Tensor, grid=None) -> torch.Tensor:  # codes of every scale; grid: the last
        return vq.fhat_to_img(vq.quantize.codes_to_fhat(vq.split_codes(codes.to(device))))

    @torch.no_grad()
    def preview(codes: list[int], total: int, grid=None) -> torch.Tensor:
        done = sum(1 for e in ends if e <= len(codes))
        scales = vq.split_codes(torch.tensor([codes[: ends[-1]] + [0] * (ends[-1] - len(codes))], device=device))
        return vq.fhat_to_img(vq.quantize.codes_to_fhat(scales[: max(done, 1)]))

    def preview_marks(count: int) -> list[int]:
        """Codes after which `count` previews go out: evenly spaced scale boundaries before the last."""
        k = len(ends)
        return sorted({ends[max(0, min(k - 2, round((j + 1) * (k - 1) / (count + 1)) - 1))] for j in range(count)})

    decode.vq, decode.preview, decode.preview_marks = vq, preview, preview_marks
    return decode
