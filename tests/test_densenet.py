"""DenseNet: numbers against torchvision's fixtures, the image path, the converter, bad inputs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from models import InputError, load_model
from models.convert import main as convert_main
from models.densenet import (
    DenseNetConfig,
    DenseNetModel,
    center_crop,
    convert_densenet,
    decode_and_crop,
    normalize,
    random_densenet_folder,
    resized_size,
)
from tests.conftest import FIXTURES

torch.set_num_threads(1)

TINY_CONFIG = {"growth_rate": 4, "block_config": [1, 2], "num_init_features": 8, "bn_size": 2, "num_classes": 3}


def fixture(name: str) -> Path:
    path = FIXTURES / name
    if not (path / "case.json").is_file():
        pytest.fail(f"fixture {path} is missing (tests/fixtures/README.md lists them)")
    return path


def within(got: torch.Tensor, ref: torch.Tensor, tol: dict) -> tuple[bool, float]:
    """The fixtures' rule: |got - ref| <= atol + rtol*|ref| for every element."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    diff = (got - ref).abs()
    return bool((diff <= tol["atol"] + tol["rtol"] * ref.abs()).all()), float(diff.max())


def run(model, inputs: dict) -> torch.Tensor:
    return model.forward(model.prepare(inputs, {}), {})["logits"]


@pytest.fixture(scope="module")
def tiny():
    return load_model(fixture("densenet_tiny") / "model")


@pytest.fixture(scope="module")
def tiny_case() -> dict:
    root = fixture("densenet_tiny")
    case = json.loads((root / "case.json").read_text())
    return {
        "case": case,
        "images": load_file(root / "inputs.safetensors")["images"],
        "logits": load_file(root / "expected.safetensors")["logits"],
    }


def image_bytes() -> list[bytes]:
    root = fixture("densenet_tiny_images")
    return [(root / "inputs" / "0.jpg").read_bytes(), (root / "inputs" / "1.png").read_bytes()]


# -- numbers -------------------------------------------------------------------------------------
def test_fixture_logits(tiny, tiny_case):
    assert isinstance(tiny, DenseNetModel)
    assert tiny.config["block_config"] == tiny_case["case"]["config"]["block_config"]
    got = run(tiny, {"images": tiny_case["images"].numpy()})
    ok, worst = within(got, tiny_case["logits"], tiny_case["case"]["tolerance"]["logits"])
    assert ok, f"max abs diff {worst}"


def test_loads_without_num_batches_tracked(tmp_path, tiny_case):
    src = fixture("densenet_tiny") / "model"
    state = load_file(src / "model.safetensors")
    assert any(k.endswith("num_batches_tracked") for k in state)  # the fixture has them ...
    save_file({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, tmp_path / "model.safetensors")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    got = run(load_model(tmp_path), {"images": tiny_case["images"].numpy()})  # ... this copy does not
    ok, worst = within(got, tiny_case["logits"], tiny_case["case"]["tolerance"]["logits"])
    assert ok, f"max abs diff {worst}"


def test_channels_last_option(tmp_path, tiny_case):
    src = fixture("densenet_tiny") / "model"
    shutil.copy(src / "model.safetensors", tmp_path / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "channels_last": True}))
    model = load_model(tmp_path)
    assert model.channels_last
    got = run(model, {"images": tiny_case["images"].numpy()})
    ok, worst = within(got, tiny_case["logits"], tiny_case["case"]["tolerance"]["logits"])
    assert ok, f"max abs diff {worst}"


def test_batch_of_two_equals_two_of_one(tiny, tiny_case):
    images = tiny_case["images"].numpy()
    both = run(tiny, {"images": images})
    one_by_one = torch.cat([run(tiny, {"images": images[i : i + 1]}) for i in range(2)])
    torch.testing.assert_close(both, one_by_one, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both[0], both[1])  # two different pictures, two different answers


# -- the image path ------------------------------------------------------------------------------
def test_resize_and_crop_geometry():
    # Long side truncated (355.56 -> 355), not rounded; short side -> 256.
    assert resized_size(301, 200) == (385, 256)
    assert resized_size(360, 500) == (256, 355)
    # Crop offsets with Python's round (half to even): (385-224)/2 = 80.5 -> 80.
    img = Image.fromarray(np.tile(np.arange(385, dtype=np.int32) % 256, (256, 1)).astype(np.uint8))
    assert np.asarray(center_crop(img))[0, 0] == 80
    assert np.asarray(center_crop(img.transpose(Image.Transpose.TRANSPOSE)))[0, 0] == 80  # top, too
    # Smaller than the crop: zero padded like torchvision (left/top get the smaller half).
    small = center_crop(Image.new("RGB", (101, 50), (9, 9, 9)))
    arr = np.asarray(small)
    assert arr.shape == (224, 224, 3)
    assert arr[:87].max() == 0 and arr[87:137, 61:162].min() == 9 and arr[137:].max() == 0
    assert arr[:, :61].max() == 0 and arr[:, 162:].max() == 0


def test_image_bytes_intermediates():
    aux = load_file(fixture("densenet_tiny_images") / "aux.safetensors")
    cropped = torch.stack([decode_and_crop(b) for b in image_bytes()])
    ref = aux["images_cropped_uint8"]
    assert cropped.dtype == torch.uint8 and cropped.shape == ref.shape
    # The PNG is lossless: exact. A different libjpeg may differ by a grey level, no more.
    assert torch.equal(cropped[1], ref[1])
    assert (cropped[0].int() - ref[0].int()).abs().max() <= 1
    torch.testing.assert_close(normalize(ref), aux["images_preprocessed"], atol=1e-6, rtol=0)


def test_image_bytes_logits(tiny):
    root = fixture("densenet_tiny_images")
    case = json.loads((root / "case.json").read_text())
    aux = load_file(root / "aux.safetensors")
    model = load_model(root / "model")
    prepared = model.prepare({"image": image_bytes()}, {})
    assert set(prepared) == {"images"} and prepared["images"].dtype == torch.float32
    torch.testing.assert_close(prepared["images"], aux["images_preprocessed"], atol=0.02, rtol=0)
    got = model.forward(prepared, {})["logits"]
    ok, worst = within(got, load_file(root / "expected.safetensors")["logits"], case["tolerance"]["logits"])
    assert ok, f"max abs diff {worst}"
    # Both input kinds prepare to the same tensor, so requests of either kind batch together.
    assert tiny.batch_key(prepared, {}) == tiny.batch_key(
        tiny.prepare({"images": aux["images_preprocessed"].numpy()}, {}), {}
    )


# -- bad inputs ----------------------------------------------------------------------------------
def _png(size=(40, 30)) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"images": np.zeros((1, 3, 64, 64), np.float64)}, "FP32"),
        ({"images": np.zeros((1, 3, 64, 64), np.int64)}, "FP32"),
        ({"images": np.zeros((3, 64, 64), np.float32)}, "shape"),
        ({"images": np.zeros((1, 1, 3, 64, 64), np.float32)}, "shape"),
        ({"images": np.zeros((1, 4, 64, 64), np.float32)}, "shape"),
        ({"images": np.zeros((0, 3, 64, 64), np.float32)}, "empty"),
        ({"images": np.zeros((1, 3, 8, 64), np.float32)}, "at least"),
        ({"images": np.zeros((1, 3, 64, 64), np.float32), "image": [_png()]}, "exactly one"),
        ({}, "exactly one"),
        ({"pixels": np.zeros((1, 3, 64, 64), np.float32)}, "unexpected input"),
        ({"image": np.zeros((1,), np.uint8)}, "BYTES"),
        ({"image": [_png(), b"\x89PNG garbage, not an image"]}, "item 1"),
        ({"image": [b""]}, "item 0"),
        ({"image": [_png()[:60]]}, "item 0"),  # truncated
        ({"image": ["a string"]}, "item 0"),
        ({"image": [_png((1, 300))]}, "aspect ratio"),
    ],
)
def test_bad_inputs(tiny, inputs, message):
    with pytest.raises(InputError, match=message):
        tiny.prepare(inputs, {})


def test_small_png_is_upscaled(tiny):
    prepared = tiny.prepare({"image": [_png((40, 30)), _png((30, 40))]}, {})
    assert prepared["images"].shape == (2, 3, 224, 224)


# -- converter -----------------------------------------------------------------------------------
class Blob:
    """A small custom class: its instances pickle as a global lookup plus state."""

    def __init__(self) -> None:
        self.x = 1


class Payload:
    """Stands for arbitrary code in a pickle: unpickling calls print()."""

    def __reduce__(self):
        return (print, ("a pickle ran code",))


def test_convert_legacy_pth(tmp_path, tiny_case):
    src = fixture("densenet_tiny") / "source" / "densenet_tiny_legacy.pth"
    assert convert_main(["densenet", str(src), str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == tiny_case["case"]["config"]  # inferred from the weights
    keys = load_file(tmp_path / "out" / "model.safetensors").keys()
    assert "features.denseblock1.denselayer1.norm1.weight" in keys
    assert not any(".norm.1." in k for k in keys)
    got = run(load_model(tmp_path / "out"), {"images": tiny_case["images"].numpy()})
    ok, worst = within(got, tiny_case["logits"], tiny_case["case"]["tolerance"]["logits"])
    assert ok, f"max abs diff {worst}"


def test_convert_modern_keys_and_options(tmp_path, tiny_case):
    # A modern state dict (torchvision names, num_batches_tracked, DataParallel prefix) also converts.
    state = load_file(fixture("densenet_tiny") / "model" / "model.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "modern.pth")
    cfg = tiny_case["case"]["config"]
    argv = ["densenet", str(tmp_path / "modern.pth"), str(tmp_path / "out")]
    argv += ["--growth-rate", str(cfg["growth_rate"]), "--block-config", ",".join(map(str, cfg["block_config"]))]
    assert convert_main(argv) == 0
    got = run(load_model(tmp_path / "out"), {"images": tiny_case["images"].numpy()})
    assert within(got, tiny_case["logits"], tiny_case["case"]["tolerance"]["logits"])[0]
    # Options that contradict the weights are an error, not a partial load.
    assert convert_main(["densenet", str(tmp_path / "modern.pth"), str(tmp_path / "x"), "--arch", "densenet121"]) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("payload", [Blob, Payload])
def test_convert_refuses_arbitrary_pickle(tmp_path, capsys, payload):
    evil = tmp_path / "evil.pth"
    torch.save({"features.conv0.weight": torch.zeros(1), "payload": payload()}, evil)
    with pytest.raises(ValueError, match="refused"):
        convert_densenet(evil, tmp_path / "out")
    assert convert_main(["densenet", str(evil), str(tmp_path / "out")]) == 1
    err = capsys.readouterr()
    assert "refused" in err.err and "a pickle ran code" not in err.out
    assert not (tmp_path / "out").exists()


# -- random folders ------------------------------------------------------------------------------
def test_random_folder_is_deterministic(tmp_path):
    a = random_densenet_folder(tmp_path / "a", TINY_CONFIG, seed=3)
    b = random_densenet_folder(tmp_path / "b", TINY_CONFIG, seed=3)
    c = random_densenet_folder(tmp_path / "c", TINY_CONFIG, seed=4)
    sa, sb, sc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["features.conv0.weight"], sc["features.conv0.weight"])
    model = load_model(a)
    assert model.config["growth_rate"] == 4
    out = run(model, model.example_inputs(2))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    model.warmup()


def test_random_folder_default_is_densenet121(tmp_path):
    folder = random_densenet_folder(tmp_path / "d121")
    config = json.loads((folder / "config.json").read_text())
    assert config == {
        "model_type": "densenet",
        "growth_rate": 32,
        "block_config": [6, 12, 24, 16],
        "num_init_features": 64,
        "bn_size": 4,
        "num_classes": 1000,
    }
    state = load_file(folder / "model.safetensors")
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == 7_978_856


def test_config_validates_and_round_trips():
    cfg = DenseNetConfig.from_dict({"model_type": "densenet", **TINY_CONFIG})
    assert cfg.block_config == (1, 2) and cfg.channels_last is None
    assert DenseNetConfig.from_dict(cfg.to_json()) == cfg and cfg.to_json()["block_config"] == [1, 2]
    assert "channels_last" not in cfg.to_json()
    assert DenseNetConfig.from_dict({"channels_last": True}).to_json()["channels_last"] is True
    for bad, message in [({"growth_rate": 0}, "growth_rate"), ({"block_config": []}, "block_config"),
                         ({"num_classes": True}, "num_classes"), ({"channels_last": "yes"}, "channels_last")]:
        with pytest.raises(ValueError, match=message):
            DenseNetConfig.from_dict(bad)


# -- hostile images (issue 10) -------------------------------------------------------------------
def _jpeg_header_only(width: int, height: int) -> bytes:
    """A JPEG whose header claims width x height: PIL reads the size without decoding any pixel."""
    import io

    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # baseline start-of-frame: length(2) precision(1) height(2) width(2)
    data[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    data[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def test_image_pixels_are_limited_before_decoding(tmp_path, tiny_case):
    """The limit is read from the header: a 60000x60000 claim is refused at once, with the limit named."""
    import time

    from models.base import load_model as load

    started = time.perf_counter()
    tiny = load(fixture("densenet_tiny") / "model")
    for side in (5000, 60000):  # 60000: PIL's own bomb check fires first (an error of its own)
        with pytest.raises(InputError, match=r"item 0: .*pixels.*\(max_image_pixels 16777216\)"):
            tiny.prepare({"image": [_jpeg_header_only(side, side)]}, {})
    assert time.perf_counter() - started < 5.0
    small = load(fixture("densenet_tiny") / "model", options={"max_image_pixels": 1000})
    assert small.max_image_pixels == 1000
    with pytest.raises(InputError, match=r"item 0: 40x30 pixels .*max_image_pixels 1000"):
        small.prepare({"image": [_png((40, 30))]}, {})
    assert small.prepare({"image": [_png((30, 30))]}, {})["images"].shape == (1, 3, 224, 224)


def test_images_tensor_pixels_are_limited(tiny):
    """FP32 ``images`` run the network at their own size: 2300x2300 took 22 s and 1.7 GB of activations."""
    big = np.zeros((1, 3, 1100, 1000), np.float32)
    with pytest.raises(InputError, match=r"1100x1000 .*max_image_pixels"):
        tiny.prepare({"images": big}, {})
    assert tiny.prepare({"images": np.zeros((1, 3, 1024, 1024), np.float32)}, {})["images"].shape[2:] == (1024, 1024)


@pytest.mark.parametrize("data", [b"\x89PNG garbage, not an image", b"", _png()[:60], b"GIF89a" + b"\0" * 40])
def test_image_errors_show_no_heap_addresses(tiny, data):
    with pytest.raises(InputError) as e:
        tiny.prepare({"image": [data]}, {})
    assert not re.search(r"0x[0-9a-f]{4,}|<.* at ", str(e.value)), str(e.value)
