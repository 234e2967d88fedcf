"""The HTTP server: `vllm-visual-ar serve` (vLLM's OpenAI server with the plugin) started as a real
subprocess on a loopback port with the embedded model, talked to over HTTP and with the official
`openai` client."""
import asyncio
import base64
import io
import re
import time

import httpx
import pytest
from PIL import Image


STEP_TOKENS = 384  # the server's step budget: a guided SJD image with a window over 192 can never run


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from vllm_visual_ar.launch import running_server

    log = str(tmp_path_factory.mktemp("serve") / "server.log")
    with running_server(log, extra_args=("--max-num-batched-tokens", str(STEP_TOKENS))) as url:
        yield url


def generate(url: str, http_timeout: float = 120, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=http_timeout)


def png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def metric(url: str, name: str, **labels) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(
                f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_openai_client_generates_pngs(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    model = client.models.list().data[0].id
    result = client.images.generate(model=model, prompt="seven", n=2, size="32x32", response_format="b64_json",
                                    extra_body={"seed": 3, "guidance_scale": 2.0})
    assert result.created > 0 and len(result.data) == 2
    images = [png(d.b64_json) for d in result.data]
    assert all(im.size == (32, 32) and im.format == "PNG" for im in images)
    assert images[0].tobytes() != images[1].tobytes()  # seeds 3 and 4
    zipar = client.images.generate(model=model, prompt="3", extra_body={"strategy": "zipar", "window": 4, "seed": 1})
    assert png(zipar.data[0].b64_json).size == (32, 32)
    sjd = client.images.generate(model=model, prompt="3", extra_body={"strategy": "sjd", "window": 8,
                                                                      "init": "horizontal", "seed": 1})
    assert png(sjd.data[0].b64_json).size == (32, 32)


def test_health_models_and_metrics(server):
    assert httpx.get(f"{server}/health").status_code == 200
    models = httpx.get(f"{server}/v1/models").json()
    assert models["data"][0]["id"].endswith("llamagen_mnist")
    for decoding in (dict(strategy="zipar", window=4), dict(strategy="zipar_sjd", window=8, sjd_window=8)):
        before = metric(server, "vllm_visual_ar:image_forward_passes_count", strategy=decoding["strategy"])
        assert generate(server, prompt="1", **decoding).status_code == 200
        assert metric(server, "vllm_visual_ar:image_forward_passes_count", strategy=decoding["strategy"]) == before + 1
    for decoding in (dict(strategy="sjd", window=8), dict(strategy="zipar_sjd", window=4, sjd_window=8),
                     dict(strategy="sjd", window=8, group_acceptance=True),
                     dict(strategy="sjd", window=8, draft_candidates=3)):
        drafts = metric(server, "vllm_visual_ar:sjd_draft_tokens_total")
        assert generate(server, prompt="1", **decoding).status_code == 200
        assert metric(server, "vllm_visual_ar:sjd_draft_tokens_total") > drafts, decoding
    assert 0 <= metric(server, "vllm_visual_ar:sjd_accepted_tokens_total") <= metric(
        server, "vllm_visual_ar:sjd_draft_tokens_total")
    windows = metric(server, "vllm_visual_ar:sjd_step_window_count")
    pinned = metric(server, "vllm_visual_ar:sjd_step_window_sum")
    assert generate(server, prompt="2", strategy="sjd", window=8, init="horizontal").status_code == 200
    steps = metric(server, "vllm_visual_ar:sjd_step_window_count") - windows  # a pinned window counts too
    assert 0 < steps < metric(server, "vllm_visual_ar:sjd_step_window_sum") - pinned <= 8 * steps
    windows += steps
    assert generate(server, prompt="2", n=4, strategy="sjd", window=16, load_aware=True).status_code == 200
    assert metric(server, "vllm_visual_ar:sjd_step_window_count") > windows  # the windows the steps ran at
    assert metric(server, "vllm_visual_ar:sjd_step_window_sum") <= 16 * metric(server,
                                                                               "vllm_visual_ar:sjd_step_window_count")
    zipar = metric(server, "vllm_visual_ar:zipar_window_count")
    assert generate(server, prompt="3", strategy="zipar", window=8, load_aware=True).status_code == 200
    assert metric(server, "vllm_visual_ar:zipar_window_count") == zipar + 1  # the window the image ran at, once
    # Load-aware ZipAR x SJD: its window once per image (whether it kept its own setting or fell back
    # to ZipAR's rows or raster order), never as an SJD step's window.
    windows = metric(server, "vllm_visual_ar:sjd_step_window_count")
    assert generate(server, prompt="3", strategy="zipar_sjd", window=8, sjd_window=8, load_aware=True).status_code == 200
    assert metric(server, "vllm_visual_ar:zipar_window_count") == zipar + 2
    assert metric(server, "vllm_visual_ar:sjd_step_window_count") == windows
    text = httpx.get(f"{server}/metrics").text
    assert "vllm:num_requests_running" in text  # vLLM's own metrics are still there
    assert re.search(r'vllm_visual_ar:image_forward_passes_bucket\{le="128.0",strategy="zipar"\} [1-9]', text)


def test_streaming_sends_partial_images_then_the_image(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    events = list(client.images.generate(prompt="eight", stream=True, partial_images=2, extra_body={"seed": 9}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    first = png(events[0].b64_json)
    assert first.size == (32, 32)
    assert first.crop((0, 24, 32, 32)).getextrema() == (0, 0)  # rows not generated yet are black
    plain = generate(server, prompt="eight", seed=9).json()
    assert events[-1].b64_json == plain["data"][0]["b64_json"]  # same seed, same image


BAD = [
    ("{bad json", None), ("[1, 2]", None), ({}, "prompt"), ({"prompt": "eleven"}, "prompt"),
    ({"prompt": 10}, "prompt"), ({"prompt": -1}, "prompt"), ({"prompt": ["3"]}, "prompt"),
    ({"prompt": True}, "prompt"), ({"prompt": "3", "n": 0}, "n"), ({"prompt": "3", "n": -2}, "n"),
    ({"prompt": "3", "n": 17}, "n"), ({"prompt": "3", "n": "2"}, "n"), ({"prompt": "3", "n": 1.5}, "n"),
    ({"prompt": "3", "size": "64x64"}, "size"), ({"prompt": "3", "size": "big"}, "size"),
    ({"prompt": "3", "response_format": "url"}, "response_format"),
    ({"prompt": "3", "output_format": "jpeg"}, "output_format"),
    ({"prompt": "3", "strategy": "zigzag"}, "strategy"), ({"prompt": "3", "strategy": 5}, "strategy"),
    ({"prompt": "3", "strategy": "zipar", "window": 0}, "window"),
    ({"prompt": "3", "strategy": "zipar", "window": -3}, "window"),
    ({"prompt": "3", "strategy": "zipar"}, "window"), ({"prompt": "3", "strategy": "zipar", "window": "4"}, "window"),
    ({"prompt": "3", "window": 4}, "window"), ({"prompt": "3", "strategy": "sjd", "window": 0}, "window"),
    ({"prompt": "3", "strategy": "sjd", "init": "vertical"}, "init"), ({"prompt": "3", "init": "random"}, "init"),
    ({"prompt": "3", "strategy": "sjd", "relaxed_delta": 2}, "relaxed_delta"),
    ({"prompt": "3", "coupled": "yes"}, "coupled"), ({"prompt": "3", "strategy": "zipar", "window": 2, "coupled": True},
                                                     "coupled"),
    ({"prompt": "3", "strategy": "sjd", "relaxed_delta": 0.1, "coupled": True}, "coupled"),
    ({"prompt": "3", "continue_after_reject": True}, "continue_after_reject"),
    ({"prompt": "3", "load_aware": True}, "load_aware"), ({"prompt": "3", "strategy": "sjd", "load_aware": 1},
                                                          "load_aware"),
    ({"prompt": "3", "strategy": "sjd", "continue_after_reject": True, "coupled": True}, "continue_after_reject"),
    ({"prompt": "3", "strategy": "zipar_sjd", "window": 4, "sjd_window": 0}, "sjd_window"),
    ({"prompt": "3", "sjd_window": 4}, "sjd_window"),
    ({"prompt": "3", "group_acceptance": True}, "group_acceptance"),
    ({"prompt": "3", "strategy": "sjd", "group_acceptance": True, "relaxed_delta": 0.1}, "group_acceptance"),
    ({"prompt": "3", "strategy": "sjd", "draft_candidates": 9}, "draft_candidates"),
    ({"prompt": "3", "draft_candidates": 2}, "draft_candidates"),
    ({"prompt": "3", "strategy": "sjd", "draft_candidates": 2, "load_aware": True}, "draft_candidates"),
    ({"prompt": "3", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "3", "guidance_scale": "high"}, "guidance_scale"), ({"prompt": "3", "seed": -1}, "seed"),
    ({"prompt": "3", "seed": "abc"}, "seed"), ({"prompt": "3", "temperature": -0.5}, "temperature"),
    ({"prompt": "3", "top_p": 0}, "top_p"), ({"prompt": "3", "top_k": -5}, "top_k"),
    ({"prompt": "3", "top_k": [1] * 5}, "top_k"),  # one value per scale: VAR models only
    ({"prompt": "3", "negative_prompt": "blurry"}, "negative_prompt"), ({"prompt": "3", "steps": 50}, "steps"),
    ({"prompt": "3", "stream": "yes"}, "stream"), ({"prompt": "3", "stream": True, "n": 2}, "n"),
    ({"prompt": "3", "partial_images": 5}, "partial_images"),
    ({"prompt": "3", "extra_params": {"strategy": "zipar", "window": 0}}, "window"),
    ({"prompt": "3", "extra_params": "x"}, "extra_params"),
    ({"prompt": "3", "extra_params": {"steps": 2}}, "extra_params.steps"),
]


def test_bad_input_is_a_400_naming_the_field_and_the_server_keeps_serving(server):
    assert len(BAD) >= 25
    for body, param in BAD:
        if isinstance(body, str):
            r = httpx.post(f"{server}/v1/images/generations", content=body,
                           headers={"Content-Type": "application/json"}, timeout=30)
        else:
            r = generate(server, **body)
        assert r.status_code == 400, (body, r.status_code, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"], (body, error)
        good = generate(server, prompt="2", seed=0)
        assert good.status_code == 200 and png(good.json()["data"][0]["b64_json"]).size == (32, 32)
    r = generate(server, prompt="3", model="gpt-image-1")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_openapi_shows_the_images_request(server):
    assert httpx.get(f"{server}/docs", timeout=10).status_code == 200
    operation = httpx.get(f"{server}/openapi.json", timeout=10).json()["paths"]["/v1/images/generations"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    fields = schema["properties"]
    assert set(fields) == {
        "prompt", "model", "n", "size", "response_format", "output_format", "stream", "partial_images", "user",
        "extra_params", "seed", "guidance_scale", "temperature", "top_k", "top_p", "strategy", "window", "init",
        "relaxed_delta", "relaxed_neighbours", "draft_steps", "coupled", "continue_after_reject", "load_aware",
        "sjd_window", "group_acceptance", "draft_candidates", "negative_prompt", "timeout"}
    assert schema["required"] == ["prompt"] and schema["additionalProperties"] is False
    assert {t["type"] for t in fields["prompt"]["anyOf"]} == {"string", "integer"}
    assert fields["n"]["type"] == "integer" and (fields["n"]["default"], fields["n"]["minimum"],
                                                 fields["n"]["maximum"]) == (1, 1, 16)
    assert fields["response_format"]["const"] == "b64_json" and fields["size"]["default"] == "auto"
    assert (fields["stream"]["type"], fields["stream"]["default"]) == ("boolean", False)
    assert {"type": "array", "items": {"type": "number"}} in fields["temperature"]["anyOf"]  # per scale
    assert "window" in fields and "description" in fields["window"] and "description" in fields["prompt"]
    extra = next(t for t in fields["extra_params"]["anyOf"] if t.get("type") == "object")
    assert {"window", "strategy", "seed", "timeout"} <= set(extra["properties"]) and "prompt" not in extra["properties"]
    assert "$ref" not in str(operation["requestBody"])  # whole, not pointing into $defs it does not have


@pytest.mark.parametrize("body,param,expected", [
    ({"n": "two"}, "n", "'n' must be an integer"), ({"n": True}, "n", "'n' must be an integer"),
    ({"guidance_scale": "x"}, "guidance_scale", "'guidance_scale' must be a number"),
    ({"stream": "yes"}, "stream", "'stream' must be a boolean"),
    ({"seed": 1.5}, "seed", "'seed' must be an integer"),
    ({"top_k": {"0": 1}}, "top_k", "'top_k' must be an integer or a list"),
    ({"temperature": [1.0, "hot"]}, "temperature", "'temperature[1]' must be a number"),
    ({"extra_params": {"window": "4"}}, "extra_params.window", "'extra_params.window' must be an integer"),
    ({"extra_params": [1]}, "extra_params", "'extra_params' must be an object"),
    ({"prompt": None}, "prompt", "'prompt' is required"), ({"prompt": 1.5}, "prompt", "'prompt' must be a string"),
    ({"response_format": "url"}, "response_format", "b64_json"),
    ({"steps": 2}, "steps", "unrecognized"), ({"extra_params": {"n": 2}}, "extra_params.n", "unrecognized"),
])
def test_a_value_of_the_wrong_type_is_a_400_naming_the_field_and_its_type(server, body, param, expected):
    r = generate(server, **{"prompt": "3", **body})
    assert_openai_error(r, 400, param)
    assert expected in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"


def test_32_concurrent_mixed_requests_complete_and_seeds_hold_under_load(server):
    strategies = [{}, {"strategy": "zipar", "window": 8}, {"strategy": "sjd", "window": 8},
                  {"strategy": "zipar", "window": 2}, {"strategy": "sjd", "window": 16, "init": "horizontal"}]
    scales = [1.0, 2.0, 3.0]
    bodies = [dict(prompt=str(i % 10), seed=100 + i, guidance_scale=scales[i % 3], n=1 + (i % 2),
                   **strategies[i % 5]) for i in range(32)]
    # ZipAR w=8 (guided, n=1) and SJD w=8 (guided, n=2) requests on an idle server
    alone = {i: generate(server, **bodies[i]).json() for i in (6, 7)}

    async def all_at_once():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(client.post(f"{server}/v1/images/generations", json=b) for b in bodies))

    responses = asyncio.run(all_at_once())
    for body, r in zip(bodies, responses):
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert len(data) == body["n"] and all(png(d["b64_json"]).size == (32, 32) for d in data)
    for i in (6, 7):
        assert responses[i].json()["data"] == alone[i]["data"]


def test_client_disconnect_aborts_its_images_and_frees_kv(server):
    finished = metric(server, "vllm:request_success_total", finished_reason="length")
    with pytest.raises(httpx.TimeoutException):
        generate(server, http_timeout=0.5, prompt="4", n=16, guidance_scale=2.0)  # 32 streams, ~2 s of work
    deadline = time.time() + 20
    while time.time() < deadline:
        if (metric(server, "vllm:num_requests_running") == 0 and metric(server, "vllm:num_requests_waiting") == 0
                and metric(server, "vllm:kv_cache_usage_perc") == 0):
            break
        time.sleep(0.2)
    assert metric(server, "vllm:kv_cache_usage_perc") == 0
    assert metric(server, "vllm:request_success_total", finished_reason="length") < finished + 32  # aborted
    assert generate(server, prompt="4").status_code == 200


# -- robustness: nothing a client sends may stall the server, crash it or get a 500 ------------------
def post_raw(url: str, content: bytes | str, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", content=content, timeout=timeout,
                      headers={"Content-Type": "application/json"})


def assert_openai_error(r: httpx.Response, status: int | None = None, param="any"):
    assert 400 <= r.status_code < 500 and (status is None or r.status_code == status), (r.status_code, r.text)
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    assert "param" in error and "code" in error
    assert param == "any" or error["param"] == param, error


def test_inputs_from_the_issue_are_4xx_and_the_server_keeps_serving(server):
    for body, param in [({"prompt": "7", "seed": 2**70}, "seed"), ({"prompt": "7", "seed": 2**63}, "seed"),
                        ({"prompt": "7", "seed": 2**62}, "seed"), ({"prompt": "7", "timeout": 0}, "timeout"),
                        ({"prompt": "7", "strategy": "zipar", "window": True}, "window"),
                        ({"prompt": "\u00b2"}, "prompt"), ({"prompt": "7" * 1001}, "prompt")]:
        assert_openai_error(generate(server, **body), 400, param)
    for raw, param in [('{"prompt": "7", "guidance_scale": 1e999}', "guidance_scale"),
                       ('{"prompt": "7", "guidance_scale": NaN}', "guidance_scale"),
                       ('{"prompt": "7", "temperature": Infinity}', "temperature"),
                       ('{"prompt": "7", "top_p": -Infinity}', "top_p"),
                       ('{"prompt": "7", "seed": ' + "9" * 5000 + "}", None),
                       ("[" * 100_000 + "]" * 100_000, None), ('{"prompt": ' + "[" * 2000 + "]" * 2000 + "}", "prompt"),
                       ('{"prompt": "7", "extra_params": {"seed": ' + "{" * 50 + "}" * 50 + "}}", None),
                       (b"\xff\xfe", None), ("", None), ("null", None), ('"7"', None), ("3", None)]:
        r = post_raw(server, raw)
        assert_openai_error(r, 400)
        assert param is None or r.json()["error"]["param"] in (param, None), (raw[:60], r.text)
    assert_openai_error(post_raw(server, '{"prompt": "' + "7" * (2 << 20) + '"}'), 413)
    assert generate(server, prompt="7", seed=0).status_code == 200


def test_distinct_seeds_give_distinct_images(server):
    seeds = [0, 1, 2**31, 2**32 - 2]
    images = [generate(server, prompt="5", seed=s, n=2 if s == 2**32 - 2 else 1).json()["data"] for s in seeds]
    pngs = [d["b64_json"] for group in images for d in group]
    assert len(set(pngs)) == len(pngs) == 5
    assert_openai_error(generate(server, prompt="5", seed=2**32 - 1, n=2), 400, "seed")  # seed + 1 is out of range


def test_coupled_draws_give_one_image_in_raster_order_and_with_sjd(server):
    bodies = [dict(coupled=True), dict(strategy="sjd", window=8, coupled=True),
              dict(extra_params={"strategy": "sjd", "window": 16, "init": "horizontal", "coupled": True})]
    images = [generate(server, prompt="4", seed=9, n=2, **b).json()["data"] for b in bodies]
    assert [d["b64_json"] for d in images[0]] == [d["b64_json"] for d in images[1]] == [d["b64_json"] for d in images[2]]
    assert images[0][0]["b64_json"] != images[0][1]["b64_json"]  # image i uses seed + i


def test_an_unschedulable_request_is_refused_at_once_and_does_not_delay_others(server):
    """The issue's stall: an SJD window of 10**9 used to hold the head of the queue for ever. It acts
    as a whole-image window (256 tokens per stream), which a guided image cannot fit in this
    server's step budget: refused at once. A ZipAR window of 10**9 is raster order and runs, and so
    does a guided SJD image that takes almost the whole budget, next to ordinary images."""
    ordinary = [dict(prompt=str(i), seed=i) for i in range(4)]
    bodies = [dict(prompt="7", strategy="sjd", window=10**9), dict(prompt="7", strategy="zipar", window=10**9),
              dict(prompt="8", strategy="sjd", window=STEP_TOKENS // 2 - 2), *ordinary]

    async def all_at_once():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(body):
                t0 = time.perf_counter()
                r = await client.post(f"{server}/v1/images/generations", json=body)
                return r, time.perf_counter() - t0
            return await asyncio.gather(*(one(b) for b in bodies))

    t0 = time.perf_counter()
    answers = asyncio.run(all_at_once())
    (refused, seconds), *served = answers
    assert_openai_error(refused, 400)
    assert "can never be scheduled" in refused.json()["error"]["message"] and seconds < 5
    assert all(r.status_code == 200 for r, _ in served), [r.text for r, _ in served]
    assert time.perf_counter() - t0 < 60


def test_a_timeout_aborts_the_images_with_a_408_and_frees_their_kv(server):
    r = generate(server, prompt="4", n=16, guidance_scale=2.0, timeout=0.3)
    assert_openai_error(r, 408, "timeout")
    assert r.json()["error"]["type"] == "timeout_error"
    with httpx.stream("POST", f"{server}/v1/images/generations", timeout=60,
                      json=dict(prompt="4", stream=True, partial_images=1, strategy="sjd", timeout=0.01)) as s:
        text = "".join(s.iter_text())
    assert "event: error" in text and "timeout_error" in text
    deadline = time.time() + 20
    while time.time() < deadline and (metric(server, "vllm:kv_cache_usage_perc") > 0
                                      or metric(server, "vllm:num_requests_running") > 0):
        time.sleep(0.2)
    assert metric(server, "vllm:kv_cache_usage_perc") == 0 and metric(server, "vllm:num_requests_running") == 0
    assert generate(server, prompt="4", timeout=60).status_code == 200


def _requests():
    """Image requests, valid and invalid: each field absent, plausible, or hostile."""
    from hypothesis import strategies as st

    anything = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=20), st.lists(st.integers(), max_size=3), st.just({"a": 1}))
    def field(*plausible):
        return st.one_of(*plausible, anything)
    fields = {
        "prompt": field(st.sampled_from(["0", "7", "seven", "Nine", " 3 ", "10", "-1", "", "zero one"]),
                        st.integers(-2, 12)),
        "n": field(st.integers(-1, 3), st.just(17)),
        "seed": field(st.integers(-1, 2**33), st.sampled_from([2**32 - 1, 2**62, 2**63, 2**64])),
        "guidance_scale": field(st.floats(0, 8), st.sampled_from([1, 1.0, 100, 101, 1e308, -0.0])),
        "temperature": field(st.floats(0, 3), st.sampled_from([0, 1e-9, 100, 1e308])),
        "top_k": field(st.integers(-1, 300), st.just(10**18), st.lists(st.integers(-1, 9), max_size=3)),
        "top_p": field(st.floats(0, 1), st.sampled_from([1e-300, 1.0000001])),
        "strategy": field(st.sampled_from(["raster", "zipar", "sjd", "SJD", "code"])),
        "window": field(st.integers(-1, 20), st.sampled_from([10**9, 2**63, 64, 256, 257])),
        "init": field(st.sampled_from(["random", "horizontal", "vertical"])),
        "relaxed_delta": field(st.floats(0, 1)),
        "relaxed_neighbours": field(st.integers(0, 300), st.just(10**12)),
        "size": field(st.sampled_from(["auto", "32x32", "1024x1024"])),
        "response_format": field(st.sampled_from(["b64_json", "url"])),
        "stream": field(st.booleans()),
        "partial_images": field(st.integers(-1, 4)),
        "negative_prompt": field(st.sampled_from(["", "blurry"])),
        "timeout": field(st.floats(0.01, 30), st.just(3601)),
        "user": field(st.text(max_size=10)),
        "steps": anything,
    }
    plain = st.fixed_dictionaries({"prompt": fields["prompt"]}, optional={k: v for k, v in fields.items() if k != "prompt"})
    return st.one_of(plain, plain.map(lambda d: {"prompt": d.get("prompt"), "extra_params": {
        k: v for k, v in d.items() if k in ("seed", "guidance_scale", "strategy", "window", "init", "timeout")}}),
        anything)


def test_any_request_gets_an_image_or_a_4xx_promptly_and_the_server_keeps_serving(server):
    import json as json_module

    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_requests())
    def check(body):
        content = json_module.dumps(body)  # NaN and Infinity go out as the literals
        t0 = time.perf_counter()
        r = post_raw(server, content, timeout=90)
        assert time.perf_counter() - t0 < 90
        if r.status_code == 200:
            if isinstance(body, dict) and body.get("stream") is True:
                assert "event: image_generation.completed" in r.text or "timeout_error" in r.text, r.text[-300:]
            else:
                assert all(png(d["b64_json"]).size == (32, 32) for d in r.json()["data"])
        else:
            assert_openai_error(r)  # 4xx, 408 (timeout) included
        good = generate(server, prompt="1", guidance_scale=1.0, timeout=60)
        assert good.status_code == 200, good.text

    check()
