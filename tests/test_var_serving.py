"""A CoDe model folder (VAR drafter + refiner) behind `vllm-visual-ar serve`, over HTTP with the
`openai` client: the same images as the offline engine, per-request draft_steps, previews by scale,
bad input answered with a 400 and the server serving on."""
import base64
import io

import httpx
import pytest
from PIL import Image
from tiny_models import write_tiny_code_folder


@pytest.fixture(scope="module")
def code_server(tmp_path_factory):
    from vllm_visual_ar.launch import running_server

    root = tmp_path_factory.mktemp("code-serve")
    folder, drafter, refiner, vq = write_tiny_code_folder(root)
    with running_server(str(root / "server.log"), model=folder) as url:
        yield url, (drafter, refiner, vq)


def pixels(b64: str):
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def expected_png_pixels(models, class_id, guidance_scale, seed, draft_steps=None, **settings):
    """The reference loop's image for one request, as the server would encode it."""
    import torch

    from vllm_visual_ar.model_executors.var_reference import generate_code, generate_var
    from vllm_visual_ar.model_executors.vq import images_to_uint8

    drafter, refiner, vq = models
    sampling = dict(top_k=0, top_p=1.0, temperature=1.0, seeds=[seed])
    sampling.update(settings)
    codes = (generate_code(drafter, refiner, vq, [class_id], draft_steps, guidance_scale, **sampling) if draft_steps
             else generate_var(drafter, vq, [class_id], guidance_scale, **sampling))
    with torch.no_grad():
        image = vq.decode_codes(torch.cat(codes, 1)).mul(2).sub(1)
    return images_to_uint8(image)[0, ..., 0].numpy()


def test_openai_client_serves_var_and_code(code_server):
    import numpy as np
    from openai import OpenAI

    url, models = code_server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    for draft_steps in (None, 1, 2):
        extra = {"seed": 21, "guidance_scale": 1.5, "top_k": 0, "top_p": 1.0}
        if draft_steps:
            extra.update(strategy="code", draft_steps=draft_steps)
        result = client.images.generate(model=model, prompt="6", size="8x8", response_format="b64_json",
                                        extra_body=extra)
        got = np.asarray(pixels(result.data[0].b64_json))
        assert got.shape == (8, 8)
        assert (got == expected_png_pixels(models, 6, 1.5, 21, draft_steps)).all(), draft_steps


def test_per_scale_settings_over_http(code_server):
    """top_k, top_p and temperature as lists, one value per scale (CoDe's convention)."""
    import numpy as np

    url, models = code_server
    settings = dict(top_k=[0, 3, 5, 0], top_p=[1.0, 0.9, 1.0, 0.7], temperature=[1.1, 1.0, 1.3, 1.0])
    r = httpx.post(f"{url}/v1/images/generations", timeout=60, json={
        "prompt": "5", "seed": 3, "guidance_scale": 1.5, "strategy": "code", "draft_steps": 2, **settings})
    assert r.status_code == 200, r.text
    got = np.asarray(pixels(r.json()["data"][0]["b64_json"]))
    assert (got == expected_png_pixels(models, 5, 1.5, 3, 2, **settings)).all()


def test_streamed_previews_come_scale_by_scale(code_server):
    from openai import OpenAI

    url, _ = code_server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    events = list(client.images.generate(prompt="2", stream=True, partial_images=2,
                                         extra_body={"seed": 4, "strategy": "code", "draft_steps": 2}))
    assert [e.type for e in events][-1] == "image_generation.completed"
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    assert 1 <= len(partial) <= 2 and [e.partial_image_index for e in partial] == list(range(len(partial)))


@pytest.mark.parametrize("body,param", [
    ({"prompt": "3", "strategy": "code", "draft_steps": 0}, "draft_steps"),
    ({"prompt": "3", "strategy": "code", "draft_steps": 4}, "draft_steps"),
    ({"prompt": "3", "strategy": "code"}, "draft_steps"),
    ({"prompt": "3", "draft_steps": 2}, "draft_steps"),
    ({"prompt": "3", "strategy": "zipar", "window": 2}, "strategy"),
    ({"prompt": "3", "strategy": "code", "draft_steps": "2"}, "draft_steps"),
    ({"prompt": "3", "size": "32x32"}, "size"),
    ({"prompt": "3", "top_k": [0, 1, 2]}, "top_k"),
    ({"prompt": "3", "temperature": [1.0, 1.0, "hot", 1.0]}, "temperature"),
    ({"prompt": "3", "top_p": [1.0, 1.0, 0.0, 1.0]}, "top_p"),
    ({"prompt": "3", "top_k": {"0": 1}}, "top_k"),
])
def test_bad_code_requests_get_a_400_and_the_server_serves_on(code_server, body, param):
    url, _ = code_server
    r = httpx.post(f"{url}/v1/images/generations", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    ok = httpx.post(f"{url}/v1/images/generations", json={"prompt": "3", "strategy": "code", "draft_steps": 1},
                    timeout=60)
    assert ok.status_code == 200
