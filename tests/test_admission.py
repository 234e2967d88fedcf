"""Admission that cannot be blocked, and validation that is total, offline (`admission.py`,
`requests.py`): an image the engine can never hold is refused at once, a large waiting image
neither blocks smaller ones nor starves, over-long windows act as the longest useful one, and
every argument is checked before the engine is touched."""
import math

import pytest
import torch

from conftest import scheduler_of, step_until_done
from vllm_visual_ar.admission import Need, admit, cannot_fit
from vllm_visual_ar.requests import MAX_SEED, Decoding, SamplingSettings, image_requests

TIGHT_TOKENS = 40  # the tight engine's step budget: an SJD window of 40 takes all of it
TIGHT_IMAGES = 4


@pytest.fixture(scope="module")
def tight(tiny_model, make_generator):
    folder, _ = tiny_model
    return make_generator(folder, max_images_in_flight=TIGHT_IMAGES, max_num_batched_tokens=TIGHT_TOKENS)


def _raw(cfg, class_id, decoding=Decoding(), guidance_scale=1.0, seed=None, window=None):
    """Hand-made requests as a plain LLM.generate user sends them (window set after the fact)."""
    reqs = image_requests(cfg, class_id, SamplingSettings(guidance_scale=guidance_scale), seed, decoding=decoding)
    for _, sp in reqs:
        if window is not None:
            sp.extra_args["visual_ar"]["window"] = window
    return reqs


# -- the rule alone ------------------------------------------------------------------------------
def test_admit_lets_small_groups_pass_a_big_one_a_bounded_number_of_times():
    big, small = Need(1, 10, 1), Need(1, 1, 1)
    room = Need(100, 5, 100)
    overtaken = {}
    assert admit([("big", big), ("a", small), ("b", small)], room, overtaken, max_overtakes=3) == ["a", "b"]
    assert overtaken == {"big": 2}
    assert admit([("big", big), ("c", small), ("d", small)], room, overtaken, max_overtakes=3) == ["c"]
    assert overtaken == {"big": 3}
    assert admit([("big", big), ("d", small)], room, overtaken, max_overtakes=3) == []  # d waits now
    assert admit([("big", big), ("d", small)], Need(100, 12, 100), overtaken, 3) == ["big", "d"]
    assert overtaken == {}


def test_cannot_fit_names_every_limit_it_exceeds():
    room = Need(8, 40, 10)
    assert cannot_fit(Need(2, 40, 10), room) is None
    message = cannot_fit(Need(9, 41, 11), room)
    assert "max_num_seqs" in message and "max_num_batched_tokens" in message and "KV cache blocks" in message


# -- the engine ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(strategy="sjd", window=64, guidance_scale=1.0),
                                    dict(strategy="sjd", window=10**9, guidance_scale=1.0),
                                    dict(strategy="sjd", window=30, guidance_scale=2.0)])
def test_an_image_the_engine_can_never_hold_is_a_value_error_at_once(tight, kwargs):
    with pytest.raises(ValueError, match="can never be scheduled.*max_num_batched_tokens"):
        tight.generate([3], **kwargs)
    assert not scheduler_of(tight).requests  # nothing reached the engine
    assert len(tight.generate([3], strategy="sjd", window=20, guidance_scale=2.0)) == 1  # 40 tokens: fits


def test_an_unschedulable_raw_request_fails_at_once_and_the_others_run(tight):
    cfg, engine = tight.config, tight.llm.llm_engine
    for i, (p, sp) in enumerate(_raw(cfg, 1, Decoding("sjd", 8), window=10**9)):  # clamped to 64 > 40 tokens
        engine.add_request(f"big-{i}", p, sp)
    others = {0: [(f"ok{k}-{i}", p, sp) for k in range(3) for i, (p, sp) in enumerate(_raw(cfg, k, guidance_scale=2.0))]}
    first = {out.request_id: out for out in engine.step()}
    assert first["big-0"].finished and first["big-0"].outputs[0].finish_reason == "error"
    done = step_until_done(engine, others, max_steps=200)
    for k in range(3):
        assert done[f"ok{k}-0"].finish_reason == "length" and len(done[f"ok{k}-0"].token_ids) == cfg.num_image_tokens


def test_a_large_waiting_image_is_overtaken_a_bounded_number_of_times_then_runs(tight):
    """An SJD image that needs the whole step budget waits behind a running one; raster images
    arriving every other step go past it, max_num_seqs of them, then the engine drains and it runs."""
    cfg, engine, scheduler = tight.config, tight.llm.llm_engine, scheduler_of(tight)
    submitted = {0: [("first-0", *_raw(cfg, 0)[0]), ("big-0", *_raw(cfg, 1, Decoding("sjd", TIGHT_TOKENS))[0])]}
    smalls = 3 * TIGHT_IMAGES
    for k in range(smalls):
        submitted[2 * k + 1] = [(f"small{k}-0", *_raw(cfg, k % 10)[0])]
    started: list[str] = []

    def watch():
        for r in scheduler.running:
            name = r.request_id.rsplit("-", 1)[0]  # vLLM appends a suffix of its own
            if name not in started:
                started.append(name)

    done = step_until_done(engine, submitted, each_step=watch)
    assert len(done) == smalls + 2 and all(out.finish_reason == "length" for out in done.values())
    passed = started.index("big-0") - 1  # smalls admitted before it ("first" was running already)
    assert passed == scheduler.max_num_running_reqs < smalls, started


def test_sjd_window_beyond_the_image_is_the_whole_image_window(tiny_generator):
    cfg, engine = tiny_generator.config, tiny_generator.llm.llm_engine
    runs = {}
    for window in (cfg.num_image_tokens, 10**9):
        reqs = _raw(cfg, 4, Decoding("sjd", 8), guidance_scale=2.0, seed=7, window=window)
        done = step_until_done(engine, {0: [(f"w{window}-{i}", p, sp) for i, (p, sp) in enumerate(reqs)]})
        runs[window] = done[f"w{window}-0"].token_ids
    assert len(runs[10**9]) == cfg.num_image_tokens and runs[10**9] == runs[cfg.num_image_tokens]
    images = [tiny_generator.generate([4], strategy="sjd", window=w, seed=7)[0].codes for w in (64, 10**9)]
    assert torch.equal(*images)


def test_seeds_are_32_bit_and_distinct_seeds_give_distinct_images(tiny_generator):
    top = tiny_generator.generate([5], n=2, seed=MAX_SEED - 1)  # seeds 2**32 - 2 and 2**32 - 1
    low = tiny_generator.generate([5], n=2, seed=0)
    codes = [im.codes for im in top + low]
    assert all(not torch.equal(codes[i], codes[j]) for i in range(4) for j in range(i))
    for seed, n in ((MAX_SEED + 1, 1), (2**63, 1), (2**70, 1), (MAX_SEED, 2), (1.5, 1), (True, 1)):
        with pytest.raises(ValueError, match="seed must be an integer in"):
            tiny_generator.generate([5], n=n, seed=seed)


@pytest.mark.parametrize("kwargs", [
    dict(guidance_scale=math.nan), dict(guidance_scale=math.inf), dict(guidance_scale=1e9),
    dict(temperature=math.nan), dict(temperature=math.inf), dict(temperature=2.5), dict(top_p=math.nan), dict(timeout=math.nan),
    dict(timeout=0), dict(strategy="sjd", relaxed_delta=math.nan), dict(top_k=1.5),
])
def test_non_finite_or_out_of_range_numbers_are_value_errors(tiny_generator, kwargs):
    with pytest.raises(ValueError):
        tiny_generator.generate([1], **kwargs)
    assert not scheduler_of(tiny_generator).requests


def test_extreme_but_valid_settings_give_images(tiny_generator):
    for kwargs in (dict(guidance_scale=100.0), dict(temperature=2.0), dict(temperature=1e-9),
                   dict(top_p=1e-300), dict(top_k=10**12), dict(strategy="sjd", window=10**12, top_k=10**12),
                   dict(strategy="zipar", window=10**12), dict(strategy="sjd", relaxed_delta=1.0, relaxed_neighbours=10**9)):
        codes = tiny_generator.generate([1], seed=3, **kwargs)[0].codes
        assert 0 <= int(codes.min()) and int(codes.max()) < tiny_generator.config.codebook_size, kwargs


def test_a_timeout_aborts_the_images_and_frees_their_kv(tiny_generator):
    scheduler = scheduler_of(tiny_generator)
    idle_free = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    with pytest.raises(TimeoutError, match="aborted"):
        tiny_generator.generate(list(range(10)), n=4, guidance_scale=2.0, timeout=0.05)
    tiny_generator.llm.llm_engine.step()  # the aborts take effect in the engine's next step
    assert not scheduler.requests
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == idle_free
    assert len(tiny_generator.generate([2], timeout=60)) == 1


@pytest.mark.parametrize("argv,named", [
    (["--seed", str(2**70)], "seed"), (["--seed", str(2**32)], "seed"), (["--guidance-scale", "nan"], "guidance"),
    (["--guidance-scale", "inf"], "guidance"), (["--temperature", "1e999"], "temperature"),
    (["--top-p", "nan"], "top_p"), (["--sjd-window", "4"], "sjd_window"),
    (["--strategy", "zipar_sjd", "--window", "4", "--sjd-window", "0"], "sjd_window"),
    (["--strategy", "sjd", "--coupled", "--group-acceptance"], "group_acceptance"),
    (["--group-acceptance"], "group_acceptance")])
def test_cli_rejects_the_same_inputs_with_exit_code_2(argv, named, capsys):
    from vllm_visual_ar.cli import main

    assert main(["generate", "--classes", "3", "--n", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and named in err
