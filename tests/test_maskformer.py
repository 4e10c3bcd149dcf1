"""MaskFormer (models/maskformer.py) against transformers' MaskFormerForInstanceSegmentation.

transformers is the reference only: tiny random transformers models are saved with
``save_pretrained`` (safetensors) and must give the same three outputs through
``models.load_model``; the folder our own ``random_maskformer_folder`` writes must load in
transformers. transformers' MaskFormerLoss asks for scipy at construction time (for training's
Hungarian matching); scipy is not installed, and inference never calls it, so the check is
switched off for these tests only.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import models.maskformer as mf
from models import InputError, load_model
from models.convert import main as convert_main
from models.weights import write_model_folder

torch.set_num_threads(1)

TOL = 1e-4  # max abs diff of logits vs transformers (fp32)
STAGES = ["stage1", "stage2", "stage3", "stage4"]


@pytest.fixture(autouse=True)
def _no_scipy_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.models.maskformer.modeling_maskformer as hf_mod

    monkeypatch.setattr(hf_mod, "requires_backends", lambda *args, **kwargs: None)


def hf_model(kind: str, seed: int = 0):
    """A tiny random transformers MaskFormer, eval mode; every parameter and BN statistic randomized."""
    from transformers import (
        DetrConfig,
        MaskFormerConfig,
        MaskFormerForInstanceSegmentation,
        MaskFormerSwinConfig,
        ResNetConfig,
        SwinConfig,
    )

    d_model = 32
    if kind == "maskformer-swin":  # what transformers 5 saves
        backbone = MaskFormerSwinConfig(
            embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=4, image_size=64, mlp_ratio=2.0,
            out_features=STAGES,
        )  # fmt: skip
    elif kind == "swin":  # what the facebook/maskformer-swin-* Hub configs hold
        backbone = SwinConfig(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[2, 2, 4, 4], window_size=4, image_size=64)
    elif kind == "resnet-bottleneck":
        backbone = ResNetConfig(
            embedding_size=16, hidden_sizes=[32, 32, 64, 64], depths=[1, 2, 1, 1], layer_type="bottleneck",
            downsample_in_bottleneck=True, out_features=STAGES,
        )  # fmt: skip
    elif kind == "resnet-basic":  # last width == d_model: no input projection
        backbone = ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 16, 32, 32], depths=[2, 1, 1, 1], layer_type="basic",
            out_features=STAGES,
        )  # fmt: skip
    else:
        raise AssertionError(kind)
    decoder = DetrConfig(
        d_model=d_model, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64, num_queries=10
    )
    config = MaskFormerConfig(
        backbone_config=backbone, decoder_config=decoder, fpn_feature_size=32, mask_feature_size=32, num_labels=7
    )
    torch.manual_seed(seed)
    model = MaskFormerForInstanceSegmentation(config).eval()
    return mf.randomize_(model, seed)


def pixels(n: int, h: int = 64, w: int = 96, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, h, w), dtype=np.float32)


def run_ours(model, x: np.ndarray) -> dict[str, torch.Tensor]:
    return model.forward(model.prepare({"pixel_values": x}, {}), {})


def run_hf(hf, x: np.ndarray):
    with torch.no_grad():
        return hf(pixel_values=torch.from_numpy(x))


def hf_semantic(class_logits: torch.Tensor, mask_logits: torch.Tensor, size: tuple[int, int]):
    """transformers' own post-processing: (maps [N,H,W], scores [N,L,H,W])."""
    from transformers.models.maskformer.image_processing_pil_maskformer import MaskFormerImageProcessorPil

    outputs = types.SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)
    res = MaskFormerImageProcessorPil().post_process_semantic_segmentation(
        outputs, target_sizes=[size] * class_logits.shape[0], return_segmentation_scores=True
    )
    return torch.stack([r.segmentation for r in res]), torch.stack([r.segmentation_scores for r in res])


def assert_matches_hf(
    ours: dict[str, torch.Tensor], ref, size: tuple[int, int], varied: bool = True
) -> tuple[float, float]:
    """Logits within TOL of transformers'; the semantic map as transformers post-processes them.

    ``varied``: the map must hold more than one class. Untrained decoders often give near-identical
    queries that all vote for one class (then only the logits are informative, compared value by value).
    """
    cls = ours["class_queries_logits"]
    masks = ours["masks_queries_logits"]
    seg = ours["segmentation"]
    assert cls.dtype == torch.float32 and masks.dtype == torch.float32 and seg.dtype == torch.int64
    assert cls.shape == ref.class_queries_logits.shape
    assert masks.shape == ref.masks_queries_logits.shape == (cls.shape[0], cls.shape[1], size[0] // 4, size[1] // 4)
    assert seg.shape == (cls.shape[0], *size)
    d_cls = (cls - ref.class_queries_logits).abs().max().item()
    d_masks = (masks - ref.masks_queries_logits).abs().max().item()
    assert d_cls < TOL and d_masks < TOL, (d_cls, d_masks)
    # The map equals transformers' map of transformers' logits except where two classes tie.
    ref_seg, ref_scores = hf_semantic(ref.class_queries_logits, ref.masks_queries_logits, size)
    differ = seg != ref_seg
    if differ.any():
        top2 = ref_scores.topk(2, dim=1).values
        gap = top2[:, 0] - top2[:, 1]
        assert (gap[differ] < 1e-4).all(), "segmentation differs where the classes do not tie"
    # And transformers' post-processing of OUR logits is our map, exactly.
    exact, _ = hf_semantic(cls, masks, size)
    assert torch.equal(seg, exact)
    if varied:
        assert len(seg.unique()) > 1, "degenerate test: one class everywhere"
    return d_cls, d_masks


@pytest.mark.parametrize("kind", ["maskformer-swin", "swin", "resnet-bottleneck", "resnet-basic"])
def test_matches_transformers(kind: str, tmp_path: Path) -> None:
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model = load_model(tmp_path)
    assert isinstance(model, mf.MaskFormer)
    size = (64, 96)  # not square: catches H/W mix-ups; Swin stages 16x24 .. 2x3 pad to the window
    x = pixels(2, *size)
    assert_matches_hf(run_ours(model, x), run_hf(hf, x), size, varied=kind.endswith("swin"))
    assert [s.name for s in model.outputs] == ["class_queries_logits", "masks_queries_logits", "segmentation"]
    assert model.outputs[0].shape == (-1, 10, 8)


def test_input_projection_presence(tmp_path: Path) -> None:
    """resnet-basic ends at d_model channels: no input projection; Swin ends wider: one."""
    folder = mf.random_maskformer_folder(tmp_path / "a")
    assert load_model(folder).module.model.transformer_module.input_projection is not None
    cfg = mf.tiny_config(backbone="resnet")
    cfg["backbone_config"]["hidden_sizes"] = [32, 32, 64, 32]
    folder = mf.random_maskformer_folder(tmp_path / "b", config=cfg)
    assert load_model(folder).module.model.transformer_module.input_projection is None


@pytest.mark.parametrize("backbone", ["swin", "resnet"])
def test_random_folder_loads_in_transformers(backbone: str, tmp_path: Path) -> None:
    from transformers import MaskFormerForInstanceSegmentation

    folder = mf.random_maskformer_folder(tmp_path / "m", seed=3, config=mf.tiny_config(backbone=backbone))
    hf, info = MaskFormerForInstanceSegmentation.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.eval()
    model = load_model(folder)
    size = (96, 64)
    x = pixels(2, *size, seed=1)
    assert_matches_hf(run_ours(model, x), run_hf(hf, x), size, varied=False)


def test_random_folder_is_deterministic(tmp_path: Path) -> None:
    a = mf.random_maskformer_folder(tmp_path / "a", seed=0)
    b = mf.random_maskformer_folder(tmp_path / "b", seed=0)
    c = mf.random_maskformer_folder(tmp_path / "c", seed=1)
    data = [(f / "model.safetensors").read_bytes() for f in (a, b, c)]
    assert data[0] == data[1] and data[0] != data[2]
    config = json.loads((a / "config.json").read_text())
    assert config["model_type"] == "maskformer" and config["backbone_config"]["model_type"] == "maskformer-swin"
    assert config["backbone_config"]["embed_dim"] == 16 and config["decoder_config"]["num_queries"] == 10


def test_batch_of_two_equals_two_of_one(tmp_path: Path) -> None:
    model = load_model(mf.random_maskformer_folder(tmp_path / "m"))
    x = pixels(2, 64, 64, seed=5)
    both = run_ours(model, x)
    one = [run_ours(model, x[i : i + 1]) for i in range(2)]
    for name in ("class_queries_logits", "masks_queries_logits"):
        torch.testing.assert_close(both[name], torch.cat([o[name] for o in one]), rtol=0, atol=1e-5)
    assert torch.equal(both["segmentation"], torch.cat([o["segmentation"] for o in one]))
    assert model.batch_key(model.prepare({"pixel_values": x}, {}), {}) != model.batch_key(
        model.prepare({"pixel_values": pixels(1, 64, 96)}, {}), {}
    )


def test_example_inputs_and_warmup(tmp_path: Path) -> None:
    model = load_model(mf.random_maskformer_folder(tmp_path / "m"))
    model.warmup()
    out = run_ours(model, model.example_inputs(3)["pixel_values"])
    assert out["class_queries_logits"].shape == (3, 10, 6)
    assert out["masks_queries_logits"].shape == (3, 10, 16, 16)
    assert out["segmentation"].shape == (3, 64, 64)
    assert int(out["segmentation"].min()) >= 0 and int(out["segmentation"].max()) < 5


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"images": pixels(1)}, "unexpected input"),
        ({}, "missing input"),
        ({"pixel_values": pixels(1).astype(np.float64)}, "FP32"),
        ({"pixel_values": pixels(1)[0]}, "shape"),
        ({"pixel_values": pixels(1)[:, :1]}, "shape"),
        ({"pixel_values": pixels(0)}, "empty batch"),
        ({"pixel_values": pixels(1, 60, 64)}, "multiples of 32"),
        ({"pixel_values": pixels(1, 64, 48)}, "multiples of 32"),
        ({"pixel_values": pixels(1, 16, 16)}, "multiples of 32"),
        ({"pixel_values": [b"x"]}, "FP32"),
    ],
)
def test_bad_inputs(inputs: dict, message: str, tmp_path: Path) -> None:
    model = load_model(mf.random_maskformer_folder(tmp_path / "m"))
    with pytest.raises(InputError, match=message):
        model.prepare(inputs, {})


def test_bad_pixels_and_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(mf.random_maskformer_folder(tmp_path / "m"))
    x = pixels(1, 32, 32)
    model.prepare({"pixel_values": x}, {})  # the smallest size works
    x[0, 1, 3, 4] = np.nan
    with pytest.raises(InputError, match="NaN"):
        model.prepare({"pixel_values": x}, {})
    monkeypatch.setattr(mf, "MAX_PIXELS", 64 * 64)
    with pytest.raises(InputError, match="at most"):
        model.prepare({"pixel_values": pixels(1, 64, 96)}, {})


def test_segmentation_chunks_and_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resizing the class scores a few classes at a time gives transformers' map exactly, ties included."""
    g = torch.Generator().manual_seed(0)
    cls = torch.randn(2, 6, 9, generator=g)
    cls[..., 5] = cls[..., 2]  # classes 2 and 5 tie everywhere: argmax must keep 2
    masks = torch.randn(2, 6, 5, 7, generator=g)
    size = (20, 28)
    ref, _ = hf_semantic(cls, masks, size)
    assert torch.equal(mf.semantic_segmentation(cls, masks, size), ref)
    monkeypatch.setattr(mf, "SEG_CHUNK_ELEMENTS", 3 * 20 * 28)  # 3 classes per chunk
    chunked = mf.semantic_segmentation(cls, masks, size)
    assert torch.equal(chunked, ref)
    assert (ref == 2).any() and not (ref == 5).any()


def test_converter_from_pickled_transformers_state_dict(tmp_path: Path) -> None:
    """torch.save(model.state_dict()) uses transformers 5's in-memory names (o_proj, mlp.fc1)."""
    hf = hf_model("maskformer-swin", seed=2)
    state = hf.state_dict()
    assert any(".o_proj." in k for k in state) and any(".mlp.fc1." in k for k in state)
    src = tmp_path / "src"
    src.mkdir()
    torch.save(state, src / "pytorch_model.bin")
    hf.config.to_json_file(str(src / "config.json"))
    out = tmp_path / "out"
    assert convert_main(["maskformer", str(src / "pytorch_model.bin"), str(out)]) == 0
    written = load_file(str(out / "model.safetensors"))
    assert not any(".o_proj." in k or ".mlp.fc" in k for k in written)
    assert any(".self_attn.out_proj." in k for k in written) and any("layers.0.fc1." in k for k in written)
    x = pixels(1, 64, 64, seed=4)
    assert_matches_hf(run_ours(load_model(out), x), run_hf(hf, x), (64, 64), varied=False)

    # A config that does not fit the weights is refused, not half-loaded.
    bad = json.loads((src / "config.json").read_text())
    bad["id2label"] = {str(i): str(i) for i in range(3)}
    bad.pop("num_labels", None)
    (src / "bad.json").write_text(json.dumps(bad))
    args = ["maskformer", str(src / "pytorch_model.bin"), str(tmp_path / "bad"), "--config", str(src / "bad.json")]
    assert convert_main(args) == 1
    # A pickle that is not plain tensors is refused by torch.load(weights_only=True).
    torch.save({"model": types.SimpleNamespace(a=1)}, src / "evil.bin")
    assert convert_main(["maskformer", str(src / "evil.bin"), str(tmp_path / "evil")]) == 1


def test_load_accepts_memory_names_and_missing_derived_buffers(tmp_path: Path) -> None:
    reference = mf.random_maskformer_folder(tmp_path / "ref", seed=7)
    config = json.loads((reference / "config.json").read_text())
    state = load_file(str(reference / "model.safetensors"))
    renamed = {}
    for k, v in state.items():
        if k.endswith("relative_position_index") or k == "criterion.empty_weight":
            continue  # derived from the config: rebuilt on load
        k = k.replace(".self_attn.out_proj.", ".self_attn.o_proj.").replace(".fc1.", ".mlp.fc1.")
        renamed[k] = v
    other = write_model_folder(tmp_path / "other", config, renamed)
    x = pixels(1, 64, 64)
    a, b = run_ours(load_model(reference), x), run_ours(load_model(other), x)
    for name in a:
        assert torch.equal(a[name], b[name])


def test_load_refuses_wrong_weights_and_configs(tmp_path: Path) -> None:
    folder = mf.random_maskformer_folder(tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    del state["class_predictor.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="class_predictor.weight"):
        load_model(folder)
    for change in (
        {"backbone_config": {"model_type": "convnext"}},
        {"decoder_config": {"model_type": "deformable_detr"}},
        {"fpn_feature_size": 48},
    ):
        with pytest.raises(ValueError):
            mf.MaskFormerConfig.from_dict({**mf.tiny_config(), **change})
    hub_style = {"model_type": "maskformer", "id2label": {str(i): str(i) for i in range(150)}}
    s = mf.MaskFormerConfig.from_dict(hub_style)  # no backbone/decoder config: transformers' defaults (swin-base, 100 queries)
    assert s.num_labels == 150 and s.decoder.num_queries == 100 and s.backbone.embed_dim == 128
    assert s.backbone.out_indices == (1, 2, 3, 4) and s.size_multiple == 32 and s.mask_stride == 4


@pytest.mark.parametrize("backbone", ["swin", "resnet"])
def test_config_round_trip(backbone: str) -> None:
    cfg = mf.MaskFormerConfig.from_dict(mf.tiny_config(backbone=backbone))
    assert mf.MaskFormerConfig.from_dict(cfg.to_json()) == cfg
    assert mf.MaskFormerConfig.from_dict(json.loads(json.dumps(cfg.to_json()))) == cfg
