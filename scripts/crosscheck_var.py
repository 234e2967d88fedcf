"""Cross-check against the authors' VAR and CoDe code, on tiny random weights: the multi-scale VQVAE
(decode, encode, teacher-forcing inputs, the training forward), the VAR transformer (teacher-forcing
logits, greedy generation guided and unguided) and CoDe's draft/refine hand-off (greedy).

    python scripts/crosscheck_var.py /path/to/VAR [/path/to/CoDe]

Neither repository is a dependency and nothing of them ships here: point this at checkouts of
FoundationVision/VAR and czg1225/CoDe (it imports their `models` packages). Their models are built
with their classes, randomised (their init nearly closes the residual branches), saved as the
official state dicts (`torch.save(model.state_dict())`), converted with OUR converter and loaded
with OUR modules. Stubbed here: their `dist` module (device 'cpu', no process group) and, if it is
not installed, huggingface_hub. CoDe's `exit_points` are hard-coded to the 256 px schedule, so the
CoDe checks use that schedule (with tiny widths). Greedy only: sampled draws are not comparable
(theirs: one multinomial over the batch; ours: an exponential race per image). Exits non-zero on a
mismatch.
"""
import contextlib
import importlib
import io
import math
import os
import sys
import tempfile
import types
import warnings

import torch

from vllm_visual_ar.model_executors.convert import convert_var, load_var_folder, var_vq_config_from_state
from vllm_visual_ar.model_executors.var_reference import generate_code, generate_var
from vllm_visual_ar.model_executors.var_vq import MultiScaleVQVAE, load_vq_state

warnings.filterwarnings("ignore")  # their torch.cuda.amp.autocast(enabled=False) warns on every call
OFFICIAL = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
TINY_VQ = dict(codebook_size=64, z_channels=8, ch=32, ch_mult=[1, 2], num_res_blocks=1, in_channels=3,
               using_sa=True, using_mid_sa=True)
failures = []


def check(name: str, ok: bool, detail: str = ""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
    if not ok:
        failures.append(name)


def relative_error(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# -- importing their code ---------------------------------------------------------------------------
def install_shims():
    dist = types.ModuleType("dist")  # their dist.py (VAR's snapshot has none): one CPU process
    dist.get_device = lambda: "cpu"
    dist.initialized = lambda: False
    dist.get_world_size = lambda: 1
    dist.get_rank = dist.get_local_rank = lambda: 0
    sys.modules["dist"] = dist
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        hub = types.ModuleType("huggingface_hub")
        hub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = hub


def import_models(root: str) -> types.SimpleNamespace:
    """Their `models` package from `root` (VAR and CoDe both name it `models`)."""
    for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
        del sys.modules[name]
    sys.path.insert(0, root)
    try:
        return types.SimpleNamespace(**{part: importlib.import_module(f"models.{part}")
                                        for part in ("basic_vae", "quant", "vqvae", "var", "helpers")})
    finally:
        sys.path.remove(root)


# -- their models, randomised -----------------------------------------------------------------------
def their_vqvae(m, patch_nums, share_quant_resi=4, vq=TINY_VQ):
    vae = m.vqvae.VQVAE(vocab_size=vq["codebook_size"], z_channels=vq["z_channels"], ch=vq["ch"], test_mode=True,
                        share_quant_resi=share_quant_resi, v_patch_nums=patch_nums)
    # VQVAE fixes ch_mult (1,1,2,2,4), 2 res blocks and 3 channels: rebuild its halves at tiny sizes.
    dd = dict(ch=vq["ch"], ch_mult=vq["ch_mult"], num_res_blocks=vq["num_res_blocks"], in_channels=vq["in_channels"],
              z_channels=vq["z_channels"], using_sa=vq["using_sa"], using_mid_sa=vq["using_mid_sa"], dropout=0.0)
    vae.encoder, vae.decoder = m.basic_vae.Encoder(double_z=False, **dd), m.basic_vae.Decoder(**dd)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return vae.eval()


def their_var(m, vae, patch_nums, depth=2, width=128, heads=2, shared_aln=False, l2=True):
    with contextlib.redirect_stdout(io.StringIO()):  # their constructor prints its config
        var = m.var.VAR(vae_local=vae, num_classes=10, depth=depth, embed_dim=width, num_heads=heads, mlp_ratio=4.0,
                        drop_path_rate=0.0, norm_eps=1e-6, shared_aln=shared_aln, cond_drop_rate=0.0,
                        attn_l2_norm=l2, patch_nums=patch_nums, flash_if_available=False, fused_if_available=False)
    with torch.no_grad():
        for name, p in var.named_parameters():
            if "scale_mul" in name:
                p.uniform_(1.0, 4.5)
                p.view(-1)[0] = 5.3  # one head per block above log(100): the clamp matters
            elif name in ("class_emb.weight", "lvl_embed.weight"):
                p.normal_(0, 1.0)
            elif p.dim() >= 2 and "pos_" not in name and "ada_gss" not in name:
                p.normal_(0, (2.0 if name == "head.weight" else 1.0) / math.sqrt(p.shape[-1]))
            else:
                p.normal_(0, 0.3)
    return var.eval()  # their inference functions do not set eval mode


class CodeRecorder:
    """Codes their loops commit: every call of quantize.embedding with [B, l] ids."""

    def __init__(self, vae):
        self.codes = []
        vae.quantize.embedding.register_forward_hook(lambda mod, args, out: self.codes.append(args[0].clone()))

    def take(self):
        codes, self.codes = self.codes, []
        return codes


def same_codes(a, b) -> tuple[bool, str]:
    a, b = torch.cat(list(a), 1), torch.cat(list(b), 1)
    if a.shape != b.shape:
        return False, f"(shapes {tuple(a.shape)} vs {tuple(b.shape)})"
    return torch.equal(a, b), f"({(a != b).sum().item()} of {a.numel()} tokens differ)"


def random_codes(patch_nums, batch=3, vocab=TINY_VQ["codebook_size"]):
    return [torch.randint(0, vocab, (batch, p * p)) for p in patch_nums]


# -- checks -----------------------------------------------------------------------------------------
def check_vq(m, patch_nums, share_quant_resi):
    name = f"VQ {patch_nums} share_quant_resi={share_quant_resi}"
    theirs = their_vqvae(m, patch_nums, share_quant_resi)
    state = theirs.state_dict()
    vq = var_vq_config_from_state(state)
    ours = MultiScaleVQVAE(vq, patch_nums).eval()
    load_vq_state(ours, state)
    last = len(patch_nums) - 1
    same_phi = all(torch.equal(ours.quantize.phi(k).weight, theirs.quantize.quant_resi[k / last].weight)
                   for k in range(last + 1))
    check(f"{name}: phi per scale", same_phi, str(ours.quantize.phi_table))
    codes = random_codes(patch_nums)
    side = patch_nums[-1] * 2
    images = torch.rand(3, 3, side, side) * 2 - 1
    with torch.no_grad():
        err = (ours.decode_codes(codes) - theirs.idxBl_to_img(codes, same_shape=True, last_one=True).add(1).mul(0.5))
        check(f"{name}: decode", err.abs().max().item() <= 1e-5, f"(max abs error {err.abs().max().item():.1e})")
        ok, detail = same_codes(ours.encode_codes(images), theirs.img_to_idxBl(images))
        check(f"{name}: encode codes", ok, detail)
        err = relative_error(ours.quantize.codes_to_inputs(codes[:-1]), theirs.quantize.idxBl_to_var_input(codes))
        check(f"{name}: teacher-forcing inputs", err <= 1e-5, f"(max relative error {err:.1e})")
    # Training forward: theirs asks torch.distributed for the world size even without a process group.
    m.quant.tdist = types.SimpleNamespace(get_world_size=lambda: 1)
    for p in theirs.quantize.parameters():
        p.requires_grad_(True)
    f = torch.randn(3, TINY_VQ["z_channels"], patch_nums[-1], patch_nums[-1])
    results = []
    for quantizer in (ours.quantize, theirs.quantize):
        x = f.clone().requires_grad_(True)
        out = quantizer(x)  # ours: (f_hat, loss, codes); theirs: (f_hat, usages, loss)
        f_hat, loss = out[0], out[1] if quantizer is ours.quantize else out[2]
        (f_hat.square().sum() * 1e-3 + loss).backward()
        results.append((f_hat.detach(), loss.detach(), x.grad, quantizer.embedding.weight.grad))
    errs = [relative_error(a, b) for a, b in zip(results[0], results[1])]
    check(f"{name}: training forward (f_hat, loss, grad f, grad codebook)", max(errs) <= 1e-5,
          f"(max relative errors {', '.join(f'{e:.1e}' for e in errs)})")


def check_var(m, patch_nums, tmp, shared_aln=False, l2=True):
    name = f"VAR {patch_nums} shared_aln={shared_aln} attn_l2_norm={l2}"
    vae = their_vqvae(m, patch_nums)
    var = their_var(m, vae, patch_nums, shared_aln=shared_aln, l2=l2)
    out = os.path.join(tmp, f"var{len(os.listdir(tmp))}")
    os.makedirs(out)
    torch.save(var.state_dict(), os.path.join(out, "var.pth"))
    torch.save(vae.state_dict(), os.path.join(out, "vae.pth"))
    folder = convert_var(os.path.join(out, "var.pth"), os.path.join(out, "vae.pth"), os.path.join(out, "converted"),
                         patch_nums=patch_nums, num_heads=None if l2 else 2)
    _, model, vq, _ = load_var_folder(folder)
    codes = random_codes(patch_nums)
    labels = torch.tensor([1, 4, 10])
    with torch.no_grad():
        expected = var(labels, vae.quantize.idxBl_to_var_input(codes))
        got = model(labels, vq.quantize.codes_to_inputs(codes[:-1]))
    err = relative_error(got, expected)
    check(f"{name}: teacher-forcing logits", err <= 1e-4, f"(max relative error {err:.1e})")
    recorder = CodeRecorder(vae)
    for cfg in (0.0, 1.5, 4.0):
        with torch.no_grad():
            image = var.autoregressive_infer_cfg(B=3, label_B=torch.tensor([1, 4, 7]), g_seed=0, cfg=cfg, top_k=1,
                                                 top_p=0.0)
            theirs = recorder.take()
            ours = generate_var(model, vq, [1, 4, 7], guidance_scale=cfg, top_k=1)
            ok, detail = same_codes(ours, theirs)
            check(f"{name}: greedy generate, cfg {cfg}", ok, detail)
            err = (vq.decode_codes(ours) - image).abs().max().item()
            check(f"{name}: decoded image, cfg {cfg}", err <= 1e-5, f"(max abs error {err:.1e})")


def check_code(m, tmp):
    name = "CoDe d3/w192 drafter + d2/w128 refiner, 256 px schedule"
    vae = their_vqvae(m, OFFICIAL)
    drafter = their_var(m, vae, OFFICIAL, depth=3, width=192, heads=3)
    refiner = their_var(m, vae, OFFICIAL, depth=2, width=128, heads=2)
    out = os.path.join(tmp, "code")
    os.makedirs(out)
    for obj, file in ((drafter, "drafter_8.pth"), (refiner, "refiner_8.pth"), (vae, "vae.pth")):
        torch.save(obj.state_dict(), os.path.join(out, file))
    folder = convert_var(os.path.join(out, "drafter_8.pth"), os.path.join(out, "vae.pth"),
                         os.path.join(out, "converted"), refiner_path=os.path.join(out, "refiner_8.pth"))
    config, our_drafter, vq, our_refiner = load_var_folder(folder)
    check(f"{name}: refiner section", config.refiner == dict(depth=2, embed_dim=128, num_heads=2, mlp_ratio=4.0,
                                                               norm_eps=1e-6, shared_aln=False, attn_l2_norm=True),
          str(config.refiner))
    recorder = CodeRecorder(vae)
    K = len(OFFICIAL)
    ones, temps = [1] * K, [1.0] * K
    for n in (1, 2, K - 2, K - 1):
        for cfg in (1.5, 4.0):
            with torch.no_grad():
                f_hat, hub = drafter.autoregressive_infer_cfg_draft(
                    B=3, label_B=torch.tensor([1, 4, 7]), g_seed=0, cfg=cfg, top_k=ones, top_p=0.0, exit_num=n,
                    temp=temps)
                image = refiner.autoregressive_infer_cfg_refine(
                    B=3, label_B=torch.tensor([1, 4, 7]), g_seed=0, cfg=cfg, top_k=ones, top_p=0.0, draft=hub,
                    f_hat=f_hat, entry_num=n, temp=temps)
                theirs = recorder.take()
                ours = generate_code(our_drafter, our_refiner, vq, [1, 4, 7], n, cfg, top_k=1)
            ok, detail = same_codes(ours, theirs)
            err = (vq.decode_codes(ours) - image).abs().max().item()
            check(f"{name}: greedy N={n}, cfg {cfg}", ok and err <= 1e-5, f"{detail} (image max abs error {err:.1e})")


if __name__ == "__main__":
    install_shims()
    torch.manual_seed(0)
    var_models = import_models(sys.argv[1] if len(sys.argv) > 1 else "VAR")
    with tempfile.TemporaryDirectory() as tmp:
        for pns in ((1, 2, 3, 4), OFFICIAL):
            for share in (4, 1, 0):
                check_vq(var_models, pns, share)
        check_var(var_models, (1, 2, 3, 4), tmp)
        check_var(var_models, OFFICIAL, tmp)
        check_var(var_models, OFFICIAL, tmp, shared_aln=True)
        check_var(var_models, (1, 2, 3, 4), tmp, l2=False)
        if len(sys.argv) > 2:
            check_code(import_models(sys.argv[2]), tmp)
        else:
            print("skip CoDe (no CoDe checkout given)")
    sys.exit(1 if failures else 0)
