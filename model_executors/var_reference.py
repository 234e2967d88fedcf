"""Plain-PyTorch VAR transformer and its next-scale loops (VAR, CoDe): the test oracle.

Written independently of the vLLM model class (`var.py`), from FoundationVision/VAR
`models/var.py::VAR`, `models/basic_var.py` and czg1225/CoDe `models/var.py`: a concatenating KV
cache and explicit boolean masks. Parameter names are VAR's, so a converted folder's weights (or an
official state dict without its buffers) load as they are.

Token layout: flat positions [0, L) run scale by scale (row-major inside a scale); position
range [ends[k-1], ends[k]) holds scale k. Position i's input predicts position i's code: the
first_l = pn_0^2 inputs are the class embedding + `pos_start`, the inputs of scale k >= 1 are
`word_embed` of continuous features computed from the codes of scales < k (`var_vq.py`), never
token embeddings. Every input also gets `lvl_embed[scale] + pos_1LC[position]`.

Only torch (and `samplers/next_scale.py`, plain torch): this module also runs without vLLM.
"""
from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from vllm_visual_ar.model_executors.var_vq import MultiScaleVQVAE, scale_ends
from vllm_visual_ar.samplers.next_scale import guide, sample_scale

# Upper clamp of the learned attention scale (basic_var.py::SelfAttention, log(100) taken in float32).
MAX_SCALE_MUL = torch.tensor(100.0).log().item()


def _linear32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), layer.weight.float(), layer.bias.float())


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim = cfg.embed_dim
        self.num_heads, self.head_dim, self.l2_norm = cfg.num_heads, dim // cfg.num_heads, cfg.attn_l2_norm
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))  # k has no bias (VAR's zero_k_bias buffer)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        if self.l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, self.num_heads, 1, 1), 4.0).log())
        self.proj = nn.Linear(dim, dim)
        self.k_cache: torch.Tensor | None = None  # [B, H, cached, D]: the l2-normalised keys
        self.v_cache: torch.Tensor | None = None

    def forward(self, x, mask, cache: bool):
        b, s, dim = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x, self.mat_qkv.weight, bias).view(b, s, 3, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4)
        if self.l2_norm:  # cosine attention with a learned per-head temperature, softmax scale 1
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp(max=MAX_SCALE_MUL).exp())
            k = F.normalize(k, dim=-1)
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(self.head_dim)
        if cache:
            if self.k_cache is not None:
                k, v = torch.cat([self.k_cache, k], 2), torch.cat([self.v_cache, v], 2)
            self.k_cache, self.v_cache = k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return self.proj(y.transpose(1, 2).reshape(b, s, dim))


class FFN(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = round(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    """One block. Its six modulation vectors come from the class embedding (one per sequence), in
    the order gamma1, gamma2, scale1, scale2, shift1, shift2 (basic_var.py::AdaLNSelfAttn)."""

    def __init__(self, cfg):
        super().__init__()
        self.dim, self.eps, self.shared = cfg.embed_dim, cfg.norm_eps, cfg.shared_aln
        self.attn = SelfAttention(cfg)
        self.ffn = FFN(cfg)
        if self.shared:  # d36: one shared_ada_lin for the model plus a learned offset per block
            self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, self.dim))
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(self.dim, 6 * self.dim))

    def forward(self, x, ada, mask, cache: bool):
        """ada: the class embedding [B, C], or shared_ada_lin's output [B, 1, 6, C] when shared."""
        if self.shared:
            g1, g2, s1, s2, b1, b2 = (self.ada_gss + ada).unbind(2)
        else:
            g1, g2, s1, s2, b1, b2 = self.ada_lin(ada).view(-1, 1, 6, self.dim).unbind(2)
        ln = F.layer_norm(x, (self.dim,), eps=self.eps)
        x = x + self.attn(ln * (s1 + 1) + b1, mask, cache) * g1
        ln = F.layer_norm(x, (self.dim,), eps=self.eps)
        return x + self.ffn(ln * (s2 + 1) + b2) * g2


class AdaLNBeforeHead(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dim, self.eps = cfg.embed_dim, cfg.norm_eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(self.dim, 2 * self.dim))

    def forward(self, x, cond):  # in float32, as VAR.get_logits
        scale, shift = _linear32(self.ada_lin[1], F.silu(cond.float())).view(-1, 1, 2, self.dim).unbind(2)
        return F.layer_norm(x.float(), (self.dim,), eps=self.eps) * (scale + 1) + shift


class VARReference(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_nums = [int(p) for p in config.patch_nums]
        self.ends = scale_ends(self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.word_embed = nn.Linear(config.vq["z_channels"], dim)
        self.class_emb = nn.Embedding(config.num_classes + 1, dim)  # row num_classes: the null class
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, dim))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.ends[-1], dim))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), dim)
        if config.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(AdaLNSelfAttn(config) for _ in range(config.depth))
        self.head_nm = AdaLNBeforeHead(config)
        self.head = nn.Linear(dim, config.vq["codebook_size"])
        scale_of = torch.cat([torch.full((p * p,), k) for k, p in enumerate(self.patch_nums)])
        self.register_buffer("lvl_1L", scale_of, persistent=False)

    # -- pieces ----------------------------------------------------------------------------------
    def block_causal_mask(self, n: int) -> torch.Tensor:
        """[n, n] bool, True = visible: a position sees every position of its own and earlier scales
        (VAR's attn_bias_for_masking)."""
        lvl = self.lvl_1L[:n]
        return lvl[:, None] >= lvl[None, :]

    def embed(self, cond: torch.Tensor, features: torch.Tensor | None, begin: int) -> torch.Tensor:
        """Inputs of flat positions [begin, end) -> [B, end - begin, C]. begin == 0 starts with the
        class token rows (cond [B, C] + pos_start); `features` [B, n, Cz] are the continuous inputs of
        the next n positions (>= first_l), from `MultiScaleQuantizer.next_input` / `codes_to_inputs`."""
        parts = [cond[:, None].expand(-1, self.first_l, -1) + self.pos_start] if begin == 0 else []
        if features is not None:
            parts.append(self.word_embed(features.to(self.word_embed.weight.dtype)))
        x = torch.cat(parts, 1)
        end = begin + x.shape[1]
        return x + (self.lvl_embed(self.lvl_1L[begin:end]) + self.pos_1LC[0, begin:end])

    def _run(self, x, cond, mask, cache: bool) -> torch.Tensor:
        ada = self.shared_ada_lin(cond).view(-1, 1, 6, self.config.embed_dim) if self.config.shared_aln else cond
        for block in self.blocks:
            x = block(x, ada, mask, cache)
        return _linear32(self.head, self.head_nm(x, cond))

    # -- teacher forcing (training, and the logits oracle) ---------------------------------------
    def forward(self, class_ids: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """class_ids [B] (num_classes = null; class dropout is the caller's), inputs [B, L - first_l, Cz]
        (`codes_to_inputs` of scales 0..K-2) -> logits [B, L, V] float32, block-causal mask."""
        cond = self.class_emb(class_ids)
        x = self.embed(cond, inputs, 0)
        return self._run(x, cond, self.block_causal_mask(x.shape[1]), cache=False)

    # -- KV-cached inference ---------------------------------------------------------------------
    def reset_cache(self):
        for block in self.blocks:
            block.attn.k_cache = block.attn.v_cache = None

    def step(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded inputs x [B, S, C] (`embed`), class embeddings cond [B, C] -> logits [B, S, V].
        The inputs' keys/values are appended to the cache. mask None: every input sees the whole
        cache and the whole chunk (VAR's inference passes no mask: a chunk is one scale, so this is
        the block-causal rule); else mask [S, cached + S] (True = visible)."""
        return self._run(x, cond, mask, cache=True)

    @torch.no_grad()
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02):
        """VAR.init_weights with init_std = sqrt(1 / 3C) ("auto", as build_vae_var): the residual
        branches start almost closed (gamma rows x init_adaln_gamma). For training from scratch."""
        dim, depth = self.config.embed_dim, self.config.depth
        std = (1 / dim / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        self.head.weight.mul_(init_head)
        self.head_nm.ada_lin[1].weight.mul_(init_adaln)
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            block.attn.q_bias.zero_()
            block.attn.v_bias.zero_()
            if block.attn.l2_norm:
                block.attn.scale_mul_1H11.fill_(math.log(4.0))
            if block.shared:
                block.ada_gss.normal_(0, dim ** -0.5)
                block.ada_gss[:, :, 2:].mul_(init_adaln)
                block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
            else:
                block.ada_lin[1].weight[2 * dim:].mul_(init_adaln)
                block.ada_lin[1].weight[:2 * dim].mul_(init_adaln_gamma)


def _per_scale(value, num_scales: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * num_scales
    if len(values) != num_scales:
        raise ValueError(f"{name} has {len(values)} entries for {num_scales} scales")
    return values


class ScaleSampler:
    """Guidance and sampling for one generate call.

    Guidance (VAR's autoregressive_infer_cfg): at scale k the logits are (1 + t) cond - t uncond with
    t = guidance_scale * k / (K - 1), a ramp from 0 at scale 0, computed in that form as VAR does.
    guidance_scale == 0 runs no unconditional stream at all (the authors always run it; with t = 0
    at every scale the result is the same).

    Settings, each a value or a per-scale list (CoDe's convention): top_k (0 = off; keeps every
    logit >= the k-th largest, ties included, as VAR), top_p (1.0 = off; the authors' "off" is 0.0,
    so pass 1.0 for it; VAR's rule: drop the smallest tokens whose ascending cumulative mass is
    <= 1 - top_p, the max always stays) and temperature, which divides the already-filtered logits
    (CoDe helpers.py `sample_with_top_k_top_p_`; VAR has none), so it does not change the top-p set.
    Temperature 0 or top_k 1 is greedy (argmax).

    Draws (what the engine reproduces; `samplers/next_scale.py::sample_scale`, which both use): image
    i has its own torch.Generator seeded with seeds[i] (None: the global generator), on the logits'
    device, its state carried across scales (and from a CoDe drafter to its refiner). At each scale
    image i makes exactly one draw: an Exp(1) tensor [pn_k^2, V] filled row-major from its generator,
    and code = argmax(probs / draw) per row (the exponential race). The draw is made even when the
    scale is greedy, so the generator's state never depends on the settings. The authors instead draw
    one torch.multinomial over the whole batch from one generator, so their images depend on the batch.
    """

    def __init__(self, num_scales: int, class_ids: list[int], guidance_scale: float, top_k=0, top_p=1.0,
                 temperature=1.0, seeds: list[int | None] | None = None, device="cpu"):
        self.num_scales, self.class_ids = num_scales, list(class_ids)
        self.guidance_scale, self.guided = float(guidance_scale), guidance_scale != 0
        self.top_k = [int(k) for k in _per_scale(top_k, num_scales, "top_k")]
        self.top_p = [float(p) for p in _per_scale(top_p, num_scales, "top_p")]
        self.temperature = [float(t) for t in _per_scale(temperature, num_scales, "temperature")]
        if any(not 0 < p <= 1 for p in self.top_p):
            raise ValueError("top_p must be in (0, 1]; 1.0 is off (the authors' 0.0)")
        if any(k < 0 for k in self.top_k) or any(t < 0 for t in self.temperature):
            raise ValueError("top_k and temperature must be >= 0")
        seeds = [None] * len(self.class_ids) if seeds is None else list(seeds)
        if len(seeds) != len(self.class_ids):
            raise ValueError(f"{len(seeds)} seeds for {len(self.class_ids)} images")
        self.generators = [None if s is None else torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.device = device

    def labels(self, num_classes: int) -> torch.Tensor:
        """Class ids of the streams: [images] or, guided, [images; null class for each]."""
        null = [num_classes] * len(self.class_ids) if self.guided else []
        return torch.tensor(self.class_ids + null, device=self.device)

    def both(self, features: torch.Tensor) -> torch.Tensor:
        """The cond and uncond streams get the same continuous inputs."""
        return torch.cat([features, features]) if self.guided else features

    def __call__(self, k: int, logits: torch.Tensor) -> torch.Tensor:
        """Scale k's logits of every stream [streams, pn_k^2, V] -> codes [images, pn_k^2]."""
        n = len(self.class_ids)
        if self.guided:
            logits = guide(logits[:n], logits[n:], self.guidance_scale, k, self.num_scales)
        return torch.stack([sample_scale(logits[i], self.top_k[k], self.top_p[k], self.temperature[k], g)
                            for i, g in enumerate(self.generators)])


def _draft(model: VARReference, quant, sampler: ScaleSampler, stop: int):
    """Scales 0..stop-1 with `model`, one KV-cached forward per scale -> (codes per scale, f_hat)."""
    cond = model.class_emb(sampler.labels(model.config.num_classes))
    model.reset_cache()
    x, f_hat, codes = model.embed(cond, None, 0), None, []
    for k in range(stop):
        codes.append(sampler(k, model.step(x, cond)))
        f_hat = quant.add_scale(k, f_hat, codes[k])
        if k + 1 < stop:
            x = model.embed(cond, sampler.both(quant.next_input(k, f_hat)), model.ends[k])
    model.reset_cache()
    return codes, f_hat


@torch.no_grad()
def generate_var(model: VARReference, vq, class_ids: list[int], guidance_scale: float, top_k=0, top_p=1.0,
                 temperature=1.0, seeds: list[int | None] | None = None) -> list[torch.Tensor]:
    """VAR's autoregressive_infer_cfg: one forward per scale (that scale's pn^2 inputs, attending to
    the cached earlier scales and to each other), guidance, sampling (see ScaleSampler for the
    settings and the draws), the codes added into f_hat, whose area-downsample feeds the next scale.
    vq: a MultiScaleVQVAE or its quantizer. -> codes per scale [images, pn_k^2]; decode them with
    `MultiScaleVQVAE.decode_codes`. more_smooth (their Gumbel visualisation mode) is not supported."""
    quant = getattr(vq, "quantize", vq)
    sampler = ScaleSampler(len(model.patch_nums), class_ids, guidance_scale, top_k, top_p, temperature, seeds,
                           device=model.pos_1LC.device)
    return _draft(model, quant, sampler, len(model.patch_nums))[0]


@torch.no_grad()
def generate_code(drafter: VARReference, refiner: VARReference, vq, class_ids: list[int], draft_steps: int,
                  guidance_scale: float, top_k=0, top_p=1.0, temperature=1.0,
                  seeds: list[int | None] | None = None) -> list[torch.Tensor]:
    """CoDe (czg1225/CoDe models/var.py::autoregressive_infer_cfg_draft, _refine): the drafter runs
    scales 0..N-1 (N = draft_steps, 1 <= N <= K-1); the refiner then runs one forward over the whole
    prefix, positions [0, ends[N]) (class token + the continuous inputs of scales 1..N computed from
    the drafted codes), block-causal mask, filling its own KV cache; scale N is sampled from the last
    pn_N^2 rows with the global t = guidance_scale * N / (K-1); then one cached step per scale to K-1.
    Both models share the VQVAE and the schedule.

    Deliberate difference: the authors' refiner re-seeds its generator and re-samples every drafted
    scale from the prefix logits, discarding the draws, only to keep its RNG aligned with a one-model
    run (CoDe#8). Here each image's generator simply continues from the drafter's draws (ScaleSampler),
    so with drafter == refiner this equals generate_var draw for draw."""
    num_scales = len(drafter.patch_nums)
    if refiner.patch_nums != drafter.patch_nums:
        raise ValueError("drafter and refiner must share one scale schedule")
    if not 1 <= draft_steps <= num_scales - 1:
        raise ValueError(f"draft_steps must be in [1, {num_scales - 1}], got {draft_steps}")
    quant = getattr(vq, "quantize", vq)
    sampler = ScaleSampler(num_scales, class_ids, guidance_scale, top_k, top_p, temperature, seeds,
                           device=drafter.pos_1LC.device)
    n, ends = draft_steps, refiner.ends
    codes, f_hat = _draft(drafter, quant, sampler, n)
    cond = refiner.class_emb(sampler.labels(refiner.config.num_classes))
    refiner.reset_cache()
    x = refiner.embed(cond, sampler.both(quant.codes_to_inputs(codes)), 0)
    logits = refiner.step(x, cond, refiner.block_causal_mask(ends[n]))[:, ends[n - 1]:]
    for k in range(n, num_scales):
        if k > n:
            x = refiner.embed(cond, sampler.both(quant.next_input(k - 1, f_hat)), ends[k - 1])
            logits = refiner.step(x, cond)
        codes.append(sampler(k, logits))
        f_hat = quant.add_scale(k, f_hat, codes[k])
    refiner.reset_cache()
    return codes


# -- converted folders --------------------------------------------------------------------------
def read_var_config(path: str):
    """config.json of a converted folder: a VARConfig, or, where transformers is not installed (a
    bare GPU machine), the same fields as a namespace with `refiner_config()`."""
    try:
        from vllm_visual_ar.model_executors.var_config import VARConfig
    except ImportError:
        with open(os.path.join(path, "config.json")) as f:
            return _plain_config(json.load(f))
    return VARConfig.from_pretrained(path)


def _plain_config(d: dict) -> SimpleNamespace:
    d = dict(d)
    d.setdefault("embed_dim", 64 * d["depth"])
    d.setdefault("num_heads", d["depth"])
    refiner = d.get("refiner")
    cfg = SimpleNamespace(**d)
    cfg.refiner_config = lambda: None if refiner is None else _plain_config(
        {**{k: v for k, v in d.items() if k not in ("embed_dim", "num_heads")}, **refiner, "refiner": None})
    return cfg


def load_var_folder(path: str, device="cpu", dtype=torch.float32):
    """A converted folder -> (config, VARReference, MultiScaleVQVAE, refiner VARReference or None).
    The transformers get `dtype`; the VQVAE stays float32 (f_hat is float32 in VAR)."""
    from safetensors.torch import load_file

    config = read_var_config(path)

    def transformer(cfg, weights):
        model = VARReference(cfg)
        model.load_state_dict(load_file(os.path.join(path, weights)))
        return model.to(device=device, dtype=dtype).eval()

    model = transformer(config, "model.safetensors")
    refiner_cfg = config.refiner_config()
    refiner = transformer(refiner_cfg, os.path.join("refiner", "model.safetensors")) if refiner_cfg else None
    return config, model, MultiScaleVQVAE.from_folder(path, device), refiner
