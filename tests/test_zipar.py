"""ZipAR row-parallel decoding: the schedule on its own, then vLLM's engine against the plain-PyTorch
ZipAR reference (explicit masks over a raster-indexed cache), token for token under greedy decoding."""
import pytest
import torch
from conftest import finish_reasons, scheduler_of, step_until_done

from vllm_visual_ar.model_executors.llamagen_reference import generate as reference_raster
from vllm_visual_ar.model_executors.llamagen_reference import generate_zipar as reference_zipar
from vllm_visual_ar.requests import Decoding, SamplingSettings, image_requests
from vllm_visual_ar.samplers.zipar import check_window, forward_passes, zipar_schedule

GREEDY = dict(top_k=1)
BAD_WINDOWS = [0, -1, 1.5, True, "3", None]


# -- the schedule as plain logic ----------------------------------------------------------------
@pytest.mark.parametrize("height,width", [(16, 16), (8, 8), (5, 7), (2, 3), (1, 4)])
@pytest.mark.parametrize("window", [1, 2, 3, 4, 8, 16, 100])
def test_schedule_advances_every_active_row_once_per_forward(height, width, window):
    s = zipar_schedule(height, width, window)
    assert s.num_forwards == forward_passes(height, width, window)
    count = [1] + [0] * (height - 1)  # the prompt forward samples (0, 0)
    w = min(window, width)
    for t in range(1, s.num_forwards):
        fed = [s.sequence[i] for i in s.fed(t)]
        predicted = [e.predicts for e in fed if e.predicts is not None]
        rows = [p // width for p in predicted]
        active = {r for r in range(height) if 0 < count[r] < width}
        # A row joins once the row above is complete (row 1) or has `window` tokens (rows >= 2).
        joining = {r for r in range(1, height) if count[r] == 0 and count[r - 1] >= (width if r == 1 else w)}
        assert set(rows) == active | set(sorted(joining)[:1]), t
        assert len(rows) == len(set(rows))
        for p in predicted:  # each row fills its columns left to right
            assert p == (p // width) * width + count[p // width]
            count[p // width] += 1
        for e in fed:
            if e.stand_in:  # at the slot of (r, W-1), a copy of row r-1's latest token, already sampled
                r = e.raster // width
                assert e.raster == r * width + width - 1
                assert e.copy_of // width == r - 1 and e.copy_of < (r - 1) * width + count[r - 1]
    assert count == [width] * height
    assert sorted(e.raster for e in s.sequence if not e.stand_in) == list(range(height * width))
    assert s.num_stand_ins == (0 if w == width or height < 3 else height - 2)
    if window >= width:  # raster order exactly
        assert [e.raster for e in s.sequence] == list(range(height * width))


def test_forward_counts_of_the_paper_settings():
    # Row 1 waits for row 0 in the authors' LlamaGen code, so 16x16 at w=8 takes 144 forwards
    # (-43.8%), not the 136 of "W + (H-1)w".
    assert forward_passes(16, 16, 8) == 144 and forward_passes(16, 16, 16) == 256
    assert forward_passes(16, 16, 4) == 88
    assert forward_passes(24, 24, 8) == 224


@pytest.mark.parametrize("window", BAD_WINDOWS)
def test_invalid_window_is_a_value_error(window):
    with pytest.raises(ValueError, match="window"):
        check_window(window)
    with pytest.raises(ValueError, match="window"):
        Decoding("zipar", window)


# -- the engine ----------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [1, 2, 3, 5])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_engine_zipar_equals_reference_zipar(tiny_generator, tiny_model, window, guidance_scale):
    _, ref = tiny_model
    images = tiny_generator.generate([1, 7, 7], guidance_scale=guidance_scale, strategy="zipar", window=window,
                                     **GREEDY)
    expected = reference_zipar(ref, [1, 7, 7], window, guidance_scale=guidance_scale, **GREEDY)
    assert torch.equal(torch.stack([im.codes.flatten() for im in images]), expected.codes)
    grid = tiny_generator.config.image_grid
    for im in images:
        assert im.stats.forward_passes == forward_passes(grid, grid, window) == expected.forward_passes
        assert im.stats.tokens == grid * grid
        assert im.stats.tokens_per_forward == grid * grid / forward_passes(grid, grid, window)


@pytest.mark.parametrize("window", [8, 50])
def test_window_at_least_the_grid_width_is_raster_exactly(tiny_generator, tiny_model, window):
    _, ref = tiny_model
    zipar = tiny_generator.generate([4, 5], guidance_scale=2.0, strategy="zipar", window=window, **GREEDY)
    raster = tiny_generator.generate([4, 5], guidance_scale=2.0, **GREEDY)
    expected = reference_raster(ref, [4, 5], guidance_scale=2.0, **GREEDY).codes
    assert torch.equal(torch.stack([im.codes.flatten() for im in zipar]), expected)
    assert torch.equal(torch.stack([im.codes.flatten() for im in raster]), expected)
    assert [im.stats.forward_passes for im in zipar] == [64, 64]


def test_raster_and_zipar_windows_guided_and_unguided_share_a_batch(tiny_generator, tiny_model):
    """Continuous batching of mixed strategies: more images than fit, arriving at different steps
    (one pair's halves 2 steps apart); every image equals its reference run alone, tokens come
    back in raster order, and the KV cache is back to idle afterwards."""
    _, ref = tiny_model
    cfg, engine, scheduler = tiny_generator.config, tiny_generator.llm.llm_engine, scheduler_of(tiny_generator)
    idle_free = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    plan = [(0, 1, 3.0, None), (0, 2, 3.0, 2), (0, 3, 1.0, 3), (4, 4, 2.0, 1), (4, 5, 1.0, None),
            (9, 6, 3.0, 4), (9, 8, 3.0, 2), (30, 9, 1.0, 1)]
    submit_at: dict[int, list] = {}
    for i, (step, c, s, window) in enumerate(plan):
        decoding = Decoding() if window is None else Decoding("zipar", window)
        reqs = image_requests(cfg, c, SamplingSettings(guidance_scale=s, **GREEDY), image_id=f"mix{i}",
                              decoding=decoding)
        for j, (prompt, sp) in enumerate(reqs):
            submit_at.setdefault(step + (2 if (i == 1 and j == 1) else 0), []).append((f"mix{i}-{j}", prompt, sp))
    widths = []
    done = step_until_done(engine, submit_at, each_step=lambda: widths.append(len(scheduler.running)))
    assert max(widths) == 2 * 4  # the engine was full: images waited for room
    for i, (_, c, s, window) in enumerate(plan):
        if window is None:
            expected = reference_raster(ref, [c], guidance_scale=s, **GREEDY).codes[0]
        else:
            expected = reference_zipar(ref, [c], window, guidance_scale=s, **GREEDY).codes[0]
        assert torch.equal(torch.tensor(done[f"mix{i}-0"].token_ids), expected), i
        if s != 1.0:
            assert done[f"mix{i}-1"].token_ids == done[f"mix{i}-0"].token_ids
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == idle_free


def test_odd_grid_equals_reference(tmp_path, make_generator):
    from tiny_models import tiny_config, write_tiny_model

    ref = write_tiny_model(tmp_path / "grid5", tiny_config(grid=5), seed=3)
    gen = make_generator(str(tmp_path / "grid5"), max_images_in_flight=3)
    for window in (1, 2, 4):
        got = gen.generate([0, 6, 9], guidance_scale=2.5, strategy="zipar", window=window, **GREEDY)
        expected = reference_zipar(ref, [0, 6, 9], window, guidance_scale=2.5, **GREEDY)
        assert torch.equal(torch.stack([im.codes.flatten() for im in got]), expected.codes), window
        assert got[0].stats.forward_passes == forward_passes(5, 5, window)


def test_abort_mid_image_frees_the_pair(tiny_generator):
    cfg, engine, scheduler = tiny_generator.config, tiny_generator.llm.llm_engine, scheduler_of(tiny_generator)
    idle_free = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    reqs = image_requests(cfg, 5, SamplingSettings(guidance_scale=4.0), image_id="zabort",
                          decoding=Decoding("zipar", 2))
    for i, (prompt, sp) in enumerate(reqs):
        engine.add_request(f"zabort-{i}", prompt, sp)
    for _ in range(12):  # past row 1, rows running in parallel
        engine.step()
    assert len(scheduler.running) == 2
    assert scheduler.running[0].num_computed_tokens > 12  # several tokens per forward
    engine.abort_request(["zabort-1"])  # the uncond half
    step_until_done(engine, max_steps=20)
    assert not scheduler.requests and not scheduler.running
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == idle_free


def test_sampled_zipar_is_reproducible_by_seed(tiny_generator):
    sampling = dict(guidance_scale=3.0, temperature=1.0, top_k=20, top_p=0.9, strategy="zipar", window=2)
    alone = tiny_generator.generate([3], seed=21, **sampling)[0].codes
    again = tiny_generator.generate([3], seed=21, **sampling)[0].codes
    batch = tiny_generator.generate([1, 3, 5], seed=20, **sampling)  # class 3 is image 1 -> seed 21
    other = tiny_generator.generate([3], seed=22, **sampling)[0].codes
    assert torch.equal(alone, again) and torch.equal(alone, batch[1].codes)
    assert not torch.equal(alone, other)
    assert ((alone >= 0) & (alone < tiny_generator.config.codebook_size)).all()
    # Sharing the batch with raster images and other windows does not change it either.
    cfg = tiny_generator.config
    settings = SamplingSettings(guidance_scale=3.0, temperature=1.0, top_k=20, top_p=0.9)
    reqs = image_requests(cfg, 3, settings, seed=21, decoding=Decoding("zipar", 2))
    reqs += image_requests(cfg, 4, settings, seed=5) + image_requests(cfg, 6, settings, seed=6,
                                                                      decoding=Decoding("zipar", 3))
    outs = tiny_generator.llm.generate([p for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False)
    assert torch.equal(torch.tensor(outs[0].outputs[0].token_ids), alone.flatten())


@pytest.mark.parametrize("window", BAD_WINDOWS)
def test_generate_rejects_bad_windows(tiny_generator, window):
    with pytest.raises(ValueError, match="window"):
        tiny_generator.generate([1], strategy="zipar", window=window)
    with pytest.raises(ValueError, match="strategy"):
        tiny_generator.generate([1], strategy="zigzag")


@pytest.mark.parametrize("case", ["window 0", "strategy unknown", "logprobs", "short max_tokens", "halves differ"])
def test_bad_zipar_requests_finish_with_an_error(tiny_generator, tiny_model, case):
    """Plain LLM.generate users can hand-write bad ZipAR requests: each finishes with an error, none
    hangs, and the engine keeps producing exact images."""
    cfg, engine = tiny_generator.config, tiny_generator.llm.llm_engine
    cond, uncond = image_requests(cfg, 2, SamplingSettings(guidance_scale=3.0), image_id=f"zbad-{case}",
                                  decoding=Decoding("zipar", 2))
    for _, sp in (cond, uncond):
        args = sp.extra_args["visual_ar"]
        if case == "window 0":
            args["window"] = 0
        elif case == "strategy unknown":
            args["strategy"] = "zigzag"
        elif case == "logprobs":
            sp.logprobs = 3
        elif case == "short max_tokens":
            sp.max_tokens = sp.min_tokens = 10
    if case == "halves differ":
        uncond[1].extra_args["visual_ar"]["window"] = 3
    finished = finish_reasons(engine, (cond, uncond), f"zbad-{case}")
    assert set(finished.values()) == {"error"}, finished
    _, ref = tiny_model
    image = tiny_generator.generate([2], guidance_scale=3.0, strategy="zipar", window=2, **GREEDY)[0]
    expected = reference_zipar(ref, [2], 2, guidance_scale=3.0, **GREEDY).codes[0]
    assert torch.equal(image.codes.flatten(), expected)
