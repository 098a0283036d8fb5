"""KServe's Python SDK (its v2 clients, InferenceRESTClient and InferenceGRPCClient) against the
real server on the pretrained model: health, and inference with encoded images and with an FP32
tensor; the answers equal /predict's for the same photos."""

import asyncio

import numpy as np
import pytest
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

from conftest import PRETRAINED, assert_same_ranking, predict, preprocess, top


def run(coro):
    return asyncio.run(coro)


def images_request(images, binary):
    inp = InferInput(name="image", shape=[len(images)], datatype="BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=binary)
    return InferRequest(model_name=PRETRAINED, infer_inputs=[inp], request_id="kserve-1")


def test_rest_health_and_images(http_url, accuracy):
    async def go():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120))
        try:
            base = f"http://{http_url}"
            assert await client.is_server_live(base)
            assert await client.is_server_ready(base)
            assert await client.is_model_ready(base, PRETRAINED)
            images = [img for _, img, _ in accuracy]
            response = await client.infer(base, images_request(images, binary=True), model_name=PRETRAINED)
            return response
        finally:
            await client.close()

    response = run(go())
    assert response.id == "kserve-1"
    assert response.model_name == PRETRAINED
    probs = response.outputs[0].as_numpy()
    assert probs.shape == (len(accuracy), 1000)
    for (name, img, _), p in zip(accuracy, probs):
        assert_same_ranking(top(p), predict(http_url, img), what=name)


def test_rest_fp32_tensor_as_json(http_url, accuracy, metadata):
    name, img, _ = accuracy[1]
    x = preprocess(img, metadata)[None]
    inp = InferInput(name="input", shape=list(x.shape), datatype="FP32")
    inp.set_data_from_numpy(x, binary_data=False)

    async def go():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120))
        try:
            return await client.infer(f"http://{http_url}", InferRequest(model_name=PRETRAINED, infer_inputs=[inp]),
                                      model_name=PRETRAINED)
        finally:
            await client.close()

    p = run(go()).outputs[0].as_numpy()[0]
    want = predict(http_url, img)
    assert top(p)[0][0] == want[0][0], f"{name}: {top(p)} vs {want}"


def test_grpc_images(grpc_url, http_url, accuracy):
    images = [img for _, img, _ in accuracy[:3]]

    async def go():
        client = InferenceGRPCClient(url=grpc_url, timeout=120)
        try:
            assert await client.is_server_ready()
            return await client.infer(images_request(images, binary=True))
        finally:
            await client.close()

    response = run(go())
    probs = response.outputs[0].as_numpy()
    assert probs.shape == (3, 1000)
    for (name, img, _), p in zip(accuracy[:3], probs):
        assert_same_ranking(top(p), predict(http_url, img), what=name)


def test_rest_error_is_raised(http_url, accuracy):
    async def go():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        try:
            await client.infer(f"http://{http_url}", images_request([b"not an image"], binary=True),
                               model_name=PRETRAINED)
        finally:
            await client.close()

    with pytest.raises(Exception) as e:
        run(go())
    assert "415" in str(e.value) or "image" in str(e.value).lower()
