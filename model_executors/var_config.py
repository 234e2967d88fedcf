"""Configuration of a converted VAR (next-scale prediction) model folder (`config.json`).

VAR (FoundationVision/VAR, `models/var.py`) predicts an image as K token maps of growing size
(`patch_nums`, 1x1 .. 16x16 for 256 px); all tokens of scale k are predicted in one forward and
attend to every token of scales <= k. One vLLM vocabulary holds every id a prompt or an output
can contain (vLLM validates prompt ids against `vocab_size` when the tokenizer is skipped):

    [0, codebook_size)                          image codes of the multi-scale VQVAE (the only ids sampled)
    codebook_size + c, c in [0, num_classes)    class-label prompt token for class c
    codebook_size + num_classes                 the null class (the unconditional stream of guidance)

A request's sequence is the class token (scale 0's input: class embedding + `pos_start`) followed
by the codes of every scale in order (scale by scale, row-major inside a scale). Sequence slot i
is fed as VAR's input position i: slot 0 is scale 0's input, and the inputs of scale k >= 1 are not
token embeddings but features computed from the codes of scales < k (the runner supplies them), so
the ids in those slots are never embedded.

Sizes follow VAR's depth rule (`models/__init__.py::build_vae_var`: width 64*depth, heads = depth)
but are stored explicitly, so models trained on other sizes and schedules load as well.
"""
from __future__ import annotations

import os

from transformers import PretrainedConfig

ARCHITECTURE = "VARForClassToImage"
MODEL_TYPE = "var"

# VAR's 256 px schedule (`VAR.__init__` default); 512 px uses 1,2,3,4,6,9,13,18,24,32.
DEFAULT_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)

# The multi-scale VQVAE of VAR's release (`vae_ch160v4096z32.pth`, `models/vqvae.py::VQVAE` and its
# ddconfig "from LDM vq-f16"); a converted folder stores the sizes read from the weights.
DEFAULT_VQ = dict(
    codebook_size=4096, z_channels=32, ch=160, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2,
    using_sa=True, using_mid_sa=True, in_channels=3, share_quant_resi=4, quant_resi=0.5, using_znorm=False,
    # Number of phi convs when share_quant_resi == 0 (one per scale); 0 = one per scale.
    default_qresi_counts=0,
)

# The transformer sizes a CoDe refiner section (`refiner` in config.json) may set; everything else
# (schedule, VQVAE, classes) is shared with the drafter, the folder's main model.
# The phases of a CoDe request (`samplers/next_scale.py`), each running one model's layers; they label
# the attention layers' KV cache (`vllm_visual_ar/phase_kv.py`).
DRAFTER, REFINER = "drafter", "refiner"
REFINER_FIELDS = ("depth", "embed_dim", "num_heads", "mlp_ratio", "norm_eps", "shared_aln", "attn_l2_norm")


class VARConfig(PretrainedConfig):
    model_type = MODEL_TYPE
    decoding = "next_scale"  # one forward per scale (`samplers/next_scale.py`), not token by token

    def __init__(
        self,
        depth: int = 16,
        embed_dim: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        shared_aln: bool = False,
        attn_l2_norm: bool = True,
        num_classes: int = 1000,
        patch_nums: list[int] | tuple[int, ...] = DEFAULT_PATCH_NUMS,
        vq: dict | None = None,
        default_guidance_scale: float = 1.5,
        default_top_k: int = 900,
        default_top_p: float = 0.96,
        default_draft_steps: int | None = None,
        class_names: list[str] | None = None,
        refiner: dict | None = None,
        **kwargs,
    ):
        self.depth = depth
        self.embed_dim = embed_dim or 64 * depth
        self.num_heads = num_heads or depth
        self.head_dim = self.embed_dim // self.num_heads
        self.mlp_ratio = mlp_ratio
        self.norm_eps = norm_eps
        self.shared_aln = shared_aln
        self.attn_l2_norm = attn_l2_norm
        self.num_classes = num_classes
        self.patch_nums = [int(p) for p in patch_nums]
        self.vq = {**DEFAULT_VQ, **(vq or {})}
        # Guidance as VAR's `cfg`: at scale k the logits are (1 + t) cond - t uncond with t = cfg * k / (K - 1)
        # (`autoregressive_infer_cfg`); 1.5, top-k 900, top-p 0.96 are the settings of VAR's FID runs.
        self.default_guidance_scale = default_guidance_scale
        self.default_top_k = default_top_k
        self.default_top_p = default_top_p
        # CoDe: the drafter's number of scales (N) this folder's pair was fine-tuned for, or a good
        # choice for a training-free pair; None = no preference (the caller picks).
        self.default_draft_steps = default_draft_steps
        self.class_names = class_names
        # CoDe (czg1225/CoDe): a second, smaller VAR that refines the last scales of this model's
        # drafts; its sizes (REFINER_FIELDS), weights in refiner/model.safetensors. None: plain VAR.
        if refiner is not None:
            unknown = set(refiner) - set(REFINER_FIELDS)
            if unknown:
                raise ValueError(f"refiner section has unknown fields {sorted(unknown)}")
        self.refiner = dict(refiner) if refiner is not None else None
        # vLLM's names for the sizes it reads.
        kwargs["hidden_size"] = self.embed_dim
        kwargs["num_hidden_layers"] = depth
        kwargs["num_attention_heads"] = self.num_heads
        kwargs["vocab_size"] = self.codebook_size + num_classes + 1
        # KV slots per request: every scale's tokens (the last scale's codes are never fed back, but
        # one spare slot keeps vLLM's prompt-plus-output length inside the limit).
        kwargs["max_position_embeddings"] = self.num_image_tokens + 1
        kwargs.setdefault("architectures", [ARCHITECTURE])
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    # -- token layout -------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return int(self.vq["codebook_size"])

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def scale_ends(self) -> list[int]:
        """Cumulative token counts: scale k holds flat positions [scale_ends[k-1], scale_ends[k])."""
        ends, total = [], 0
        for pn in self.patch_nums:
            total += pn * pn
            ends.append(total)
        return ends

    @property
    def num_image_tokens(self) -> int:
        return self.scale_ends[-1]

    @property
    def image_grid(self) -> int:
        """Side of the last (full-resolution) token map."""
        return self.patch_nums[-1]

    @property
    def image_size(self) -> int:
        """Pixels per side: the last grid times the VQVAE's downsampling."""
        return self.image_grid * 2 ** (len(self.vq["ch_mult"]) - 1)

    @property
    def null_class_token(self) -> int:
        return self.codebook_size + self.num_classes

    def class_token(self, class_id: int) -> int:
        return self.codebook_size + class_id

    @property
    def extra_weight_files(self) -> list[str]:
        """Weights beside model.safetensors and the VQVAE's: the CoDe refiner's."""
        return [os.path.join("refiner", "model.safetensors")] if self.refiner is not None else []

    @property
    def kv_phases(self) -> dict[str, int]:
        """Attention layers per phase when the phases run different models (CoDe), else empty: one
        KV pool for every layer."""
        return {DRAFTER: self.depth, REFINER: self.refiner["depth"]} if self.refiner is not None else {}

    def refiner_config(self) -> "VARConfig | None":
        """The CoDe refiner as a VARConfig of its own (same schedule, VQVAE and classes), or None."""
        if self.refiner is None:
            return None
        shared = {k: v for k, v in self.to_dict().items() if k not in REFINER_FIELDS and k != "refiner"}
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim"):
            shared.pop(k, None)
        return VARConfig(**shared, **self.refiner)


def image_layout(config: VARConfig, size=None):
    """The codes of every scale, coarse to fine (the last scale is the grid); code c is token id c."""
    from vllm_visual_ar.families import ImageLayout
    from vllm_visual_ar.model_executors.llamagen_config import check_native_size

    check_native_size(config, size)
    return ImageLayout(config.image_grid, config.image_grid, range(config.codebook_size),
                       scale_tokens=config.num_image_tokens)
