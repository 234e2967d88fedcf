"""ZipAR x SJD: the row bookkeeping on its own, then vLLM's engine against the plain-PyTorch reference
(`llamagen_reference.generate_zipar_sjd`: its own reading of the rules, a cache in feeding order and
an explicit mask), token for token under greedy decoding, where the drafts are deterministic."""
import random

import pytest
import torch
from conftest import scheduler_of, step_until_done

from vllm_visual_ar.model_executors.llamagen_reference import generate as reference_raster
from vllm_visual_ar.model_executors.llamagen_reference import generate_zipar as reference_zipar
from vllm_visual_ar.model_executors.llamagen_reference import generate_zipar_sjd as reference_zipar_sjd
from vllm_visual_ar.requests import Decoding, SamplingSettings, image_requests
from vllm_visual_ar.samplers.zipar import zipar_schedule
from vllm_visual_ar.samplers.zipar_sjd import Wavefront

GREEDY = dict(top_k=1)


# -- the rows as plain logic ---------------------------------------------------------------------
def run_wavefront(height, width, window, jacobi, rng, row_end=False, image_end=0):
    """Drive a Wavefront with random acceptance; -> (appended entries per forward, drafts per forward)."""
    front = Wavefront(height, width, window, jacobi, row_end, image_end)
    forwards = [front.start()]
    drafts = []
    while not front.done:
        chains = front.chains()
        drafts.append(sum(c.drafts for c in chains))
        assert front.draft_count() == drafts[-1] <= front.widest_drafts()
        assert len(front.pending) + drafts[-1] <= front.widest_step()
        forwards.append(front.commit({c.row: rng.randint(1, c.most) for c in chains}))
    return forwards, drafts


@pytest.mark.parametrize("height,width", [(8, 8), (5, 7), (2, 3), (1, 4), (16, 16)])
@pytest.mark.parametrize("window", [1, 2, 3, 8, 100])
@pytest.mark.parametrize("jacobi", [1, 2, 5])
def test_rows_fill_the_image_and_never_outrun_the_row_above(height, width, window, jacobi):
    rng = random.Random(height * 100 + width * 10 + window + jacobi)
    for _ in range(3):
        forwards, _ = run_wavefront(height, width, window, jacobi, rng)
        entries = [e for f in forwards for e in f]
        codes = sorted(e.raster for e in entries if not e.stand_in)
        assert codes == list(range(height * width))
        stand_ins = [e for e in entries if e.stand_in]
        assert len(stand_ins) == Wavefront(height, width, window, jacobi).stand_ins
        # Each row's codes arrive left to right; a code (r, c) arrives no earlier than the forward
        # after the one that committed (r-1, min(c + window, width) - 1): what ZipAR shows it.
        arrived = {e.raster: t for t, f in enumerate(forwards) for e in f if not e.stand_in}
        for r in range(1, height):
            for c in range(width):
                assert arrived[r * width + c] > arrived[(r - 1) * width + min(c + window, width) - 1]
                if c:
                    assert arrived[r * width + c] >= arrived[r * width + c - 1]


@pytest.mark.parametrize("height,width", [(8, 8), (5, 7), (16, 16), (2, 3)])
@pytest.mark.parametrize("window", [1, 2, 3, 8, 100])
def test_a_sjd_window_of_one_is_zipar_s_schedule(height, width, window):
    forwards, drafts = run_wavefront(height, width, window, 1, random.Random(0))
    schedule = zipar_schedule(height, width, window)
    assert not any(drafts)
    assert len(forwards) == schedule.num_forwards
    ours = [(e.raster, e.copy_of) for f in forwards for e in f]
    assert ours == [(e.raster, e.copy_of) for e in schedule.sequence]


@pytest.mark.parametrize("height,width", [(4, 4), (5, 7), (2, 3), (1, 4), (8, 8)])
@pytest.mark.parametrize("window", [2, 3, 5, 100])
@pytest.mark.parametrize("jacobi", [1, 2, 5])
def test_rows_that_end_with_an_end_of_line(height, width, window, jacobi):
    """Lumina-mGPT's and Emu3's layout: every row's end of line is placed once the row has window - 1
    codes (every row, row 1 included) and starts the row below; the last row's end of line and the
    image end come with its last code; no stand-ins; a code (r, c) arrives only after the forward that
    committed (r-1, c + window - 2), what ZipAR's Lumina-mGPT rule shows it."""
    stride, image_end = width + 1, 3
    rng = random.Random(height * 100 + width * 10 + window + jacobi)
    for _ in range(3):
        forwards, _ = run_wavefront(height, width, window, jacobi, rng, row_end=True, image_end=image_end)
        entries = [e for f in forwards for e in f]
        assert not any(e.stand_in for e in entries) and not any(e.placed for e in forwards[0])
        assert sorted(e.raster for e in entries) == list(range(height * stride + image_end))
        placed = {e.raster for e in entries if e.placed}
        assert placed == {r * stride + width for r in range(height)} | set(range(height * stride, height * stride + 3))
        arrived = {e.raster: t for t, f in enumerate(forwards) for e in f}
        lag = min(window, stride) - 1
        for r in range(1, height):
            # the end of line above arrives with the lag-th code of its row (the prompt's forward places
            # nothing) and before the row below
            eol = arrived[(r - 1) * stride + width]
            assert eol == max(1, arrived[(r - 1) * stride + lag - 1]) < arrived[r * stride]
            for c in range(width):
                assert arrived[r * stride + c] > arrived[(r - 1) * stride + min(c + lag, width) - 1]
        assert arrived[height * stride + image_end - 1] == arrived[height * stride - 2] == len(forwards) - 1


@pytest.mark.parametrize("height,width", [(4, 4), (5, 7), (2, 3), (8, 8)])
@pytest.mark.parametrize("window", [2, 3, 5, 100])
def test_a_sjd_window_of_one_is_zipar_s_schedule_with_ends_of_line(height, width, window):
    forwards, drafts = run_wavefront(height, width, window, 1, random.Random(0), row_end=True, image_end=2)
    schedule = zipar_schedule(height, width, window, True, 2)
    assert not any(drafts)
    assert len(forwards) == schedule.num_forwards
    assert [e.raster for f in forwards for e in f] == [e.raster for e in schedule.sequence]
    assert [e.placed for f in forwards for e in f] == [e.placed for e in schedule.sequence]


def run_paced(height, width, window, jacobi, rng, chance, p_open, row_end=False, image_end=0):
    """Drive a paced Wavefront (rows start when `open` is called: here with probability `p_open` where
    one may, drawn from `chance`) with random acceptance (from `rng`); -> (appended entries per
    forward, the row start each fed or None)."""
    front = Wavefront(height, width, window, jacobi, row_end, image_end, paced=True)
    forwards, opened = [front.start()], [None]
    while not front.done:
        assert len(forwards) <= height * width, "a row stalled"
        opened.append(front.open() if front.opening() is not None and chance.random() < p_open else None)
        chains = front.chains()
        assert len(front.fed) + front.draft_count() <= front.widest_step()
        assert front.draft_count() + (front.opened is not None) <= front.widest_drafts() + 1
        forwards.append(front.commit({c.row: rng.randint(1, c.most) for c in chains}))
    return forwards, opened


@pytest.mark.parametrize("height,width,row_end", [(8, 8, False), (5, 7, False), (16, 16, False), (2, 3, False),
                                                  (4, 4, True), (5, 7, True), (8, 8, True)])
@pytest.mark.parametrize("window", [1, 2, 3, 5, 100])
@pytest.mark.parametrize("jacobi", [1, 2, 5])
def test_paced_rows_start_when_opened_and_otherwise_at_the_row_above_s_end(height, width, row_end, window, jacobi):
    """Paced rows (load-aware): opened at every chance, they are the unpaced wavefront forward for
    forward (a row start moves from the end of one forward's entries to the head of the next's), but
    where a row (not the first) completes in the forward that brings it to the window: the unpaced
    rows then start the next by a stand-in, paced ones hand over as in raster order (it cannot
    happen at sjd_window <= width - window, nor at sjd_window 1, ZipAR). Never opened, raster order;
    opened now and then, every slot comes once, at most the unpaced stand-ins, and no code before
    what ZipAR shows it."""
    if row_end and window < 2:
        return
    seed = height * 1000 + width * 100 + window * 10 + jacobi
    stride, image_end = width + row_end, 2 * row_end
    key = lambda e: (e.raster, e.copy_of, e.heads, e.placed)  # noqa: E731
    if row_end or window >= width or jacobi <= width - window:
        plain = run_wavefront(height, width, window, jacobi, random.Random(seed), row_end, image_end)[0]
        paced, opened = run_paced(height, width, window, jacobi, random.Random(seed), random.Random(0), 1.0,
                                  row_end, image_end)
        assert len(paced) == len(plain)
        arrived = set()
        for t in range(len(plain)):
            arrived |= {e.raster for e in plain[t] if not e.stand_in}
            # a row started before the row above is complete: a stand-in, or an end of line whose row's
            # last code has not arrived
            early = [e for e in plain[t] if e.stand_in or (
                e.placed and e.raster % stride == width and e.raster < (height - 1) * stride
                and e.raster - 1 not in arrived)]
            rest = paced[t][1:] if opened[t] is not None else paced[t]
            assert sorted(map(key, rest)) == sorted(key(e) for e in plain[t] if e not in early)
            assert [key(e) for e in early] == ([key(opened[t + 1])] if t + 1 < len(plain) and opened[t + 1] else [])
    never, _ = run_paced(height, width, window, jacobi, random.Random(seed), random.Random(0), 0.0, row_end, image_end)
    assert [e.raster for f in never for e in f] == list(range(height * stride + image_end))
    rng, chance = random.Random(seed), random.Random(seed + 1)
    for _ in range(3):
        forwards, _ = run_paced(height, width, window, jacobi, rng, chance, 0.3, row_end, image_end)
        entries = [e for f in forwards for e in f]
        assert sorted(e.raster for e in entries if not e.stand_in) == list(range(height * stride + image_end))
        assert sum(e.stand_in for e in entries) <= Wavefront(height, width, window, jacobi, row_end).stand_ins
        when = {e.raster: t for t, f in enumerate(forwards) for e in f if not e.stand_in}
        lag = min(window, stride) - 1 if row_end else window
        for r in range(1, height):
            for c in range(width):
                assert when[r * stride + c] > when[(r - 1) * stride + min(c + lag, width) - 1]


# -- the engine ----------------------------------------------------------------------------------
@pytest.mark.parametrize("window,jacobi", [(1, 3), (2, 2), (2, 8), (3, 4), (8, 5)])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_engine_equals_reference(tiny_generator, tiny_model, window, jacobi, guidance_scale):
    _, ref = tiny_model
    classes = [1, 7, 4]
    images = tiny_generator.generate(classes, guidance_scale=guidance_scale, strategy="zipar_sjd", window=window,
                                     sjd_window=jacobi, **GREEDY)
    for c, im in zip(classes, images):
        expected = reference_zipar_sjd(ref, c, window, jacobi, guidance_scale=guidance_scale, **GREEDY)
        assert torch.equal(im.codes.flatten(), expected.codes[0]), c
        assert im.stats.forward_passes == expected.forward_passes
        assert (im.stats.draft_tokens, im.stats.accepted_drafts) == expected.extra["drafts"]
        assert im.stats.tokens == tiny_generator.config.image_grid ** 2


def test_a_sjd_window_of_one_is_zipar_and_wider_ones_take_fewer_forwards(tiny_generator, tiny_model):
    _, ref = tiny_model
    one = tiny_generator.generate([2, 5], guidance_scale=3.0, strategy="zipar_sjd", window=2, sjd_window=1,
                                  **GREEDY)
    zipar = tiny_generator.generate([2, 5], guidance_scale=3.0, strategy="zipar", window=2, **GREEDY)
    expected = reference_zipar(ref, [2, 5], 2, guidance_scale=3.0, **GREEDY)
    assert torch.equal(torch.stack([im.codes.flatten() for im in one]), expected.codes)
    assert [im.stats.forward_passes for im in one] == [im.stats.forward_passes for im in zipar]
    wide = tiny_generator.generate([2, 5], guidance_scale=3.0, strategy="zipar_sjd", window=2, sjd_window=8,
                                   **GREEDY)
    assert all(w.stats.forward_passes < o.stats.forward_passes for w, o in zip(wide, one))


def test_group_acceptance_accepts_more_and_is_exact_zipar_sjd_under_greedy_targets(tiny_generator, tiny_model):
    _, ref = tiny_model
    image = tiny_generator.generate([3], guidance_scale=3.0, strategy="zipar_sjd", window=2, sjd_window=8,
                                    group_acceptance=True, **GREEDY)[0]
    assert torch.equal(image.codes.flatten(), reference_zipar_sjd(ref, 3, 2, 8, guidance_scale=3.0, **GREEDY).codes[0])
    sampling = dict(guidance_scale=2.0, temperature=1.0, top_k=0, strategy="zipar_sjd", window=2, sjd_window=8,
                    seed=7)
    exact = tiny_generator.generate(list(range(8)), **sampling)
    grouped = tiny_generator.generate(list(range(8)), group_acceptance=True, **sampling)
    assert sum(i.stats.accepted_drafts for i in grouped) > sum(i.stats.accepted_drafts for i in exact)
    assert sum(i.stats.forward_passes for i in grouped) < sum(i.stats.forward_passes for i in exact)


def test_every_strategy_shares_a_batch(tiny_generator, tiny_model):
    """Continuous batching: zipar_sjd beside raster, zipar and sjd (one with sibling slots), guided and not, arriving at
    different steps (one pair's halves 2 steps apart), more images than fit; every image equals its
    reference run alone and the KV cache is back to idle afterwards."""
    _, ref = tiny_model
    cfg, engine, scheduler = tiny_generator.config, tiny_generator.llm.llm_engine, scheduler_of(tiny_generator)
    idle_free = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    plan = [(0, 1, 3.0, Decoding("zipar_sjd", 2, sjd_window=4)), (0, 2, 3.0, Decoding("sjd", 6)),
            (0, 3, 1.0, Decoding("zipar_sjd", 3, sjd_window=8)), (3, 4, 2.0, Decoding("zipar", 2)),
            (3, 5, 1.0, Decoding()), (7, 6, 3.0, Decoding("zipar_sjd", 1, sjd_window=2)),
            (12, 8, 2.0, Decoding("zipar_sjd", 8, sjd_window=3)), (12, 9, 2.0, Decoding("sjd", 5, draft_candidates=3))]
    submit_at: dict[int, list] = {}
    for i, (step, c, s, decoding) in enumerate(plan):
        reqs = image_requests(cfg, c, SamplingSettings(guidance_scale=s, **GREEDY), image_id=f"zs{i}",
                              decoding=decoding.fitted(cfg))
        for j, (prompt, sp) in enumerate(reqs):
            submit_at.setdefault(step + (2 if (i == 0 and j == 1) else 0), []).append((f"zs{i}-{j}", prompt, sp))
    widths = []
    done = step_until_done(engine, submit_at, each_step=lambda: widths.append(len(scheduler.running)))
    assert max(widths) == 2 * 4  # the engine was full: images waited for room
    for i, (_, c, s, decoding) in enumerate(plan):
        if decoding.strategy == "zipar_sjd":
            expected = reference_zipar_sjd(ref, c, decoding.window, decoding.sjd_window, guidance_scale=s,
                                           **GREEDY).codes[0]
        elif decoding.strategy == "zipar":
            expected = reference_zipar(ref, [c], decoding.window, guidance_scale=s, **GREEDY).codes[0]
        else:
            expected = reference_raster(ref, [c], guidance_scale=s, **GREEDY).codes[0]
        assert torch.equal(torch.tensor(done[f"zs{i}-0"].token_ids), expected), i
        if s != 1.0:
            assert done[f"zs{i}-1"].token_ids == done[f"zs{i}-0"].token_ids
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == idle_free


def test_sampled_images_are_reproducible_by_seed_in_any_batch(tiny_generator):
    sampling = dict(guidance_scale=3.0, temperature=1.0, top_k=20, top_p=0.9, strategy="zipar_sjd", window=2,
                    sjd_window=4)
    alone = tiny_generator.generate([3], seed=21, **sampling)[0].codes
    batch = tiny_generator.generate([1, 3, 5], seed=20, **sampling)  # class 3 is image 1 -> seed 21
    other = tiny_generator.generate([3], seed=22, **sampling)[0].codes
    assert torch.equal(alone, batch[1].codes) and not torch.equal(alone, other)
    random_init = tiny_generator.generate([3], seed=21, init="random", continue_after_reject=True, **sampling)
    assert ((random_init[0].codes >= 0) & (random_init[0].codes < tiny_generator.config.codebook_size)).all()


def test_abort_mid_image_frees_the_pair(tiny_generator):
    cfg, engine, scheduler = tiny_generator.config, tiny_generator.llm.llm_engine, scheduler_of(tiny_generator)
    idle_free = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    reqs = image_requests(cfg, 5, SamplingSettings(guidance_scale=4.0), image_id="zsabort",
                          decoding=Decoding("zipar_sjd", 2, sjd_window=3))
    for i, (prompt, sp) in enumerate(reqs):
        engine.add_request(f"zsabort-{i}", prompt, sp)
    for _ in range(8):  # past row 1, rows running in parallel
        engine.step()
    assert len(scheduler.running) == 2
    engine.abort_request(["zsabort-0"])
    step_until_done(engine, max_steps=20)
    assert not scheduler.requests and not scheduler.running
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == idle_free


@pytest.mark.parametrize("kwargs,field", [
    (dict(window=2, sjd_window=0), "sjd_window"), (dict(window=2, sjd_window=1.5), "sjd_window"),
    (dict(window=2, sjd_window=True), "sjd_window"), (dict(window=2, sjd_window="3"), "sjd_window"),
    (dict(sjd_window=4), "window"), (dict(window=2, init="vertical"), "init"),
    (dict(window=2, coupled=True), "coupled"), (dict(window=2, relaxed_delta=0.1), "relaxed_delta")])
def test_bad_arguments_are_value_errors(tiny_generator, kwargs, field):
    with pytest.raises(ValueError, match=field):
        tiny_generator.generate([1], strategy="zipar_sjd", **kwargs)


def test_sjd_window_belongs_to_zipar_sjd():
    with pytest.raises(ValueError, match="sjd_window applies to strategy 'zipar_sjd' only"):
        Decoding("sjd", 4, sjd_window=2)
