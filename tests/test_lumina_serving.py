"""A Lumina-mGPT folder behind `vllm-visual-ar serve`, over HTTP with the `openai` client: text
prompts, negative prompts and sizes give the reference loop's images; bad input is a 400 naming the
field and the server serves on."""
import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import write_tiny_lumina_folder

from vllm_visual_ar.model_executors.t2i_reference import generate_image_tokens, transformers_next_logits


@pytest.fixture(scope="module")
def lumina_server(tmp_path_factory):
    from vllm_visual_ar.launch import running_server

    root = tmp_path_factory.mktemp("lumina-serve")
    folder, model = write_tiny_lumina_folder(root)
    with running_server(str(root / "server.log"), model=folder) as url:
        yield url, folder, model


def expected_pixels(folder, model, text, guidance_scale, size, negative_prompt=None):
    """The reference loop's greedy image, decoded as the server encodes it."""
    from transformers import AutoTokenizer

    from vllm_visual_ar.families import family_of
    from vllm_visual_ar.model_executors.vq import images_to_uint8
    from vllm_visual_ar.requests import prompt_pair

    family = family_of(folder)
    config = family.config(folder)
    cond, uncond, size = prompt_pair(config, text, negative_prompt, size, AutoTokenizer.from_pretrained(folder))
    layout = family.image_layout(config, size)
    tokens = generate_image_tokens(transformers_next_logits(model), cond, uncond, layout,
                                   lambda c, u, s: u + s * (c - u), guidance_scale, top_k=1)
    codes = layout.codes_of(torch.tensor([tokens]))
    return images_to_uint8(family.decoder(folder)(codes, (layout.rows, layout.cols)))[0].numpy()


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.mark.parametrize("size,negative,decoding", [("64x64", None, {}), ("128x32", "blurry low quality", {}),
                                                   ("64x64", None, {"strategy": "sjd", "window": 6})])
def test_openai_client_draws_text_prompts(lumina_server, size, negative, decoding):
    """Greedy: the raster reference's image, also with SJD (greedy SJD is greedy raster)."""
    from openai import OpenAI

    url, folder, model = lumina_server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    extra = {"guidance_scale": 3.0, "top_k": 1, "seed": 0, **decoding}
    if negative:
        extra["negative_prompt"] = negative
    result = client.images.generate(model=client.models.list().data[0].id, prompt="a red cat on a mat", size=size,
                                    response_format="b64_json", extra_body=extra)
    w, h = (int(v) for v in size.split("x"))
    expected = expected_pixels(folder, model, "a red cat on a mat", 3.0, (w, h), negative)
    assert result.size == size
    assert (pixels(result.data[0].b64_json) == expected).all()


def test_streamed_text_to_image_previews(lumina_server):
    from openai import OpenAI

    url, _, _ = lumina_server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    events = list(client.images.generate(prompt="a blue dog", stream=True, partial_images=2,
                                         extra_body={"seed": 1}))
    assert events[-1].type == "image_generation.completed"
    assert 1 <= len([e for e in events if e.type == "image_generation.partial_image"]) <= 2


@pytest.mark.parametrize("body,param", [
    ({"prompt": ""}, "prompt"), ({"prompt": 7}, "prompt"), ({"prompt": "a cat", "size": "100x100"}, "size"),
    ({"prompt": "a cat", "size": "huge"}, "size"), ({"prompt": "a cat", "negative_prompt": "x" * 5000}, "negative_prompt"),
    ({"prompt": "a cat", "strategy": "zipar", "window": 1}, "window"),  # the window counts the row's end of line
    ({"prompt": "cat " * 240}, None),  # 240 words: longer than the tiny model's context, never schedulable
    ({"prompt": "cat " * 300}, "prompt"),  # over the 1,000 characters of any string field
])
def test_bad_text_requests_get_a_400_and_the_server_serves_on(lumina_server, body, param):
    url, _, _ = lumina_server
    r = httpx.post(f"{url}/v1/images/generations", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    ok = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a cat", "top_k": 1}, timeout=60)
    assert ok.status_code == 200
