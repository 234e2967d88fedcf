"""VAR (next-scale prediction) in vLLM's engine against the plain-PyTorch reference loop
(`model_executors/var_reference.py::generate_var`), token for token."""
import pytest
import torch
from conftest import finish_reasons, scheduler_of, step_until_done
from tiny_models import tiny_var_config, write_official_var_checkpoints, write_tiny_code_folder

from vllm_visual_ar.model_executors.var_reference import generate_var
from vllm_visual_ar.requests import Decoding, SamplingSettings, image_requests

GREEDY = dict(top_k=1)


@pytest.fixture(scope="module")
def tiny_var(tmp_path_factory):
    """(folder, reference, vq): a random tiny VAR in the release layout, converted by the plugin."""
    from vllm_visual_ar.model_executors.convert import convert_var

    root = tmp_path_factory.mktemp("var")
    config = tiny_var_config()
    (reference,), vq, (var_pth, vae_pth) = write_official_var_checkpoints(root, config)
    folder = convert_var(str(var_pth), str(vae_pth), str(root / "converted"), patch_nums=config.patch_nums)
    return folder, reference, vq


@pytest.fixture(scope="module")
def var_generator(tiny_var, make_generator):
    return make_generator(tiny_var[0], max_images_in_flight=4)


def reference_codes(tiny_var, classes, guidance_scale, seeds=None, **sampling):
    _, reference, vq = tiny_var
    return torch.cat(generate_var(reference, vq, classes, guidance_scale, seeds=seeds, **sampling), dim=1)


@pytest.mark.parametrize("classes,guidance_scale", [([3], 0.0), ([3], 1.5), ([0, 1, 2, 5, 7, 9], 4.0),
                                                    ([2, 2, 8], 0.0)])
def test_greedy_var_equals_reference_loop(var_generator, tiny_var, classes, guidance_scale):
    images = var_generator.generate(classes, guidance_scale=guidance_scale, **GREEDY)
    got = torch.stack([im.codes for im in images])
    assert torch.equal(got, reference_codes(tiny_var, classes, guidance_scale, **GREEDY))
    cfg = var_generator.config
    for im in images:  # one forward per scale, counted from the engine's per-step outputs
        assert (im.stats.tokens, im.stats.forward_passes) == (cfg.num_image_tokens, cfg.num_scales)
        assert im.stats.streams == (2 if guidance_scale != 0 else 1)


@pytest.mark.parametrize("guidance_scale,sampling", [(2.0, dict(top_k=0, top_p=1.0, temperature=1.0)),
                                                     (1.0, dict(top_k=8, top_p=0.9, temperature=1.3)),
                                                     (0.0, dict(top_k=0, top_p=0.8, temperature=0.7))])
def test_seeded_sampling_equals_reference_loop(var_generator, tiny_var, guidance_scale, sampling):
    """Every scale draws its codes from the image's own generator, as the reference does: the same
    seed gives the same image, and the engine's images are the reference's draw for draw."""
    classes = [1, 4, 4, 6, 8]
    images = var_generator.generate(classes, guidance_scale=guidance_scale, seed=11, **sampling)
    got = torch.stack([im.codes for im in images])
    expected = reference_codes(tiny_var, classes, guidance_scale, seeds=[11 + i for i in range(len(classes))],
                               **sampling)
    assert torch.equal(got, expected)
    assert len({tuple(c.tolist()) for c in got}) > 1


def test_seed_gives_the_same_image_alone_and_under_load(var_generator):
    alone = var_generator.generate([5], guidance_scale=1.5, seed=99)[0].codes  # the folder's defaults
    crowd = var_generator.generate([1, 2, 3, 4, 6, 5], guidance_scale=1.5, seed=94)
    assert torch.equal(crowd[5].codes, alone)


def test_staggered_arrivals_mixed_guidance_and_abort(var_generator, tiny_var):
    """More images than fit, arriving over several steps, guided and unguided, one aborted half-way:
    the others equal the reference; the aborted pair frees its KV."""
    cfg = var_generator.config
    engine = var_generator.llm.llm_engine
    jobs = [(3, 0.0), (4, 1.5), (5, 4.0), (6, 0.0), (7, 2.0), (8, 1.5), (9, 0.5)]
    submit = {}
    for i, (c, s) in enumerate(jobs):
        settings = SamplingSettings(guidance_scale=s, unguided_scale=0.0, **GREEDY)
        reqs = image_requests(cfg, c, settings, image_id=f"var{i}")
        submit.setdefault(i // 2, []).extend((f"var{i}-{sp.extra_args['visual_ar']['role']}", p, sp)
                                             for p, sp in reqs)
    victim = image_requests(cfg, 1, SamplingSettings(guidance_scale=2.0, unguided_scale=0.0, **GREEDY),
                            image_id="victim")
    submit[0] += [(f"victim-{sp.extra_args['visual_ar']['role']}", p, sp) for p, sp in victim]
    steps = [0]

    def abort_victim():
        steps[0] += 1
        if steps[0] == 2:
            engine.abort_request(["victim-cond"])

    done = step_until_done(engine, submit, each_step=abort_victim)
    for i, (c, s) in enumerate(jobs):
        role = "single" if s == 0 else "cond"
        assert torch.equal(torch.tensor(done[f"var{i}-{role}"].token_ids),
                           reference_codes(tiny_var, [c], s, **GREEDY)[0]), (c, s)
    assert done["victim-uncond"].finish_reason == "abort"
    assert scheduler_of(var_generator).kv_cache_manager.usage == 0


def test_bad_var_requests_finish_with_an_error(var_generator):
    cfg = var_generator.config
    settings = SamplingSettings(guidance_scale=1.5, unguided_scale=0.0)
    zipar = image_requests(cfg, 2, settings, image_id="vz")
    for _, sp in zipar:
        sp.extra_args["visual_ar"].update(strategy="zipar", window=2)
    short = image_requests(cfg, 2, SamplingSettings(guidance_scale=0.0, unguided_scale=0.0), image_id="vs")
    short[0][1].max_tokens = short[0][1].min_tokens = 5
    reasons = finish_reasons(var_generator.llm.llm_engine, zipar + short, "varbad")
    assert set(reasons.values()) == {"error"}
    with pytest.raises(ValueError, match="strategy"):
        var_generator.generate([1], strategy="zipar", window=2)
    good = var_generator.generate([2], guidance_scale=1.5, **GREEDY)
    assert good[0].stats.tokens == cfg.num_image_tokens


def test_decoded_images_match_the_reference_vqvae(var_generator, tiny_var):
    _, _, vq = tiny_var
    image = var_generator.generate([3], guidance_scale=1.5, **GREEDY)[0]
    expected = vq.decode_codes(image.codes[None])
    assert image.image.size == (expected.shape[-1], expected.shape[-2])


# -- CoDe: a drafter for the first scales, a refiner for the rest ----------------------------------
@pytest.fixture(scope="module")
def tiny_code(tmp_path_factory):
    return write_tiny_code_folder(tmp_path_factory.mktemp("code"))


@pytest.fixture(scope="module")
def code_generator(tiny_code, make_generator):
    return make_generator(tiny_code[0], max_images_in_flight=4)


def reference_code(tiny_code, classes, guidance_scale, draft_steps, seeds=None, **sampling):
    from vllm_visual_ar.model_executors.var_reference import generate_code

    _, drafter, refiner, vq = tiny_code
    if draft_steps is None:
        return torch.cat(generate_var(drafter, vq, classes, guidance_scale, seeds=seeds, **sampling), dim=1)
    return torch.cat(generate_code(drafter, refiner, vq, classes, draft_steps, guidance_scale, seeds=seeds,
                                   **sampling), dim=1)


@pytest.mark.parametrize("draft_steps", [None, 1, 2, 3])
@pytest.mark.parametrize("guidance_scale", [0.0, 2.0])
def test_greedy_code_equals_reference(code_generator, tiny_code, draft_steps, guidance_scale):
    classes = [0, 4, 9]
    strategy = dict(strategy="code", draft_steps=draft_steps) if draft_steps else {}
    images = code_generator.generate(classes, guidance_scale=guidance_scale, **strategy, **GREEDY)
    got = torch.stack([im.codes for im in images])
    assert torch.equal(got, reference_code(tiny_code, classes, guidance_scale, draft_steps, **GREEDY))
    # drafter steps, one hand-off forward over the drafted prefix, refiner steps: one per scale
    assert all(im.stats.forward_passes == code_generator.config.num_scales for im in images)


def test_seeded_code_equals_reference(code_generator, tiny_code):
    classes = [2, 3, 3, 7]
    sampling = dict(top_k=0, top_p=1.0, temperature=1.0)
    images = code_generator.generate(classes, guidance_scale=1.5, seed=5, strategy="code", draft_steps=2, **sampling)
    expected = reference_code(tiny_code, classes, 1.5, 2, seeds=[5, 6, 7, 8], **sampling)
    assert torch.equal(torch.stack([im.codes for im in images]), expected)


def test_per_scale_settings_equal_reference(code_generator, tiny_code):
    """CoDe's convention: top-k, top-p and temperature given per scale (here all three differ from
    scale to scale, one scale greedy), drawn as the reference loop draws them."""
    classes = [1, 6, 8]
    sampling = dict(top_k=[0, 3, 5, 0], top_p=[1.0, 0.9, 1.0, 0.7], temperature=[1.1, 0.0, 1.3, 1.0])
    images = code_generator.generate(classes, guidance_scale=1.5, seed=11, strategy="code", draft_steps=2, **sampling)
    expected = reference_code(tiny_code, classes, 1.5, 2, seeds=[11, 12, 13], **sampling)
    assert torch.equal(torch.stack([im.codes for im in images]), expected)
    plain = code_generator.generate(classes, guidance_scale=1.5, seed=11, strategy="code", draft_steps=2,
                                    top_k=0, top_p=1.0, temperature=1.0)
    assert not torch.equal(torch.stack([im.codes for im in plain]), expected)  # the lists did something


def test_bad_per_scale_settings(code_generator):
    with pytest.raises(ValueError, match="3 values for this model's 4 scales"):
        code_generator.generate([1], top_k=[1, 2, 3])
    with pytest.raises(ValueError, match=r"temperature\[1\] must be"):
        code_generator.generate([1], temperature=[1.0, -1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="non-empty list"):
        code_generator.generate([1], top_p=[])
    cfg = code_generator.config
    raw = image_requests(cfg, 2, SamplingSettings(guidance_scale=0.0, unguided_scale=0.0), image_id="sbad")
    raw[0][1].extra_args["visual_ar"]["scale_sampling"] = {"top_k": [1, 2]}
    raw2 = image_requests(cfg, 3, SamplingSettings(guidance_scale=0.0, unguided_scale=0.0), image_id="sbad2")
    raw2[0][1].extra_args["visual_ar"]["scale_sampling"] = {"min_p": [0.1] * 4}
    assert set(finish_reasons(code_generator.llm.llm_engine, raw + raw2, "scalebad").values()) == {"error"}
    assert code_generator.generate([2], top_k=[1] * 4)[0].stats.tokens == cfg.num_image_tokens


def test_code_phases_share_the_engine_with_staggered_arrivals(code_generator, tiny_code):
    """Images at every draft_steps, guided and not, drafter-only among them, arriving over several
    steps and more than fit at once: drafter- and refiner-phase images alternate in the engine and
    each equals its reference."""
    cfg = code_generator.config
    jobs = [(c, s, n) for c, (s, n) in enumerate([(0.0, 1), (2.0, 2), (1.5, None), (3.0, 3), (0.0, 2),
                                                  (2.0, 1), (0.5, 3), (2.0, None)])]
    submit = {}
    for c, s, n in jobs:
        decoding = Decoding("code", draft_steps=n) if n else Decoding()
        reqs = image_requests(cfg, c, SamplingSettings(guidance_scale=s, unguided_scale=0.0, **GREEDY),
                              image_id=f"code{c}", decoding=decoding)
        submit.setdefault(c // 3, []).extend((f"code{c}-{sp.extra_args['visual_ar']['role']}", p, sp)
                                             for p, sp in reqs)
    done = step_until_done(code_generator.llm.llm_engine, submit)
    for c, s, n in jobs:
        got = torch.tensor(done[f"code{c}-{'single' if s == 0 else 'cond'}"].token_ids)
        assert torch.equal(got, reference_code(tiny_code, [c], s, n, **GREEDY)[0]), (c, s, n)
    assert scheduler_of(code_generator).kv_cache_manager.usage == 0


def test_bad_draft_steps(code_generator, var_generator):
    k = code_generator.config.num_scales
    for n in (0, k, True, "2"):
        with pytest.raises(ValueError, match="draft_steps"):
            code_generator.generate([1], strategy="code", draft_steps=n)
    with pytest.raises(ValueError, match="refiner"):
        var_generator.generate([1], strategy="code", draft_steps=1)
    with pytest.raises(ValueError, match="draft_steps"):
        code_generator.generate([1], draft_steps=2)  # without strategy "code"
    cfg = code_generator.config
    raw = image_requests(cfg, 2, SamplingSettings(guidance_scale=1.5, unguided_scale=0.0), image_id="cbad")
    for _, sp in raw:
        sp.extra_args["visual_ar"].update(strategy="code", draft_steps=k)
    assert set(finish_reasons(code_generator.llm.llm_engine, raw, "codebad").values()) == {"error"}
    assert code_generator.generate([2], strategy="code", draft_steps=1, **GREEDY)[0].stats.tokens == cfg.num_image_tokens


def test_code_abort_in_the_refiner_phase_frees_both_models_kv(code_generator):
    """An image aborted after its hand-off (refiner phase) frees its blocks; the next image runs."""
    cfg = code_generator.config
    engine = code_generator.llm.llm_engine
    reqs = image_requests(cfg, 4, SamplingSettings(guidance_scale=2.0, unguided_scale=0.0, **GREEDY),
                          image_id="cabort", decoding=Decoding("code", draft_steps=1))
    submit = {0: [(f"cabort-{sp.extra_args['visual_ar']['role']}", p, sp) for p, sp in reqs]}
    steps = [0]

    def abort_after_hand_off():
        steps[0] += 1
        if steps[0] == 3:  # forward 0: drafter (scale 0); 1: hand-off; 2: refiner scale 2
            engine.abort_request(["cabort-uncond"])

    done = step_until_done(engine, submit, each_step=abort_after_hand_off)
    assert done["cabort-cond"].finish_reason == "abort"
    assert 0 < len(done["cabort-cond"].token_ids) < cfg.num_image_tokens
    assert scheduler_of(code_generator).kv_cache_manager.usage == 0


def test_code_holds_each_models_kv_only_in_its_phase(tmp_path, make_generator):
    """CoDe's memory saving in vLLM's block pool (`phase_kv.py`), on a schedule long enough (67
    tokens) to span several 32-token blocks: a CoDe image holds the drafter's blocks until its
    hand-off and none after it; a drafter-only image never holds refiner blocks; neither ever holds
    more than the scheduler reserved for it, both reserve less than the two models' KV for every
    position, and the images are still exact."""
    from vllm_visual_ar import phase_kv
    from vllm_visual_ar.admission import image_need

    tiny_code = write_tiny_code_folder(tmp_path, patch_nums=(1, 2, 3, 4, 6))
    gen = make_generator(tiny_code[0], max_images_in_flight=2, block_size=32)
    cfg, engine, scheduler = gen.config, gen.llm.llm_engine, scheduler_of(gen)
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    assert sorted(m.kv_cache_spec.phase for m in managers) == ["drafter", "drafter", "refiner"]
    n = 2
    code = image_requests(cfg, 4, SamplingSettings(guidance_scale=0.0, unguided_scale=0.0, **GREEDY),
                          image_id="kvcode", decoding=Decoding("code", draft_steps=n))
    plain = image_requests(cfg, 5, SamplingSettings(guidance_scale=0.0, unguided_scale=0.0, **GREEDY),
                           image_id="kvplain")
    submit = {0: [("kvcode", *code[0]), ("kvplain", *plain[0])]}
    held, reserved = {"kvcode": [], "kvplain": []}, {}

    def watch():
        for r in scheduler.running:
            by_phase = {"drafter": 0, "refiner": 0}
            for m in managers:
                by_phase[m.kv_cache_spec.phase] += sum(not b.is_null for b in m.req_to_blocks.get(r.request_id, ()))
            name = r.request_id.rsplit("-", 1)[0]  # vLLM suffixes the ids it is given
            held[name].append((r.num_output_tokens, by_phase["drafter"], by_phase["refiner"]))
            reserved[name] = scheduler._tracked[r.request_id].need.kv_blocks

    done = step_until_done(engine, submit, each_step=watch)
    assert torch.equal(torch.tensor(done["kvcode"].token_ids), reference_code(tiny_code, [4], 0.0, n, **GREEDY)[0])
    assert torch.equal(torch.tensor(done["kvplain"].token_ids), reference_code(tiny_code, [5], 0.0, None, **GREEDY)[0])
    drafted = 1 + 4  # scales 0 and 1
    assert all(d > 0 and r > 0 for out, d, r in held["kvcode"] if out <= drafted)
    assert all(d == 0 and r > 0 for out, d, r in held["kvcode"] if out > drafted)  # after the hand-off
    assert any(out > drafted for out, _, _ in held["kvcode"])
    assert all(r == 0 for _, _, r in held["kvplain"])
    for rid in held:
        assert max(d + r for _, d, r in held[rid]) <= reserved[rid]
    layout = phase_kv.group_layout(scheduler.kv_cache_config)
    assert sorted(layout) == sorted(phase_kv.expected_layout(cfg.kv_phases, 32))  # what the frontends assume
    assert image_need(cfg, Decoding("code", draft_steps=n), False, 32).kv_blocks == reserved["kvcode"]
    unphased = phase_kv.blocks_needed(layout, 1 + cfg.num_image_tokens, None)
    assert reserved["kvcode"] < unphased and reserved["kvplain"] < unphased
    assert scheduler.kv_cache_manager.usage == 0


def test_folder_missing_its_refiner_is_refused(tiny_code, tmp_path):
    import shutil

    from vllm_visual_ar.generator import ImageGenerator

    folder = shutil.copytree(tiny_code[0], tmp_path / "no-refiner")
    shutil.rmtree(folder / "refiner")
    with pytest.raises(ValueError, match="refiner"):
        ImageGenerator(str(folder))


@pytest.mark.parametrize("variant", [dict(shared_aln=True), dict(attn_l2_norm=False)])
def test_var_variants_equal_reference(variant, tmp_path, make_generator):
    """VAR-d36's shared AdaLN, and attention without L2-normalised q/k, through converter and engine."""
    from vllm_visual_ar.model_executors.convert import convert_var

    config = tiny_var_config(patch_nums=(1, 2, 4), **variant)
    (reference,), vq, (var_pth, vae_pth) = write_official_var_checkpoints(tmp_path, config)
    folder = convert_var(str(var_pth), str(vae_pth), str(tmp_path / "converted"), patch_nums=config.patch_nums,
                         num_heads=config.num_heads)
    engine = make_generator(folder, max_images_in_flight=2)
    assert all(getattr(engine.config, k) == v for k, v in variant.items())
    images = engine.generate([1, 8], guidance_scale=2.0, **GREEDY)
    expected = torch.cat(generate_var(reference, vq, [1, 8], 2.0, **GREEDY), dim=1)
    assert torch.equal(torch.stack([im.codes for im in images]), expected)
