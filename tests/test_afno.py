"""AFNO / FourCastNet: numbers against the reference fixture, converter round trip, rollout, bad inputs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models import InputError, load_model
from models.afno import AFNO2D, AFNOConfig, convert_afno, random_afno_folder
from models.convert import main as convert_main
from tests.conftest import FIXTURES

torch.set_num_threads(1)

CASE_DIR = FIXTURES / "afno_small"


def _case_dir() -> Path:
    if not (CASE_DIR / "case.json").is_file():
        pytest.fail(f"fixture missing: {CASE_DIR} (tests/fixtures/README.md lists them)")
    return CASE_DIR


@pytest.fixture(scope="module")
def case() -> dict:
    return json.loads((_case_dir() / "case.json").read_text())


@pytest.fixture(scope="module")
def fixture_model():
    return load_model(_case_dir() / "model")


@pytest.fixture(scope="module")
def fields() -> np.ndarray:
    return load_file(str(_case_dir() / "inputs.safetensors"))["fields"].numpy()


@pytest.fixture(scope="module")
def expected() -> torch.Tensor:
    return load_file(str(_case_dir() / "expected.safetensors"))["forecast"]


def _run(model, fields: np.ndarray, parameters: dict | None = None) -> torch.Tensor:
    parameters = parameters or {}
    return model.forward(model.prepare({"fields": fields}, parameters), parameters)["forecast"]


def _assert_close(got: torch.Tensor, ref: torch.Tensor, tol: dict) -> float:
    assert got.shape == ref.shape and got.dtype == torch.float32
    diff = (got - ref).abs()
    bound = tol["atol"] + tol["rtol"] * ref.abs()
    assert bool((diff <= bound).all()), f"max abs diff {diff.max().item():.3g} over tolerance"
    return diff.max().item()


# -- numbers against the reference -------------------------------------------------------------
def test_fixture_matches_reference(case, fixture_model, fields, expected):
    assert fixture_model.model_type == "afno"
    assert fixture_model.inputs[0].shape == (-1, 5, 40, 80)
    assert fixture_model.outputs[0].shape == (-1, 5, 40, 80)
    got = _run(fixture_model, fields)
    _assert_close(got, expected, case["tolerance"]["forecast"])


def test_spectral_window_follows_reference_quirk(case):
    """Window from the grid height, also limiting columns; unshifted rows (row 0 left out)."""
    cfg = AFNOConfig.from_dict(case["config"])
    f = AFNO2D(cfg.embed_dim, cfg.num_blocks, cfg.sparsity_threshold, cfg.hard_thresholding_fraction)
    rows, cols = f.window(cfg.grid[0])
    win = case["spectral_window"]["this_fixture"]
    assert (rows.start, rows.stop) == tuple(win["rows"])
    assert (cols.start, cols.stop) == tuple(win["cols"])


# -- converter -----------------------------------------------------------------------------------
def test_converter_round_trip(tmp_path, case, fields, expected):
    src = _case_dir() / "source" / "backbone.ckpt"
    out = tmp_path / "converted"
    rc = convert_main(["afno", str(src), str(out), "--img-size", "40", "80", "--hard-thresholding-fraction", "0.75"])
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    assert config == case["config"]
    ref_state = load_file(str(_case_dir() / "model" / "model.safetensors"))
    got_state = load_file(str(out / "model.safetensors"))
    assert sorted(got_state) == sorted(ref_state)  # 'module.' stripped, optimizer etc. dropped
    for k, v in ref_state.items():
        assert torch.equal(got_state[k], v), k
    model = load_model(out)
    _assert_close(_run(model, fields), expected, case["tolerance"]["forecast"])


def _args(**kw) -> argparse.Namespace:
    names = (
        "img_size patch_size in_chans out_chans embed_dim depth num_blocks mlp_ratio "
        "sparsity_threshold hard_thresholding_fraction"
    ).split()
    return argparse.Namespace(**{n: kw.get(n) for n in names})


def test_converter_needs_img_size_and_checks_options(tmp_path):
    src = _case_dir() / "source" / "backbone.ckpt"
    with pytest.raises(ValueError, match="--img-size"):
        convert_afno(src, tmp_path / "a", _args())  # 50 patches do not fit the default 720x1440
    with pytest.raises(ValueError, match="patches"):
        convert_afno(src, tmp_path / "b", _args(img_size=[48, 80]))
    with pytest.raises(ValueError, match="embed-dim"):
        convert_afno(src, tmp_path / "c", _args(img_size=[40, 80], embed_dim=64))
    # Consistent explicit options are accepted.
    out = convert_afno(src, tmp_path / "d", _args(img_size=[40, 80], embed_dim=48, num_blocks=4, patch_size=[8]))
    assert json.loads((out / "config.json").read_text())["hard_thresholding_fraction"] == 1.0


class _Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_converter_refuses_arbitrary_pickle(tmp_path):
    bad = tmp_path / "evil.ckpt"
    torch.save({"model_state": {"x": torch.zeros(1)}, "obj": _Evil()}, bad)
    with pytest.raises(ValueError, match="refused"):
        convert_afno(bad, tmp_path / "out", _args(img_size=[40, 80]))
    assert not (tmp_path / "out").exists()
    assert convert_main(["afno", str(bad), str(tmp_path / "out2")]) == 1


# -- rollout and batching -------------------------------------------------------------------------
def test_steps_equals_repeated_application(fixture_model, fields):
    once = _run(fixture_model, fields)
    twice = _run(fixture_model, once.numpy())
    rolled = _run(fixture_model, fields, {"steps": 2})
    assert rolled.shape == (1, 2, 5, 40, 80)
    torch.testing.assert_close(rolled[:, 0], once, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rolled[:, 1], twice, rtol=1e-5, atol=1e-5)
    one = _run(fixture_model, fields, {"steps": np.int64(1)})
    assert one.shape == (1, 1, 5, 40, 80)


def test_batch_of_two_equals_two_of_one(fixture_model, fields):
    other = (fields[:, :, ::-1, :] * 0.5).copy()
    both = _run(fixture_model, np.concatenate([fields, other]))
    torch.testing.assert_close(both[:1], _run(fixture_model, fields), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1:], _run(fixture_model, other), rtol=1e-5, atol=1e-5)


def test_batch_key_separates_steps(fixture_model, fields):
    prepared = fixture_model.prepare({"fields": fields}, {})
    k1 = fixture_model.batch_key(prepared, {})
    assert k1 == fixture_model.batch_key(prepared, {"other": 1})
    assert k1 != fixture_model.batch_key(prepared, {"steps": 1})
    assert fixture_model.batch_key(prepared, {"steps": 2}) != fixture_model.batch_key(prepared, {"steps": 3})


# -- bad inputs -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "inputs, parameters, match",
    [
        ({"fields": np.zeros((1, 5, 40, 72), np.float32)}, {}, "shape"),
        ({"fields": np.zeros((1, 5, 48, 80), np.float32)}, {}, "shape"),
        ({"fields": np.zeros((1, 4, 40, 80), np.float32)}, {}, "shape"),
        ({"fields": np.zeros((5, 40, 80), np.float32)}, {}, "shape"),
        ({"fields": np.zeros((1, 5, 40, 80), np.float64)}, {}, "FP32"),
        ({"fields": [b"x"]}, {}, "FP32"),
        ({"images": np.zeros((1, 5, 40, 80), np.float32)}, {}, "unexpected"),
        ({}, {}, "missing"),
        ({"fields": np.zeros((1, 5, 40, 80), np.float32)}, {"steps": 0}, "steps"),
        ({"fields": np.zeros((1, 5, 40, 80), np.float32)}, {"steps": "x"}, "steps"),
        ({"fields": np.zeros((1, 5, 40, 80), np.float32)}, {"steps": "2"}, "steps"),
        ({"fields": np.zeros((1, 5, 40, 80), np.float32)}, {"steps": 2.0}, "steps"),
        ({"fields": np.zeros((1, 5, 40, 80), np.float32)}, {"steps": True}, "steps"),
        ({"fields": np.zeros((1, 5, 40, 80), np.float32)}, {"steps": 65}, "steps"),
        ({"fields": np.zeros((1, 5, 40, 80), np.float32)}, {"steps": -1}, "steps"),
    ],
)
def test_bad_inputs(fixture_model, inputs, parameters, match):
    with pytest.raises(InputError, match=match):
        fixture_model.prepare(inputs, parameters)


def test_steps_needs_equal_chans(tmp_path):
    model = load_model(random_afno_folder(tmp_path / "m", {"in_chans": 3, "out_chans": 2}))
    x = model.example_inputs(2)
    assert _run(model, x["fields"]).shape == (2, 2, 16, 32)
    with pytest.raises(InputError, match="in_chans == out_chans"):
        model.prepare(x, {"steps": 2})
    with pytest.raises(InputError, match="in_chans == out_chans"):
        model.forward(model.prepare(x, {}), {"steps": 2})


# -- random folder ----------------------------------------------------------------------------------
def test_random_folder_is_deterministic(tmp_path):
    a = random_afno_folder(tmp_path / "a", seed=3)
    b = random_afno_folder(tmp_path / "b", seed=3)
    c = random_afno_folder(tmp_path / "c", seed=4)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    model = load_model(a)
    model.warmup()
    x = model.example_inputs(1)["fields"]
    y = _run(model, x)
    assert y.shape == (1, 3, 16, 32) and torch.isfinite(y).all()
    assert not torch.allclose(y, torch.from_numpy(x))  # the network does something


def test_bad_config_rejected(tmp_path):
    with pytest.raises(ValueError, match="multiple of patch_size"):
        random_afno_folder(tmp_path / "x", {"img_size": [18, 32]})
    with pytest.raises(ValueError, match="num_blocks"):
        random_afno_folder(tmp_path / "y", {"embed_dim": 30})
