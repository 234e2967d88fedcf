"""Lumina-mGPT text-to-image through vLLM's engine (raster order), against the plain-PyTorch loop
over transformers' Chameleon (`model_executors/t2i_reference.py`), token for token: text prompts
built with the folder's tokenizer, guidance with the unconditional image header or a negative
prompt, end-of-line and image-end tokens placed by the engine, several sizes, decoding to pixels."""
import pytest
import torch
from conftest import t2i_reference
from tiny_models import CHAMELEON_TINY, write_tiny_lumina_folder

from vllm_visual_ar.model_executors import chameleon_t2i as lumina

GREEDY = dict(top_k=1)
PIXELS_PER_CODE = 2 ** (len(CHAMELEON_TINY["ch_mult"]) - 1)  # the tiny VQGAN's (the real one: 16)


@pytest.fixture(scope="module")
def tiny_lumina(tmp_path_factory):
    return write_tiny_lumina_folder(tmp_path_factory.mktemp("lumina"))


@pytest.fixture(scope="module")
def lumina_generator(tiny_lumina, make_generator):
    return make_generator(tiny_lumina[0], max_images_in_flight=4)


def lumina_cfg(cond, uncond, scale):
    """Lumina-mGPT's guidance, written out here (`inference_solver.py`'s CFG processor: raw logits)."""
    return uncond + scale * (cond - uncond)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_greedy_text_to_image_equals_reference(lumina_generator, tiny_lumina, guidance_scale):
    prompts = ["a red cat on a mat", "a blue dog at dusk"]
    images = lumina_generator.generate(prompts=prompts, guidance_scale=guidance_scale, **GREEDY)
    for image, text in zip(images, prompts):
        layout, expected = t2i_reference(lumina_generator, tiny_lumina[1], lumina_cfg, text, guidance_scale)
        assert (layout.rows, layout.cols) == (4, 4)  # 64 px at 16 px per code
        assert image.prompt == text and image.class_id is None
        assert torch.equal(image.codes.flatten(), layout.codes_of(expected))
        assert image.stats.tokens == layout.num_tokens == 4 * 5 + 1  # an end of line per row, the image end
        assert image.image.size == (4 * PIXELS_PER_CODE, 4 * PIXELS_PER_CODE)
    assert not torch.equal(images[0].codes, images[1].codes)  # the text matters


def test_negative_prompt_and_size(lumina_generator, tiny_lumina):
    text = "a green cat"
    plain = lumina_generator.generate(prompts=[text], guidance_scale=3.0, **GREEDY)[0]
    negative = lumina_generator.generate(prompts=[text], guidance_scale=3.0, negative_prompt="blurry low quality",
                                         **GREEDY)[0]
    layout, expected = t2i_reference(lumina_generator, tiny_lumina[1], lumina_cfg, text, 3.0,
                                     negative_prompt="blurry low quality")
    assert torch.equal(negative.codes.flatten(), layout.codes_of(expected))
    assert not torch.equal(plain.codes, negative.codes)
    wide = lumina_generator.generate(prompts=[text], guidance_scale=3.0, size="128x32", **GREEDY)[0]
    layout, expected = t2i_reference(lumina_generator, tiny_lumina[1], lumina_cfg, text, 3.0, size=(128, 32))
    assert (layout.rows, layout.cols) == (2, 8) and wide.codes.shape == (2, 8)
    assert torch.equal(wide.codes.flatten(), layout.codes_of(expected))
    assert wide.image.size == (8 * PIXELS_PER_CODE, 2 * PIXELS_PER_CODE)


def test_engine_places_end_of_line_and_image_end(lumina_generator, tiny_lumina):
    """Through plain `LLM.generate` with the documented request format: every row ends with the
    end-of-line token and the image with <eoss>, whatever the model's logits."""
    from vllm_visual_ar.requests import SamplingSettings, image_requests

    gen = lumina_generator
    reqs = image_requests(gen.config, "a cat", SamplingSettings(guidance_scale=3.0, temperature=1.0, top_k=0),
                          seed=3, tokenizer=gen.tokenizer)
    out = gen.llm.generate([p for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False)
    tokens = out[0].outputs[0].token_ids
    layout = gen.layout
    vocab = lumina.vocab_of(gen.config)
    for i, t in enumerate(tokens):
        assert t == layout.forced(i) if layout.forced(i) is not None else t in vocab.image_token_ids
    assert tokens[-1] == vocab.image_end and tokens[layout.cols] == vocab.end_of_line
    assert list(out[1].outputs[0].token_ids) == list(tokens)  # both streams carry the image


# -- ZipAR and SJD on a layout with an end of line per row ----------------------------------------------
@pytest.mark.parametrize("window,guidance_scale,size", [(2, 3.0, None), (3, 1.0, None), (4, 3.0, "128x32"),
                                                         (2, 3.0, "32x64")])
def test_zipar_equals_reference_zipar(lumina_generator, tiny_lumina, window, guidance_scale, size):
    """The engine's ZipAR equals the authors' Lumina loop over transformers' Chameleon, token for token,
    in its forward count (W + (H - 1)(w - 1)) too; ends of line are placed, never sampled."""
    from vllm_visual_ar.samplers.zipar import forward_passes

    text = "a blue dog on a mat"
    image = lumina_generator.generate(prompts=[text], guidance_scale=guidance_scale, strategy="zipar",
                                      window=window, size=size, **GREEDY)[0]
    size = None if size is None else tuple(int(v) for v in size.split("x"))
    layout, expected = t2i_reference(lumina_generator, tiny_lumina[1], lumina_cfg, text, guidance_scale, size=size,
                                     window=window)
    assert torch.equal(image.codes.flatten(), layout.codes_of(expected))
    assert image.stats.forward_passes == forward_passes(layout.rows, layout.cols, window, row_end=True)
    assert image.stats.forward_passes < layout.num_tokens
    if window > 2:  # not raster order: a different image than the raster one
        _, raster = t2i_reference(lumina_generator, tiny_lumina[1], lumina_cfg, text, guidance_scale, size=size)
        assert not torch.equal(raster, expected)


def test_zipar_window_of_a_whole_row_is_raster(lumina_generator, tiny_lumina):
    image = lumina_generator.generate(prompts=["a cat"], guidance_scale=3.0, strategy="zipar", window=9, **GREEDY)[0]
    layout, expected = t2i_reference(lumina_generator, tiny_lumina[1], lumina_cfg, "a cat", 3.0)
    assert torch.equal(image.codes.flatten(), layout.codes_of(expected))
    assert image.stats.forward_passes == layout.num_tokens  # raster: one forward per token, placed ones too


@pytest.mark.parametrize("window,sjd_window,guidance_scale,size", [(2, 4, 3.0, None), (3, 8, 1.0, None),
                                                                    (4, 3, 3.0, "128x32"), (2, 2, 3.0, "32x64")])
def test_zipar_sjd_equals_reference(lumina_generator, tiny_lumina, window, sjd_window, guidance_scale, size):
    """ZipAR x SJD on a layout with an end of line per row: the engine equals the plain loop over
    transformers' Chameleon (`t2i_reference.generate_zipar_sjd_image_tokens`), token for token and in
    its forward count; ends of line and the image end are placed, never drafted or sampled."""
    text = "a blue dog on a mat"
    image = lumina_generator.generate(prompts=[text], guidance_scale=guidance_scale, strategy="zipar_sjd",
                                      window=window, sjd_window=sjd_window, size=size, **GREEDY)[0]
    size = None if size is None else tuple(int(v) for v in size.split("x"))
    layout, expected, forwards = t2i_reference(lumina_generator, tiny_lumina[1], lumina_cfg, text, guidance_scale,
                                               size=size, window=window, sjd_window=sjd_window, forwards=True)
    assert torch.equal(image.codes.flatten(), layout.codes_of(expected))
    assert image.stats.forward_passes == forwards and image.stats.tokens == layout.num_tokens


def test_zipar_sjd_edges_are_zipar_and_sjd(lumina_generator, tiny_lumina):
    """An SJD window of 1 is ZipAR (the authors' Lumina loop, its forward count too); a ZipAR window of
    the row's width + 1 is SJD in raster order, which under greedy targets is greedy raster."""
    from vllm_visual_ar.samplers.zipar import forward_passes

    text = "a red cat at dusk"
    one = lumina_generator.generate(prompts=[text], guidance_scale=3.0, strategy="zipar_sjd", window=3,
                                    sjd_window=1, **GREEDY)[0]
    layout, zipar = t2i_reference(lumina_generator, tiny_lumina[1], lumina_cfg, text, 3.0, window=3)
    assert torch.equal(one.codes.flatten(), layout.codes_of(zipar))
    assert one.stats.forward_passes == forward_passes(layout.rows, layout.cols, 3, row_end=True)
    whole = lumina_generator.generate(prompts=[text], guidance_scale=3.0, strategy="zipar_sjd", window=5,
                                      sjd_window=4, **GREEDY)[0]
    _, raster = t2i_reference(lumina_generator, tiny_lumina[1], lumina_cfg, text, 3.0)
    assert torch.equal(whole.codes.flatten(), layout.codes_of(raster))
    assert whole.stats.forward_passes < layout.num_tokens


def test_paced_rows_place_their_ends_of_line_early_or_at_the_row_s_end(lumina_generator, tiny_lumina):
    """Load-aware ZipAR x SJD that keeps its own setting at admission starts each row only in a step
    that gains from it, by placing the end of line above early (in a speculative slot), else at the
    end of the row above. Greedy: rows free in every step give the authors' ZipAR loop (sjd_window 1)
    and ZipAR x SJD's reference; rows too costly in every step give raster order's image; steps that
    start a row only while the image has a few (sampled, through plain `LLM.generate`) place every
    end of line and the image end where the layout has them."""
    from conftest import COSTLY_ROWS, FREE_ROWS, frozen_rows, load_policy

    from vllm_visual_ar.requests import Decoding, SamplingSettings, image_requests
    from vllm_visual_ar.samplers.zipar import forward_passes

    gen, text = lumina_generator, "a red cat at dusk"
    layout, raster = t2i_reference(gen, tiny_lumina[1], lumina_cfg, text, 3.0)
    _, zipar = t2i_reference(gen, tiny_lumina[1], lumina_cfg, text, 3.0, window=3)
    _, zipar_sjd, forwards = t2i_reference(gen, tiny_lumina[1], lumina_cfg, text, 3.0, window=3, sjd_window=4,
                                           forwards=True)
    runs = {}
    for name, beta in (("free", FREE_ROWS), ("costly", COSTLY_ROWS)):
        for sjd_window in (1, 4):
            with load_policy(gen, frozen_rows(beta, keep_rows=True)):
                runs[name, sjd_window] = gen.generate(prompts=[text], guidance_scale=3.0, strategy="zipar_sjd",
                                                      window=3, sjd_window=sjd_window, load_aware=True, **GREEDY)[0]
    assert torch.equal(runs["free", 1].codes.flatten(), layout.codes_of(zipar))
    assert runs["free", 1].stats.forward_passes == forward_passes(layout.rows, layout.cols, 3, row_end=True)
    assert torch.equal(runs["free", 4].codes.flatten(), layout.codes_of(zipar_sjd))
    assert runs["free", 4].stats.forward_passes == forwards
    for sjd_window in (1, 4):
        assert torch.equal(runs["costly", sjd_window].codes.flatten(), layout.codes_of(raster))
    assert runs["costly", 1].stats.forward_passes == layout.rows * layout.cols
    assert runs["costly", 4].stats.forward_passes <= layout.rows * layout.cols
    two_rows = (5e-3, 0, 0, 1e-3, 0, 0)  # 2 streams x 1 ms a row against 5 ms steps and more: a few rows at a time
    sampling = dict(guidance_scale=3.0, temperature=1.0, top_k=50)
    for decoding in (Decoding("zipar_sjd", 3, sjd_window=1, load_aware=True),
                     Decoding("zipar_sjd", 3, sjd_window=4, load_aware=True)):
        reqs = image_requests(gen.config, "a cat", SamplingSettings(**sampling), seed=3, tokenizer=gen.tokenizer,
                              decoding=decoding)
        with load_policy(gen, frozen_rows(two_rows, keep_rows=True)):
            out = gen.llm.generate([p for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False)
        tokens = out[0].outputs[0].token_ids
        assert list(tokens) == list(out[1].outputs[0].token_ids) and len(tokens) == layout.num_tokens
        assert all(t == layout.forced(i) if layout.forced(i) is not None else t in layout.image_token_ids
                   for i, t in enumerate(tokens))


@pytest.mark.parametrize("extra", [dict(continue_after_reject=True), dict(group_acceptance=True)])
def test_sampled_zipar_sjd_places_its_tokens_and_follows_its_seed(lumina_generator, extra):
    """Sampled ZipAR x SJD (with continuation, with group acceptance): every end of line and the image
    end where the layout has them, through plain `LLM.generate`, and a seed gives the same image alone
    and beside other images."""
    from vllm_visual_ar.requests import Decoding, SamplingSettings, image_requests

    gen = lumina_generator
    sampling = dict(guidance_scale=3.0, temperature=1.0, top_k=50)
    decoding = dict(strategy="zipar_sjd", window=3, sjd_window=6, **extra)
    alone = gen.generate(prompts=["a red cat"], seed=4, **sampling, **decoding)[0]
    batch = gen.generate(prompts=["a blue dog", "a red cat", "a cat at dusk"], seed=3, **sampling, **decoding)
    assert torch.equal(batch[1].codes, alone.codes) and not torch.equal(batch[0].codes, alone.codes)
    reqs = image_requests(gen.config, "a cat", SamplingSettings(**sampling), seed=3, tokenizer=gen.tokenizer,
                          decoding=Decoding(**decoding))
    out = gen.llm.generate([p for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False)
    tokens = out[0].outputs[0].token_ids
    layout = gen.layout
    assert list(tokens) == list(out[1].outputs[0].token_ids) and len(tokens) == layout.num_tokens  # raster order
    assert all(t == layout.forced(i) if layout.forced(i) is not None else t in layout.image_token_ids
               for i, t in enumerate(tokens))


@pytest.mark.parametrize("window,init,guidance_scale,grouped", [(3, "random", 3.0, None), (16, "horizontal", 3.0, None),
                                                                (6, "random", 1.0, None), (6, "random", 3.0, True)])
def test_greedy_sjd_equals_greedy_raster(lumina_generator, tiny_lumina, window, init, guidance_scale, grouped):
    """Greedy targets make SJD greedy raster decoding: its drafts over ends of line are always
    accepted (placed), so it equals the raster reference whatever the window (and with group
    acceptance: under one-hot targets no other code is alike)."""
    text = "a red cat at dusk"
    image = lumina_generator.generate(prompts=[text], guidance_scale=guidance_scale, strategy="sjd", window=window,
                                      init=init, group_acceptance=grouped, **GREEDY)[0]
    layout, expected = t2i_reference(lumina_generator, tiny_lumina[1], lumina_cfg, text, guidance_scale)
    assert torch.equal(image.codes.flatten(), layout.codes_of(expected))
    assert image.stats.tokens == layout.num_tokens and image.stats.forward_passes < layout.num_tokens


def test_coupled_raster_and_sjd_equal_the_reference_loop_with_the_same_noise(lumina_generator, tiny_lumina):
    """Sampled, not greedy: the engine's coupled draws at every code position (ends of line and the
    image end placed) are the reference loop's, and SJD with coupled draws gives the same image."""
    from vllm_visual_ar.model_executors.t2i_reference import generate_image_tokens, transformers_next_logits
    from vllm_visual_ar.requests import prompt_pair

    gen, text = lumina_generator, "a blue cat on a mat"
    sampling = dict(guidance_scale=3.0, temperature=1.0, top_k=50)
    raster = gen.generate(prompts=[text], seed=12, coupled=True, size=(128, 32), **sampling)[0]
    sjd = gen.generate(prompts=[text], seed=12, coupled=True, size=(128, 32), strategy="sjd", window=7, **sampling)[0]
    cond, uncond, size = prompt_pair(gen.config, text, None, (128, 32), gen.tokenizer)
    layout = gen.family.image_layout(gen.config, size)
    expected = generate_image_tokens(transformers_next_logits(tiny_lumina[1]), cond, uncond, layout, lumina_cfg, 3.0,
                                     top_k=50, temperature=1.0, coupled_seed=12)
    assert torch.equal(raster.codes.flatten(), layout.codes_of(torch.tensor(expected)))
    assert torch.equal(sjd.codes, raster.codes) and sjd.stats.forward_passes < raster.stats.forward_passes


def test_strategies_and_sizes_share_a_batch(lumina_generator, tiny_lumina):
    """Raster, ZipAR and SJD requests of two sizes, guided and not, in one engine batch: every image
    equals its reference and carries its placed tokens where its own layout has them."""
    from conftest import step_until_done

    from vllm_visual_ar.requests import Decoding, SamplingSettings, image_requests

    gen = lumina_generator
    plan = [("a red cat", None, 3.0, Decoding()), ("a blue dog", (128, 32), 3.0, Decoding("zipar", 2)),
            ("a green cat", None, 1.0, Decoding("sjd", 4, "random")), ("a dog at dusk", (128, 32), 3.0,
                                                                         Decoding("sjd", 5, "horizontal")),
            ("a cat on a mat", None, 3.0, Decoding("zipar", 3)),
            ("a red dog", (128, 32), 3.0, Decoding("zipar_sjd", 2, sjd_window=4)),
            ("a blue cat", None, 1.0, Decoding("zipar_sjd", 3, sjd_window=3))]
    submit_at: dict[int, list] = {}
    for i, (text, size, scale, decoding) in enumerate(plan):
        reqs = image_requests(gen.config, text, SamplingSettings(guidance_scale=scale, **GREEDY), image_id=f"t2i{i}",
                              decoding=decoding, size=size, tokenizer=gen.tokenizer)
        for j, (prompt, sp) in enumerate(reqs):
            submit_at.setdefault(i % 3, []).append((f"t2i{i}-{j}", prompt, sp))
    done = step_until_done(gen.llm.llm_engine, submit_at)
    for i, (text, size, scale, decoding) in enumerate(plan):
        window = decoding.window if decoding.strategy in ("zipar", "zipar_sjd") else None
        layout, expected = t2i_reference(gen, tiny_lumina[1], lumina_cfg, text, scale, size=size, window=window,
                                         sjd_window=decoding.sjd_window)
        assert done[f"t2i{i}-0"].token_ids == expected.tolist(), i


@pytest.fixture(scope="module")
def enumerable_lumina(tmp_path_factory, make_generator):
    """A random tiny Lumina with a 2-code codebook, asked for 64x32 (2 rows of 4 codes, an end of
    line after each, the image end): 256 possible images."""
    folder, hf = write_tiny_lumina_folder(tmp_path_factory.mktemp("lumina2"), seed=5, codes=2)
    return make_generator(folder, max_images_in_flight=64), hf


def enumerate_lumina_images(gen, hf, text: str, guidance_scale: float, size) -> dict[tuple, float]:
    """The exact probability of every image (its codes, raster order) under raster sampling:
    transformers' Chameleon over all 256 token sequences at once, Lumina's guidance, temperature 1."""
    import itertools

    from vllm_visual_ar.requests import prompt_pair

    cond, uncond, size = prompt_pair(gen.config, text, None, size, gen.tokenizer)
    layout = gen.family.image_layout(gen.config, size)
    ids = layout.image_token_ids
    images = list(itertools.product(ids, repeat=layout.num_codes))
    seqs = []
    for codes in images:
        it = iter(codes)
        seqs.append([layout.forced(i) if layout.forced(i) is not None else next(it) for i in range(layout.num_tokens)])
    seqs = torch.tensor(seqs)
    sampled = [i for i in range(layout.num_tokens) if layout.forced(i) is None]

    def logits(prompt):
        x = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1)
        with torch.no_grad():
            out = hf.lm_head(hf.model(input_ids=x).last_hidden_state).float()
        return out[:, [len(prompt) + i - 1 for i in sampled]][..., ids.start:ids.stop]

    probs = lumina_cfg(logits(cond), logits(uncond), guidance_scale).softmax(-1)
    chosen = seqs[:, sampled] - ids.start
    joint = probs.gather(2, chosen[..., None]).squeeze(2).prod(1)
    return {tuple(c - ids.start for c in codes): float(p) for codes, p in zip(images, joint)}


@pytest.mark.parametrize("decoding", [dict(strategy="sjd", window=3), dict(strategy="sjd", window=7, init="horizontal"),
                                      dict(), dict(strategy="sjd", window=7, coupled=True),
                                      dict(strategy="sjd", window=7, continue_after_reject=True)])
def test_sampled_sjd_follows_the_exact_distribution(enumerable_lumina, decoding):
    """SJD through the engine on a text model is exact: its drafts cross the ends of line and the
    image end (placed, always accepted), and 3,000 images follow the model's raster distribution."""
    from conftest import chi_square_p

    gen, hf = enumerable_lumina
    sampling = dict(guidance_scale=2.0, temperature=1.0, top_k=0)
    images = gen.generate(prompts=["a red cat"], n=3000, seed=0, size="64x32", **sampling, **decoding)
    samples = [tuple((im.codes.flatten() - gen.layout.image_token_ids.start).tolist()) for im in images]
    exact = enumerate_lumina_images(gen, hf, "a red cat", 2.0, (64, 32))
    assert chi_square_p(samples, exact) > 1e-3


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[""]), "prompt must be non-empty"), (dict(classes=[1]), "text-to-image"),
    (dict(prompts=["a cat"], size="100x100"), "allowed"), (dict(prompts=["a cat"], size="big"), "size"),
    (dict(prompts=["a cat"], negative_prompt=""), "negative_prompt"),
    (dict(prompts=["a cat"], strategy="zipar", window=1), "window must be >= 2"),
    (dict(prompts=["a cat"], strategy="zipar_sjd", window=1), "window must be >= 2"),
    (dict(prompts=["a cat"], strategy="sjd", relaxed_delta=0.1), "relaxed"),
    (dict(prompts=["a cat"], strategy="sjd", draft_candidates=3), "draft_candidates applies to models whose"),
    (dict(prompts=["cat " * 2000]), "max_model_len|longer"),
])
def test_bad_text_to_image_input(lumina_generator, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lumina_generator.generate(**kwargs)
    assert lumina_generator.generate(prompts=["a cat"], **GREEDY)[0].stats.tokens == lumina_generator.layout.num_tokens


def test_tokens_outside_the_vocabulary_are_refused(lumina_generator):
    """A hand-made `LLM.generate` request with a token id past the vocabulary: vLLM's own clear
    error (`VLLMValidationError`) before anything runs, and the engine serves on."""
    from vllm.exceptions import VLLMValidationError

    from vllm_visual_ar.requests import SamplingSettings, image_requests

    gen = lumina_generator
    (cond, params), (uncond, uncond_params) = image_requests(gen.config, "a cat", SamplingSettings(3.0, top_k=1),
                                                             tokenizer=gen.tokenizer)
    for bad in (gen.config.vocab_size, -1):
        with pytest.raises(VLLMValidationError, match="out of vocabulary"):
            gen.llm.generate([{"prompt_token_ids": cond["prompt_token_ids"] + [bad]}, uncond], [params, uncond_params],
                             use_tqdm=False)
    assert gen.generate(prompts=["a cat"], **GREEDY)[0].stats.tokens == gen.layout.num_tokens


def test_cli_converts_and_generates_from_text(tmp_path, tiny_lumina):
    """`convert lumina` from the release files, then `generate --prompt --size` in its own process."""
    import os
    import subprocess
    import sys

    from vllm_visual_ar.cli import main

    release = [d for d in os.listdir(os.path.dirname(tiny_lumina[0])) if d.startswith("Lumina-mGPT")][0]
    root = os.path.dirname(tiny_lumina[0])
    out = str(tmp_path / "converted")
    assert main(["convert", "lumina", "--hf", os.path.join(root, release), "--vqgan-ckpt",
                 os.path.join(root, "vqgan.ckpt"), "--vqgan-yaml", os.path.join(root, "vqgan.yaml"),
                 "--out", out]) == 0
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    done = subprocess.run([sys.executable, "-m", "vllm_visual_ar.cli", "generate", "--model", out, "--prompt",
                           "a red cat", "--prompt", "a blue dog", "--size", "128x32", "--n", "1", "--seed", "0",
                           "--out", str(tmp_path / "images")], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "images")) == ["grid.png", "prompt0_0.png", "prompt1_0.png"]
    bad = subprocess.run([sys.executable, "-m", "vllm_visual_ar.cli", "generate", "--model", out, "--classes", "3",
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=600, env=env)
    assert bad.returncode == 2 and "--prompt" in bad.stderr
