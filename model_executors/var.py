"""VAR (next-scale prediction, FoundationVision/VAR `models/var.py`) as a vLLM model (paged KV through
vLLM attention layers).

Reads like vLLM's llama.py with VAR's specifics:
- Inputs. A request's sequence position p is VAR's flat token position p. Position 0 (the class
  prompt token) is `class_emb(label) + pos_start`; every later position is
  `word_embed(feature)`, where the feature is the next-scale input the VQVAE computes from the
  codes of all earlier scales (`var_vq.MultiScaleQuantizer`): continuous, not a token embedding.
  The plugin's runner computes those features per request and hands them over in `VARStepInputs`
  with each token's class label (the ids vLLM feeds at positions >= 1 are never embedded). Every
  position adds `lvl_embed(scale) + pos_1LC[p]`: learned absolute positions, no RoPE.
- AdaLN. Every block is modulated by its sequence's class embedding (`basic_var.py::AdaLNSelfAttn`,
  gamma1, gamma2, scale1, scale2, shift1, shift2), as is the head (`AdaLNBeforeHead`), so each token
  carries its request's label.
- Attention. q and k are L2-normalised per head and q is scaled by exp(min(scale_mul, log 100)),
  softmax scale 1 (`SelfAttention` with attn_l2_norm); the cache holds the normalised keys. A
  forward feeds one whole scale per request and its queries see every cached token and each other:
  vLLM's non-causal decoder attention (`PrefillPrefixLMAttention`), which over a cache holding only
  scales <= k is exactly VAR's block-causal mask. A forward that feeds several scales at once (CoDe's
  hand-off) re-attends through `MaskedAttention` with the block-causal mask.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.attention.prefill_prefix_lm_attention import PrefillPrefixLMAttention
from vllm.sequence import IntermediateTensors

from vllm_visual_ar.model_executors.masked_attention import MaskedAttention
from vllm_visual_ar import phase_kv
from vllm_visual_ar.model_executors.var_config import DRAFTER, REFINER, VARConfig
from vllm_visual_ar.model_executors.var_reference import FFN
from vllm_visual_ar.model_executors.var_vq import MultiScaleQuantizer
from vllm_visual_ar.model_executors.vq import VQ_WEIGHTS


@dataclass
class VARStepInputs:
    """What the runner supplies for one forward, aligned with its flat tokens."""
    features: torch.Tensor  # [T, z_channels] next-scale input of each token (ignored at position 0)
    labels: torch.Tensor    # [T] class label of each token's sequence (num_classes = the null class)
    refiner: bool = False   # run the CoDe refiner instead of the folder's main VAR (the drafter)


class PhaseAttention(PrefillPrefixLMAttention):
    """vLLM's non-causal decoder attention whose KV a request holds only in one phase, when the
    layer is labelled with one (a CoDe folder's drafter and refiner layers; `phase_kv.py`)."""

    kv_phase: str | None = None

    def get_kv_cache_spec(self, vllm_config):
        spec = super().get_kv_cache_spec(vllm_config)
        if self.kv_phase is None:
            return spec
        phase_kv.register()
        return phase_kv.PhaseKVSpec.of(spec, self.kv_phase)


class VARAttention(nn.Module):
    def __init__(self, cfg: VARConfig, vllm_config: VllmConfig, prefix: str, kv_phase: str | None = None):
        super().__init__()
        c, self.num_heads, self.head_dim = cfg.embed_dim, cfg.num_heads, cfg.head_dim
        self.mat_qkv = nn.Linear(c, 3 * c, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(c))
        self.v_bias = nn.Parameter(torch.zeros(c))
        self.l2_norm = cfg.attn_l2_norm
        if self.l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.zeros(1, self.num_heads, 1, 1))
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(self.head_dim)
        self.scale = scale
        self.proj = nn.Linear(c, c)
        self.attn = PhaseAttention(self.num_heads, self.head_dim, scale, cache_config=vllm_config.cache_config,
                                   prefix=f"{prefix}.attn")
        self.attn.kv_phase = kv_phase

    def forward(self, x: torch.Tensor, masked: MaskedAttention | None) -> torch.Tensor:
        t = x.shape[0]
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x, self.mat_qkv.weight, bias).view(t, 3, self.num_heads, self.head_dim).unbind(1)
        if self.l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(math.log(100)).exp().view(1, self.num_heads, 1)
            q = F.normalize(q, dim=-1) * scale_mul
            k = F.normalize(k, dim=-1)
        q, k, v = q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)
        out = self.attn(q, k, v)
        if masked is not None:
            out = masked.apply(self.attn, q, k, out, self.num_heads, self.head_dim, self.scale)
        return self.proj(out)


class VARBlock(nn.Module):
    def __init__(self, cfg: VARConfig, vllm_config: VllmConfig, prefix: str, kv_phase: str | None = None):
        super().__init__()
        self.embed_dim, self.eps = cfg.embed_dim, cfg.norm_eps
        self.attn = VARAttention(cfg, vllm_config, f"{prefix}.attn", kv_phase)
        self.ffn = FFN(cfg)  # fc1, tanh-GELU, fc2: the reference's module
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, cfg.embed_dim))
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.embed_dim, 6 * cfg.embed_dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rows: torch.Tensor,
                masked: MaskedAttention | None) -> torch.Tensor:
        """cond: [U, C] the distinct class embeddings of the batch (with shared AdaLN, the shared
        projection [U, 6, C]); rows: [T] which of them each token's sequence has. The modulation is
        one vector per sequence (VAR computes it per sequence, not per token), so it is computed once
        per distinct class and gathered."""
        if hasattr(self, "ada_gss"):
            ada = self.ada_gss[0, 0] + cond
        else:
            ada = self.ada_lin(cond).view(-1, 6, self.embed_dim)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada[rows].unbind(1)
        ln = lambda h: F.layer_norm(h, (self.embed_dim,), eps=self.eps)  # noqa: E731 (no affine, as VAR)
        x = x + self.attn(ln(x) * (scale1 + 1) + shift1, masked) * gamma1
        return x + self.ffn(ln(x) * (scale2 + 1) + shift2) * gamma2


class VARHeadNorm(nn.Module):
    """`AdaLNBeforeHead`: LayerNorm modulated by the class embedding."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.embed_dim, self.eps = cfg.embed_dim, cfg.norm_eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.embed_dim, 2 * cfg.embed_dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 2, self.embed_dim)[rows].unbind(1)
        return F.layer_norm(x, (self.embed_dim,), eps=self.eps) * (scale + 1) + shift


def load_quantizer_weights(quantizer: MultiScaleQuantizer, model_dir: str) -> None:
    """The `quantize.*` weights of the folder's VQVAE (codebook, phi convolutions)."""
    import os

    from safetensors.torch import load_file

    state = load_file(os.path.join(model_dir, VQ_WEIGHTS))
    own = {k.removeprefix("quantize."): v for k, v in state.items()
           if k.startswith("quantize.") and not k.endswith("ema_vocab_hit_SV")}
    quantizer.load_state_dict(own, strict=True)


class VARTransformer(nn.Module):
    """One VAR: embeddings, AdaLN blocks, head (the official parameter names)."""

    def __init__(self, cfg: VARConfig, vllm_config: VllmConfig, prefix: str = "", kv_phase: str | None = None):
        super().__init__()
        self.config = cfg
        c = cfg.embed_dim
        self.word_embed = nn.Linear(cfg.vq["z_channels"], c)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, c)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_1LC = nn.Parameter(torch.zeros(1, cfg.num_image_tokens, c))
        self.lvl_embed = nn.Embedding(cfg.num_scales, c)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.blocks = nn.ModuleList(VARBlock(cfg, vllm_config, f"{prefix}blocks.{i}", kv_phase)
                                    for i in range(cfg.depth))
        self.head_nm = VARHeadNorm(cfg)
        self.head = nn.Linear(c, cfg.codebook_size)
        self.register_buffer("scale_of_position", torch.tensor(
            [k for k, pn in enumerate(cfg.patch_nums) for _ in range(pn * pn)]), persistent=False)

    def hidden(self, positions: torch.Tensor, labels: torch.Tensor, features: torch.Tensor,
               masked: MaskedAttention | None) -> torch.Tensor:
        """positions, labels [T], features [T, z] -> the head's input [T, C]."""
        cfg = self.config
        classes, rows = labels.unique(return_inverse=True)
        cond = self.class_emb(classes)  # [U, C]: one per distinct class in the batch
        first = (positions == 0)[:, None]
        h = torch.where(first, cond[rows] + self.pos_start[0, 0], self.word_embed(features.to(cond.dtype)))
        h = h + self.lvl_embed(self.scale_of_position[positions]) + self.pos_1LC[0, positions]
        ada = self.shared_ada_lin(cond).view(-1, 6, cfg.embed_dim) if cfg.shared_aln else cond
        for block in self.blocks:
            h = block(h, ada, rows, masked)
        return self.head_nm(h, cond, rows)


class VARForClassToImage(VARTransformer):
    """The folder's VAR (with a CoDe folder: the drafter) at the official top-level names, and for
    CoDe the refiner under `refiner.` with vLLM attention layers of its own. A forward runs one of
    the two on the whole batch (the plugin's scheduler never mixes the phases in one step)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        cfg: VARConfig = vllm_config.model_config.hf_config
        if cfg.patch_nums[0] != 1:
            raise ValueError(f"VAR serving needs a 1x1 first scale (the class token), got patch_nums {cfg.patch_nums}")
        if vllm_config.parallel_config.tensor_parallel_size > 1:
            # Its layers are plain torch ones (VAR's own fused shapes), not split over ranks.
            raise ValueError("VAR models do not run with tensor parallelism yet: use --tensor-parallel-size 1")
        # With a refiner, each model's layers keep their KV in their own phase's groups (`phase_kv.py`).
        phases = cfg.kv_phases
        super().__init__(cfg, vllm_config, prefix, DRAFTER if phases else None)
        refiner_cfg = cfg.refiner_config()
        self.refiner = VARTransformer(refiner_cfg, vllm_config, f"{prefix}refiner.", REFINER) if refiner_cfg else None
        # The VQVAE's codebook and phi convolutions: the runner builds each scale's input features with
        # them (`samplers/next_scale.py`). Loaded from the folder's VQ weights, not vLLM's file list.
        vq = cfg.vq
        self.quantize = MultiScaleQuantizer(cfg.codebook_size, vq["z_channels"], cfg.patch_nums,
                                            vq["share_quant_resi"], vq["quant_resi"], vq["using_znorm"],
                                            default_qresi_counts=vq.get("default_qresi_counts", 0))
        self.model_dir = vllm_config.model_config.model
        # Set by the plugin's model runner before each forward (None in vLLM's dummy runs); the
        # masked attention (block-causal re-attention of multi-scale forwards) as for every family.
        self.step_inputs: VARStepInputs | None = None
        self.masked_attention: MaskedAttention | None = None
        self._refiner_ran = False  # which model's head compute_logits applies

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The class-token embedding (position 0); later positions are built in `forward`."""
        return self.class_emb((input_ids - self.config.codebook_size).clamp(0, self.config.num_classes))

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        cfg = self.config
        step, self.step_inputs = self.step_inputs, None
        positions = positions.clamp(max=cfg.num_image_tokens - 1)
        if step is None:  # vLLM's dummy/profile forward: shapes only, every model's layers
            labels = (input_ids - cfg.codebook_size).clamp(0, cfg.num_classes)
            features = torch.zeros(positions.shape[0], self.word_embed.in_features, device=positions.device,
                                   dtype=self.word_embed.weight.dtype)
            if self.refiner is not None:
                self.refiner.hidden(positions, labels, features, None)
            self._refiner_ran = False
            return self.hidden(positions, labels, features, None)
        self._refiner_ran = step.refiner
        model = self.refiner if step.refiner else self
        return model.hidden(positions, step.labels, step.features, self.masked_attention)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        head = self.refiner.head if self._refiner_ran else self.head
        logits = head(hidden_states.float()).float()
        # Class and null-class ids are prompt-only: never sampled.
        pad = logits.new_full((logits.shape[0], self.config.vocab_size - logits.shape[1]), float("-inf"))
        return torch.cat([logits, pad], dim=-1)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The main VAR from vLLM's file list; the refiner and the VQVAE's quantizer from their own files."""
        import os

        from safetensors.torch import load_file

        load_quantizer_weights(self.quantize, self.model_dir)
        loaded = {f"quantize.{k}" for k, _ in self.quantize.named_parameters()}
        if self.refiner is not None:
            state = load_file(os.path.join(self.model_dir, "refiner", "model.safetensors"))
            loaded |= {f"refiner.{k}" for k in _copy_weights(self.refiner, state.items(), "refiner")}
        main = {k: v for k, v in self.named_parameters() if k not in loaded}
        return loaded | _copy_weights(self, weights, "VAR", main)


def _copy_weights(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], what: str,
                  params: dict | None = None) -> set[str]:
    """Copy checkpoint tensors into the parameters of the same names; every parameter must be given."""
    params = dict(module.named_parameters()) if params is None else params
    loaded = set()
    for name, tensor in weights:
        if name not in params:
            raise ValueError(f"unexpected {what} weight {name!r}")
        with torch.no_grad():
            params[name].copy_(tensor.to(params[name].dtype))
        loaded.add(name)
    if missing := set(params) - loaded:
        raise ValueError(f"{what} checkpoint lacks {sorted(missing)[:5]}")
    return loaded
