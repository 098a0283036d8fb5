"""Triton's own Python clients (tritonclient[http] and tritonclient[grpc]) against the real
server on the real models: health, metadata, and inference with encoded images (BYTES, JSON and
binary) and with FP32 tensors, batches, the classification extension, errors. The answers must
equal /predict's for the same photos (the pretrained efficientnet_lite0)."""

import base64

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import PRETRAINED, assert_same_ranking, predict, preprocess, top


@pytest.fixture(scope="module")
def http(http_url):
    return httpclient.InferenceServerClient(url=http_url, network_timeout=120)


@pytest.fixture(scope="module")
def grpc(grpc_url):
    return grpcclient.InferenceServerClient(url=grpc_url)


@pytest.fixture(scope="module", params=["http", "grpc"])
def client(request, http, grpc):
    """Each test that takes it runs with both clients: (module, client)."""
    return (httpclient, http) if request.param == "http" else (grpcclient, grpc)


def images_input(mod, images, binary=True):
    data = np.array(images, dtype=np.object_)
    inp = mod.InferInput("image", [len(images)], "BYTES")
    if mod is httpclient:
        inp.set_data_from_numpy(data, binary_data=binary)
    else:
        inp.set_data_from_numpy(data)
    return inp


def probabilities(mod, binary=True, class_count=0):
    if mod is httpclient:
        return mod.InferRequestedOutput("probabilities", binary_data=binary, class_count=class_count)
    return mod.InferRequestedOutput("probabilities", class_count=class_count)


def test_server_live_ready_and_metadata(client):
    mod, c = client
    assert c.is_server_live()
    assert c.is_server_ready()
    meta = c.get_server_metadata() if mod is httpclient else c.get_server_metadata(as_json=True)
    assert meta["name"] == "tch-serve"
    assert "classification" in meta["extensions"] and "binary_tensor_data" in meta["extensions"]
    for model in (PRETRAINED, "resnet18"):
        assert c.is_model_ready(model)
        assert c.is_model_ready(model, model_version="1")
    assert not c.is_model_ready(PRETRAINED, model_version="2")


def test_model_metadata(client):
    mod, c = client
    m = c.get_model_metadata(PRETRAINED) if mod is httpclient else c.get_model_metadata(PRETRAINED, as_json=True)
    assert m["name"] == PRETRAINED
    assert m["platform"] == "pytorch_libtorch"
    assert m["versions"] == ["1"]
    inputs = {i["name"]: i for i in m["inputs"]}
    assert inputs["input"]["datatype"] == "FP32"
    assert [int(d) for d in inputs["input"]["shape"]] == [-1, 3, 224, 224]
    assert inputs["image"]["datatype"] == "BYTES"
    out = m["outputs"][0]
    assert (out["name"], out["datatype"]) == ("probabilities", "FP32")
    assert [int(d) for d in out["shape"]] == [-1, 1000]
    with pytest.raises(InferenceServerException) as e:
        c.get_model_metadata("no_such_model")
    assert "no_such_model" in str(e.value)


def test_images_batch_binary_equals_predict(client, http_url, accuracy):
    """All the photos in one request, as binary BYTES: each answer equals /predict's."""
    mod, c = client
    images = [img for _, img, _ in accuracy]
    result = c.infer(PRETRAINED, [images_input(mod, images)], outputs=[probabilities(mod)], request_id="batch-1")
    probs = result.as_numpy("probabilities")
    assert probs.shape == (len(images), 1000)
    response = result.get_response()
    assert (response["id"] if mod is httpclient else response.id) == "batch-1"
    hits = 0
    for (name, img, expected), p in zip(accuracy, probs):
        assert abs(float(p.sum()) - 1.0) < 1e-3
        assert_same_ranking(top(p), predict(http_url, img), what=name)
        hits += top(p)[0][0] in expected
    # The pretrained model recognises most of these photos: a real model answered.
    assert hits >= len(accuracy) // 2, f"top-1 right on {hits}/{len(accuracy)}"


def test_images_json_base64_equals_binary(http, accuracy):
    """BYTES in JSON: base64 text (the only way JSON carries image bytes)."""
    images = [img for _, img, _ in accuracy[:3]]
    encoded = [base64.b64encode(i) for i in images]
    as_json = http.infer(PRETRAINED, [images_input(httpclient, encoded, binary=False)],
                         outputs=[probabilities(httpclient, binary=False)])
    as_binary = http.infer(PRETRAINED, [images_input(httpclient, images)], outputs=[probabilities(httpclient)])
    np.testing.assert_allclose(as_json.as_numpy("probabilities"), as_binary.as_numpy("probabilities"), rtol=0, atol=1e-6)


def test_classification_extension(client, http_url, accuracy):
    mod, c = client
    images = [img for _, img, _ in accuracy[:2]]
    result = c.infer(PRETRAINED, [images_input(mod, images)], outputs=[probabilities(mod, class_count=3)])
    classes = result.as_numpy("probabilities")
    assert classes.shape == (2, 3)
    for row, img in zip(classes, images):
        want = predict(http_url, img, top_k=3)
        got = []
        for entry in row:
            score, index, label = entry.decode().split(":", 2)
            got.append((int(index), float(score)))
            assert label
        assert_same_ranking(got, want, what="classification")


def test_fp32_tensor_matches_predict(client, http_url, accuracy, metadata):
    """A tensor made in Python (PIL resize, crop, normalise) as the FP32 input: the same top
    class as /predict on the file, probabilities close (the two resizes differ slightly)."""
    mod, c = client
    photos = accuracy[:3]
    x = np.stack([preprocess(img, metadata) for _, img, _ in photos])
    inp = mod.InferInput("input", list(x.shape), "FP32")
    if mod is httpclient:
        inp.set_data_from_numpy(x, binary_data=True)
    else:
        inp.set_data_from_numpy(x)
    probs = c.infer(PRETRAINED, [inp], outputs=[probabilities(mod)]).as_numpy("probabilities")
    for (name, img, _), p in zip(photos, probs):
        want = predict(http_url, img, top_k=5)
        got = top(p)
        assert got[0][0] == want[0][0], f"{name}: {got} vs {want}"
        assert abs(got[0][1] - want[0][1]) < 0.05, f"{name}: {got} vs {want}"


def test_fp32_tensor_as_json(http, accuracy, metadata):
    x = preprocess(accuracy[0][1], metadata)[None]
    binary = httpclient.InferInput("input", list(x.shape), "FP32")
    binary.set_data_from_numpy(x, binary_data=True)
    as_json = httpclient.InferInput("input", list(x.shape), "FP32")
    as_json.set_data_from_numpy(x, binary_data=False)
    a = http.infer(PRETRAINED, [binary]).as_numpy("probabilities")
    b = http.infer(PRETRAINED, [as_json]).as_numpy("probabilities")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_errors_reach_the_client(client, accuracy):
    mod, c = client
    img = accuracy[0][1]
    with pytest.raises(InferenceServerException) as e:
        c.infer("no_such_model", [images_input(mod, [img])])
    assert "no_such_model" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        c.infer(PRETRAINED, [images_input(mod, [b"definitely not an image"])])
    assert "image" in e.value.message().lower()
    bad = mod.InferInput("input", [1, 3, 32, 32], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 32, 32), dtype=np.float32))
    with pytest.raises(InferenceServerException) as e:
        c.infer(PRETRAINED, [bad])
    assert "224" in e.value.message()
    # The server goes on serving.
    assert c.infer(PRETRAINED, [images_input(mod, [img])]).as_numpy("probabilities").shape == (1, 1000)
