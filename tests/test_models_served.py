"""AFNO, MaskFormer and DETR3D served end to end: real server, tritonclient and the ZMQ client,
numbers equal to the model run in-process (AFNO: to FourCastNet's fixture), bad shapes are 4xx."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from models.base import load_model
from models.detr3d import random_detr3d_folder
from models.maskformer import random_maskformer_folder
from server.client import Client, ModelsrvError
from tests.conftest import Server, fixture_path, infer_json

AFNO = fixture_path("afno_small")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "afno": AFNO / "model",
        "maskformer": random_maskformer_folder(root / "maskformer", seed=0),
        "detr3d": random_detr3d_folder(root / "detr3d", seed=0),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, folders):
    prefix = tmp_path_factory.mktemp("models_served")
    s = Server(prefix, models={name: {"path": str(path), "max_batch_size": 4} for name, path in folders.items()})
    s.start(wait=True)
    yield s
    s.stop()


def reference(folder, inputs, parameters=None):
    torch.set_num_threads(1)
    model = load_model(folder)
    with torch.inference_mode():
        out = model.forward(model.prepare(inputs, parameters or {}), parameters or {})
    return {k: v.numpy() for k, v in out.items()}


def test_afno_fixture_over_http_and_zmq(server) -> None:
    import json

    import tritonclient.http as triton

    fields = load_file(str(AFNO / "inputs.safetensors"))["fields"]
    expected = load_file(str(AFNO / "expected.safetensors"))["forecast"]
    tol = json.loads((AFNO / "case.json").read_text())["tolerance"]["forecast"]
    client = triton.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    x = triton.InferInput("fields", list(fields.shape), "FP32")
    x.set_data_from_numpy(fields)
    got = client.infer("afno", [x]).as_numpy("forecast")
    assert np.all(np.abs(got - expected) <= tol["atol"] + tol["rtol"] * np.abs(expected))
    with Client(server.zmq_address) as c:
        got = c.infer("afno", {"fields": fields})["forecast"]
        assert np.all(np.abs(got - expected) <= tol["atol"] + tol["rtol"] * np.abs(expected))
        rollout = c.infer("afno", {"fields": fields}, {"steps": 2})["forecast"]
        twice = c.infer("afno", {"fields": got})["forecast"]
    assert rollout.shape == (1, 2, 5, 40, 80)
    assert np.allclose(rollout[:, 0], got, atol=1e-5) and np.allclose(rollout[:, 1], twice, atol=1e-4)
    # the rollout parameter over HTTP, as a KServe request parameter
    x = triton.InferInput("fields", list(fields.shape), "FP32")
    x.set_data_from_numpy(fields)
    assert client.infer("afno", [x], parameters={"steps": 3}).as_numpy("forecast").shape == (1, 3, 5, 40, 80)


def test_afno_bad_shape_and_steps_are_400(server) -> None:
    status, out = infer_json(server.url, "afno", [{"name": "fields", "datatype": "FP32", "shape": [1, 5, 40, 40],
                                                    "data": [0.0] * 8000}])
    assert status == 400 and "fields" in out["error"]
    status, out = infer_json(server.url, "afno", [{"name": "fields", "datatype": "FP32", "shape": [1, 5, 40, 80],
                                                    "data": [0.0] * 16000}], parameters={"steps": 0})
    assert status == 400 and "steps" in out["error"]


def test_maskformer_served_equals_in_process(server, folders) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 96)).astype(np.float32)
    expected = reference(folders["maskformer"], {"pixel_values": x})
    with Client(server.zmq_address) as c:
        got = c.infer("maskformer", {"pixel_values": x})
    assert got["segmentation"].dtype == np.int64 and got["segmentation"].shape == (2, 64, 96)
    assert got["masks_queries_logits"].shape[2:] == (16, 24)
    for name in ("class_queries_logits", "masks_queries_logits"):
        assert np.allclose(got[name], expected[name], atol=1e-4), name
    assert np.array_equal(got["segmentation"], expected["segmentation"])
    with Client(server.zmq_address) as c, pytest.raises(ModelsrvError) as err:
        c.infer("maskformer", {"pixel_values": np.zeros((1, 3, 50, 50), np.float32)})
    assert err.value.code == 400


def test_detr3d_served_equals_in_process(server, folders) -> None:
    model = load_model(folders["detr3d"])
    inputs = model.example_inputs(2)
    expected = reference(folders["detr3d"], inputs)
    import tritonclient.http as triton

    client = triton.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    xs = []
    for name, value in inputs.items():
        x = triton.InferInput(name, list(value.shape), "FP32")
        x.set_data_from_numpy(value)
        xs.append(x)
    result = client.infer("detr3d", xs)
    k = model.config.get("max_num", 300)
    assert result.as_numpy("boxes").shape == (2, k, 9) and result.as_numpy("labels").dtype == np.int64
    for name in ("boxes", "scores", "labels"):
        assert np.allclose(result.as_numpy(name), expected[name], atol=1e-4), name
    bad = dict(inputs, lidar2img=inputs["lidar2img"][:, :1])
    with Client(server.zmq_address) as c, pytest.raises(ModelsrvError) as err:
        c.infer("detr3d", bad)
    assert err.value.code == 400
