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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from vllm_visual_ar.launch import running_server

    with running_server(str(tmp_path_factory.mktemp("serve") / "server.log")) as url:
        yield url


def generate(url: str, timeout: float = 120, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=timeout)


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
    before = metric(server, "vllm_visual_ar:image_forward_passes_count", strategy="zipar")
    assert generate(server, prompt="1", strategy="zipar", window=8).status_code == 200
    assert metric(server, "vllm_visual_ar:image_forward_passes_count", strategy="zipar") == before + 1
    drafts = metric(server, "vllm_visual_ar:sjd_draft_tokens_total")
    assert generate(server, prompt="1", strategy="sjd", window=8).status_code == 200
    assert metric(server, "vllm_visual_ar:sjd_draft_tokens_total") > drafts
    assert 0 <= metric(server, "vllm_visual_ar:sjd_accepted_tokens_total") <= metric(
        server, "vllm_visual_ar:sjd_draft_tokens_total")
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
    ({"prompt": "3", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "3", "guidance_scale": "high"}, "guidance_scale"), ({"prompt": "3", "seed": -1}, "seed"),
    ({"prompt": "3", "seed": "abc"}, "seed"), ({"prompt": "3", "temperature": -0.5}, "temperature"),
    ({"prompt": "3", "top_p": 0}, "top_p"), ({"prompt": "3", "top_k": -5}, "top_k"),
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
        generate(server, timeout=0.5, prompt="4", n=16, guidance_scale=2.0)  # 32 streams, ~2 s of work
    deadline = time.time() + 20
    while time.time() < deadline:
        if (metric(server, "vllm:num_requests_running") == 0 and metric(server, "vllm:num_requests_waiting") == 0
                and metric(server, "vllm:kv_cache_usage_perc") == 0):
            break
        time.sleep(0.2)
    assert metric(server, "vllm:kv_cache_usage_perc") == 0
    assert metric(server, "vllm:request_success_total", finished_reason="length") < finished + 32  # aborted
    assert generate(server, prompt="4").status_code == 200
