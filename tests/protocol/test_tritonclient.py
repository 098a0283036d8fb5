"""Triton's own Python clients (tritonclient[http] and tritonclient[grpc]) against the real
server on the real models: health, metadata, and inference with encoded images (BYTES, JSON and
binary) and with FP32 tensors, batches, the classification extension, errors. The answers must
equal /predict's for the same photos (the pretrained efficientnet_lite0)."""

import base64
import functools
import time

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


def as_dict(mod, call, *args, **kwargs):
    """A tritonclient answer as JSON-like dicts: the gRPC client's as_json=True."""
    if mod is grpcclient:
        return call(*args, as_json=True, **kwargs)
    return call(*args, **kwargs)


def test_model_config_as_perf_analyzer_reads_it(client, metadata):
    mod, c = client
    cfg = as_dict(mod, c.get_model_config, PRETRAINED)
    if mod is grpcclient:
        cfg = cfg["config"]
    assert cfg["name"] == PRETRAINED
    assert cfg["platform"] == "pytorch_libtorch"
    assert int(cfg["max_batch_size"]) >= 1
    inputs = {i["name"]: i for i in cfg["input"]}
    size = metadata["input_size"]
    assert inputs["input"]["data_type"] == "TYPE_FP32"
    assert [int(d) for d in inputs["input"]["dims"]] == [3, size, size]
    assert inputs["image"]["data_type"] == "TYPE_STRING"
    out = cfg["output"][0]
    assert out["name"] == "probabilities"
    assert [int(d) for d in out["dims"]] == [len(metadata["labels"])]
    assert cfg["instance_group"][0]["kind"] == "KIND_CPU"
    with pytest.raises(InferenceServerException) as e:
        c.get_model_config("no_such_model")
    assert "no_such_model" in e.value.message()


def test_statistics_count_what_was_served(client, accuracy):
    mod, c = client

    def stats():
        s = as_dict(mod, c.get_inference_statistics, PRETRAINED)
        (one,) = s["model_stats"]
        return one

    before = stats()
    images = [photo for _, photo, _ in accuracy[:3]]
    c.infer(PRETRAINED, [images_input(mod, images)], outputs=[probabilities(mod)])
    with pytest.raises(InferenceServerException):
        c.infer(PRETRAINED, [images_input(mod, [b"not an image"])])
    after = stats()
    assert after["name"] == PRETRAINED and after["version"] == "1"
    n = lambda s, *path: int(functools.reduce(lambda d, k: d.get(k, {}), path, s) or 0)
    assert n(after, "inference_count") - n(before, "inference_count") == 3
    assert n(after, "execution_count") > n(before, "execution_count")
    ok = n(after, "inference_stats", "success", "count") - n(before, "inference_stats", "success", "count")
    failed = n(after, "inference_stats", "fail", "count") - n(before, "inference_stats", "fail", "count")
    assert (ok, failed) == (1, 1)
    for part in ("success", "queue", "compute_input", "compute_infer"):
        assert n(after, "inference_stats", part, "ns") > n(before, "inference_stats", part, "ns"), part
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert n(after, "inference_stats", part, "count") - n(before, "inference_stats", part, "count") == 1, part
    assert n(after, "last_inference") >= n(before, "last_inference") > 0
    sizes = {int(b["batch_size"]) for b in after["batch_stats"]}
    assert sizes and all(s >= 1 for s in sizes)
    # Every model at once.
    everything = as_dict(mod, c.get_inference_statistics)
    assert {s["name"] for s in everything["model_stats"]} >= {PRETRAINED, "resnet18"}


def test_repository_index_unload_and_load(client, accuracy):
    """The model repository extension: the index, and unloading then loading a model while the
    other goes on serving (the server runs with --enable-model-control)."""
    mod, c = client
    index = as_dict(mod, c.get_model_repository_index)
    if mod is grpcclient:
        index = index["models"]
    states = {(m["name"], m.get("version")): m.get("state") for m in index}
    assert states[(PRETRAINED, "1")] == "READY"
    assert states[("resnet18", "1")] == "READY"
    img = accuracy[0][1]
    try:
        c.unload_model("resnet18")
        deadline = time.monotonic() + 30
        while c.is_model_ready("resnet18") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not c.is_model_ready("resnet18")
        with pytest.raises(InferenceServerException) as e:
            c.infer("resnet18", [images_input(mod, [img])])
        assert "resnet18" in e.value.message()
        index = as_dict(mod, c.get_model_repository_index)
        if mod is grpcclient:
            index = index["models"]
        (entry,) = [m for m in index if m["name"] == "resnet18"]
        assert entry.get("state") in ("UNLOADING", "UNAVAILABLE"), entry
        # The other model serves on.
        assert c.infer(PRETRAINED, [images_input(mod, [img])]).as_numpy("probabilities").shape == (1, 1000)
    finally:
        c.load_model("resnet18")
    assert c.is_model_ready("resnet18")
    assert c.infer("resnet18", [images_input(mod, [img])]).as_numpy("probabilities").shape == (1, 1000)
    with pytest.raises(InferenceServerException) as e:
        c.load_model("no_such_model")
    assert "no_such_model" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        c.load_model("resnet18", config='{"max_batch_size": 2}')
    assert "config" in e.value.message()


def test_gzip_and_deflate_requests(http, grpc, accuracy):
    """tritonclient's request compression, HTTP and gRPC: the same answer as uncompressed."""
    img = accuracy[0][1]
    want = http.infer(PRETRAINED, [images_input(httpclient, [img])]).as_numpy("probabilities")
    for algorithm in ("gzip", "deflate"):
        got = http.infer(
            PRETRAINED,
            [images_input(httpclient, [img])],
            request_compression_algorithm=algorithm,
        ).as_numpy("probabilities")
        np.testing.assert_array_equal(got, want)
        got = grpc.infer(
            PRETRAINED,
            [images_input(grpcclient, [img])],
            compression_algorithm=algorithm,
        ).as_numpy("probabilities")
        np.testing.assert_array_equal(got, want)


PACKAGE = PRETRAINED + "_aoti"


def test_an_aoti_package_is_served_like_torchscript(client, accuracy):
    """The same network as an AOTInductor package (models/efficientnet_lite0_aoti): its metadata
    and configuration say so, and every photo gets the TorchScript model's answer."""
    mod, c = client
    m = c.get_model_metadata(PACKAGE) if mod is httpclient else c.get_model_metadata(PACKAGE, as_json=True)
    assert m["platform"] == "pytorch_aoti"
    cfg = as_dict(mod, c.get_model_config, PACKAGE)
    if mod is grpcclient:
        cfg = cfg["config"]
    assert cfg["platform"] == "pytorch_aoti"
    images = [img for _, img, _ in accuracy]
    package = c.infer(PACKAGE, [images_input(mod, images)], outputs=[probabilities(mod)]).as_numpy("probabilities")
    script = c.infer(PRETRAINED, [images_input(mod, images)], outputs=[probabilities(mod)]).as_numpy("probabilities")
    assert package.shape == script.shape == (len(images), 1000)
    assert (package.argmax(1) == script.argmax(1)).all()
    assert float(np.abs(package - script).max()) < 1e-3
