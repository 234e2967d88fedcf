"""Engine-free VAR pieces: the multi-scale VQVAE (phi tables, the f_hat recurrence, encode/decode,
training forward), the converter, and the reference loops (teacher forcing vs the KV-cached loop,
guidance, per-image seeds, CoDe's hand-off). The authors' code is compared in
scripts/crosscheck_var.py."""
import json

import pytest
import torch

from vllm_visual_ar.model_executors.convert import convert_var, load_var_folder, write_var_folder
from vllm_visual_ar.model_executors.var_config import VARConfig
from vllm_visual_ar.model_executors.var_reference import generate_code, generate_var
from vllm_visual_ar.model_executors.var_vq import MultiScaleQuantizer, MultiScaleVQVAE

from tiny_models import official_var_state as official_state, random_var, random_var_vq as random_vq

OFFICIAL = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
MNIST_8 = (1, 2, 3, 4, 6, 8, 11, 16)
MNIST_5 = (1, 2, 4, 8, 16)
VQ = dict(codebook_size=32, z_channels=8, ch=32, ch_mult=[1, 2], num_res_blocks=1, in_channels=1)


def config(patch_nums=(1, 2, 3, 4), depth=2, heads=2, **more) -> VARConfig:
    return VARConfig(depth=depth, embed_dim=64 * heads, num_heads=heads, num_classes=10, patch_nums=patch_nums,
                     vq=dict(VQ), **more)


def random_codes(cfg: VARConfig, batch: int = 2) -> list[torch.Tensor]:
    return [torch.randint(0, cfg.codebook_size, (batch, p * p)) for p in cfg.patch_nums]


def joined(codes) -> torch.Tensor:
    return torch.cat(list(codes), 1)


# -- the multi-scale VQVAE --------------------------------------------------------------------------
@pytest.mark.parametrize("patch_nums,table", [(OFFICIAL, [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]),
                                              (MNIST_8, [0, 0, 1, 1, 2, 2, 3, 3]), (MNIST_5, [0, 1, 2, 2, 3])])
def test_phi_index_follows_the_authors_ticks(patch_nums, table):
    """Four shared phis (the release): the official schedule has two exact ties (k = 2, 7), which
    float64 settles as the authors' code does."""
    q = MultiScaleQuantizer(32, 8, patch_nums)
    assert [q.phi_index(k) for k in range(len(patch_nums))] == table == q.phi_table
    assert [MultiScaleQuantizer(32, 8, patch_nums, share_quant_resi=1).phi_index(k)
            for k in range(len(patch_nums))] == [0] * len(patch_nums)
    assert [MultiScaleQuantizer(32, 8, patch_nums, share_quant_resi=0).phi_index(k)
            for k in range(len(patch_nums))] == list(range(len(patch_nums)))


def test_phi_key_names_follow_the_sharing_mode():
    keys = {share: {k for k in MultiScaleQuantizer(32, 8, OFFICIAL, share_quant_resi=share).state_dict()
                    if k.startswith("quant_resi")} for share in (0, 1, 4)}
    assert keys[4] == {f"quant_resi.qresi_ls.{i}.{w}" for i in range(4) for w in ("weight", "bias")}
    assert keys[1] == {"quant_resi.qresi.weight", "quant_resi.qresi.bias"}
    assert keys[0] == {f"quant_resi.{i}.{w}" for i in range(10) for w in ("weight", "bias")}
    assert not any(k.startswith("quant_resi") for k in MultiScaleQuantizer(32, 8, OFFICIAL, quant_resi=0).state_dict())


def test_fhat_from_codes_is_the_add_scale_chain_and_inputs_are_untouched():
    cfg = config(MNIST_8)
    q = random_vq(cfg).quantize
    codes = random_codes(cfg)
    with torch.no_grad():
        f_hat = None
        for k, c in enumerate(codes):
            before = None if f_hat is None else f_hat.clone()
            new = q.add_scale(k, f_hat, c)
            if f_hat is not None:
                assert torch.equal(f_hat, before)  # not modified in place
                assert not torch.equal(new, f_hat)
            f_hat = new
        assert torch.equal(q.codes_to_fhat(codes), f_hat)
        assert torch.equal(q.add_scale(0, None, codes[0]), q.add_scale(0, torch.zeros_like(f_hat), codes[0]))
        inputs = q.codes_to_inputs(codes[:3])
        assert inputs.shape == (2, 4 + 9 + 16, 8)
        assert torch.equal(inputs[:, 4 + 9:], q.next_input(2, q.codes_to_fhat(codes[:3])))


def test_encode_decode_shapes_and_training_forward():
    cfg = config(MNIST_5)
    vq = random_vq(cfg)
    images = torch.rand(3, 1, 32, 32) * 2 - 1
    codes = vq.encode_codes(images)
    assert [c.shape for c in codes] == [(3, p * p) for p in MNIST_5]
    decoded = vq.decode_codes(codes)
    assert decoded.shape == (3, 1, 32, 32) and 0 <= decoded.min() and decoded.max() <= 1
    assert torch.equal(decoded, vq.decode_codes(joined(codes)))  # flat [B, L] too
    vq.train()
    reconstruction, loss = vq(images)
    assert reconstruction.shape == images.shape and loss.item() > 0
    # Straight-through: the reconstruction reaches the encoder; the vq loss reaches codebook and phi.
    (reconstruction.square().mean() + loss).backward()
    for p in (vq.encoder.conv_in.weight, vq.quantize.embedding.weight, vq.quantize.phi(0).weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    with torch.no_grad():  # the forward quantises as encode does
        f = vq.quant_conv(vq.encoder(images))
        f_hat, _, train_codes = vq.quantize(f)
        assert all(torch.equal(a, b) for a, b in zip(train_codes, vq.quantize.f_to_codes(f)))
        assert torch.allclose(f_hat, vq.quantize.codes_to_fhat(train_codes), atol=1e-6)


def test_vq_state_accepts_the_training_buffer():
    cfg = config()
    vq = random_vq(cfg)
    state = dict(vq.state_dict(), **{"quantize.ema_vocab_hit_SV": torch.zeros(4, 32)})
    other = MultiScaleVQVAE.from_config(cfg)
    other.load_state_dict(state)  # strict
    assert torch.equal(other.quantize.embedding.weight, vq.quantize.embedding.weight)


# -- the converter ----------------------------------------------------------------------------------
def write_official(tmp_path, cfg, refiner_cfg=None):
    model, vq = random_var(cfg), random_vq(cfg)
    torch.save(official_state(model), tmp_path / "var.pth")
    torch.save(dict(vq.state_dict(), **{"quantize.ema_vocab_hit_SV": torch.zeros(cfg.num_scales, 32)}),
               tmp_path / "vae.pth")
    refiner = None
    if refiner_cfg is not None:
        refiner = random_var(refiner_cfg, seed=1)
        torch.save({"model": official_state(refiner)}, tmp_path / "refiner.pth")  # a wrapped one
    return model, vq, refiner


def test_official_layout_converts_with_sizes_read_from_the_weights(tmp_path):
    cfg = config(MNIST_5, depth=3, heads=3, shared_aln=True)
    model, vq, _ = write_official(tmp_path, cfg)
    out = convert_var(str(tmp_path / "var.pth"), str(tmp_path / "vae.pth"), str(tmp_path / "out"), patch_nums=MNIST_5)
    written = json.load(open(tmp_path / "out" / "config.json"))
    assert written["architectures"] == ["VARForClassToImage"]
    assert (written["depth"], written["embed_dim"], written["num_heads"], written["mlp_ratio"]) == (3, 192, 3, 4.0)
    assert (written["num_classes"], written["shared_aln"], written["attn_l2_norm"]) == (10, True, True)
    assert written["patch_nums"] == list(MNIST_5) and written["refiner"] is None
    assert {k: written["vq"][k] for k in VQ} == VQ
    assert [written["vq"][k] for k in ("share_quant_resi", "using_sa", "using_mid_sa")] == [4, True, True]
    config_back, loaded, vq_back, refiner = load_var_folder(out)
    assert refiner is None and config_back.vocab_size == 32 + 10 + 1
    codes = random_codes(cfg)
    labels = torch.tensor([3, 10])
    with torch.no_grad():
        inputs = vq.quantize.codes_to_inputs(codes[:-1])
        assert torch.equal(loaded(labels, inputs), model(labels, inputs))
        assert torch.equal(vq_back.decode_codes(codes), vq.decode_codes(codes))


def test_converter_names_bad_schedules_and_missing_head_counts(tmp_path):
    cfg = config(MNIST_5)
    write_official(tmp_path, cfg)
    args = (str(tmp_path / "var.pth"), str(tmp_path / "vae.pth"))
    with pytest.raises(ValueError, match="patch_nums"):
        convert_var(*args, str(tmp_path / "a"))  # the default (official) schedule does not fit
    with pytest.raises(ValueError, match="patch_nums"):
        convert_var(*args, str(tmp_path / "b"), patch_nums=(1, 2, 4, 8, 15))
    with pytest.raises(ValueError, match="no such file"):
        convert_var(str(tmp_path / "missing.pth"), args[1], str(tmp_path / "c"))
    no_l2 = config(MNIST_5, attn_l2_norm=False)
    torch.save(official_state(random_var(no_l2)), tmp_path / "var_no_l2.pth")
    with pytest.raises(ValueError, match="num_heads"):
        convert_var(str(tmp_path / "var_no_l2.pth"), args[1], str(tmp_path / "d"), patch_nums=MNIST_5)
    convert_var(str(tmp_path / "var_no_l2.pth"), args[1], str(tmp_path / "e"), patch_nums=MNIST_5, num_heads=2)
    assert json.load(open(tmp_path / "e" / "config.json"))["num_heads"] == 2


def test_code_pair_converts_with_a_refiner_section(tmp_path):
    cfg, refiner_cfg = config(MNIST_5, depth=3, heads=3), config(MNIST_5, depth=2, heads=2)
    _, _, refiner = write_official(tmp_path, cfg, refiner_cfg)
    out = convert_var(str(tmp_path / "var.pth"), str(tmp_path / "vae.pth"), str(tmp_path / "out"),
                      patch_nums=MNIST_5, refiner_path=str(tmp_path / "refiner.pth"))
    config_back, drafter, _, refiner_back = load_var_folder(out)
    assert config_back.refiner == dict(depth=2, embed_dim=128, num_heads=2, mlp_ratio=4.0, norm_eps=1e-6,
                                       shared_aln=False, attn_l2_norm=True)
    assert drafter.config.embed_dim == 192 and refiner_back.config.embed_dim == 128
    for name, p in refiner.state_dict().items():
        assert torch.equal(refiner_back.state_dict()[name], p)
    with pytest.raises(ValueError, match="share patch_nums"):
        write_var_folder(str(tmp_path / "bad"), cfg, random_var(cfg).state_dict(), random_vq(cfg).state_dict(),
                         random_var(refiner_cfg).state_dict(), config(MNIST_8))


# -- the reference loops ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    cfg = config(MNIST_8)
    return random_var(cfg), random_vq(cfg)


def test_cached_scale_steps_equal_teacher_forcing(tiny):
    model, vq = tiny
    codes = random_codes(model.config)
    labels = torch.tensor([4, 10])
    with torch.no_grad():
        inputs = vq.quantize.codes_to_inputs(codes[:-1])
        full = model(labels, inputs)
        cond = model.class_emb(labels)
        model.reset_cache()
        steps = [model.step(model.embed(cond, None, 0), cond)]
        for k in range(1, len(model.patch_nums)):
            begin = model.ends[k - 1]
            steps.append(model.step(model.embed(cond, inputs[:, begin - 1:model.ends[k] - 1], begin), cond))
        model.reset_cache()
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("guidance_scale", [0.0, 3.0])
def test_greedy_generation_is_the_argmax_of_teacher_forcing_on_itself(tiny, guidance_scale):
    model, vq = tiny
    classes = [1, 7, 7]
    codes = generate_var(model, vq, classes, guidance_scale, top_k=1)
    inputs = vq.quantize.codes_to_inputs(codes[:-1])
    with torch.no_grad():
        cond = model(torch.tensor(classes), inputs)
        uncond = model(torch.tensor([10] * 3), inputs)
    for k, c in enumerate(codes):
        t = guidance_scale * k / (len(codes) - 1)
        rows = slice(model.ends[k] - c.shape[1], model.ends[k])
        assert torch.equal(((1 + t) * cond[:, rows] - t * uncond[:, rows]).argmax(-1), c)
    assert joined(codes).unique().numel() > 5  # not a degenerate model
    assert torch.equal(joined(generate_var(model, vq, classes, guidance_scale, temperature=0)), joined(codes))


def test_guidance_ramp_starts_at_zero_and_seeds_are_per_image(tiny):
    model, vq = tiny
    kw = dict(top_k=8, temperature=1.0, seeds=[11, 12, 13])
    unguided = generate_var(model, vq, [2, 5, 9], 0.0, **kw)
    guided = generate_var(model, vq, [2, 5, 9], 4.0, **kw)
    assert torch.equal(unguided[0], guided[0])  # t = 0 at scale 0: same logits, same draws
    assert not torch.equal(joined(unguided), joined(guided))
    alone = generate_var(model, vq, [5], 4.0, top_k=8, seeds=[12])
    assert torch.equal(joined(alone), joined(guided)[1:2])  # whatever shares the batch
    other_seed = generate_var(model, vq, [2, 5, 9], 4.0, top_k=8, seeds=[11, 99, 13])
    assert torch.equal(joined(other_seed)[[0, 2]], joined(guided)[[0, 2]])
    assert not torch.equal(joined(other_seed)[1], joined(guided)[1])


def test_per_scale_settings_and_their_checks(tiny):
    model, vq = tiny
    k = len(model.patch_nums)
    codes = generate_var(model, vq, [3], 1.0, top_k=[1] * 4 + [2] * (k - 4), temperature=[1.1] * k, seeds=[0])
    assert torch.equal(joined(codes[:4]), joined(generate_var(model, vq, [3], 1.0, top_k=1)[:4]))
    with pytest.raises(ValueError, match="top_k"):
        generate_var(model, vq, [3], 1.0, top_k=[1, 2])
    with pytest.raises(ValueError, match="top_p"):
        generate_var(model, vq, [3], 1.0, top_p=0.0)  # the authors' "off" is 1.0 here
    with pytest.raises(ValueError, match="seeds"):
        generate_var(model, vq, [3, 4], 1.0, seeds=[1])


def test_code_with_one_model_is_var_draw_for_draw(tiny):
    """Drafter == refiner: the refiner's one masked prefix forward must give the cached loop's logits,
    and the per-image generators continue across the hand-off."""
    model, vq = tiny
    kw = dict(top_k=10, top_p=0.9, temperature=[1.1] * 4 + [1.0] * 4, seeds=[3, 4])
    expected = joined(generate_var(model, vq, [0, 6], 2.0, **kw))
    for n in range(1, len(model.patch_nums)):
        assert torch.equal(joined(generate_code(model, model, vq, [0, 6], n, 2.0, **kw)), expected), n
    with pytest.raises(ValueError, match="draft_steps"):
        generate_code(model, model, vq, [0], len(model.patch_nums), 2.0)


def test_code_refiner_takes_over_after_the_drafted_scales(tiny):
    model, vq = tiny
    refiner = random_var(model.config, seed=5)
    n = 5
    code = generate_code(model, refiner, vq, [1, 8], n, 1.5, top_k=1)
    drafted = generate_var(model, vq, [1, 8], 1.5, top_k=1)
    refined = generate_var(refiner, vq, [1, 8], 1.5, top_k=1)
    assert torch.equal(joined(code[:n]), joined(drafted[:n]))
    assert not torch.equal(joined(code[n:]), joined(drafted[n:]))
    # The refiner's scales are its greedy choice given the drafted prefix (teacher forcing on it).
    inputs = vq.quantize.codes_to_inputs(code[:-1])
    with torch.no_grad():
        cond = refiner(torch.tensor([1, 8]), inputs)
        uncond = refiner(torch.tensor([10, 10]), inputs)
    for k in range(n, len(code)):
        t = 1.5 * k / (len(code) - 1)
        rows = slice(model.ends[k] - code[k].shape[1], model.ends[k])
        assert torch.equal(((1 + t) * cond[:, rows] - t * uncond[:, rows]).argmax(-1), code[k])
    assert not torch.equal(joined(code), joined(refined))
