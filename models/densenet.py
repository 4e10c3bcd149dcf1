"""DenseNet (Huang et al., 2017), exactly torchvision's ``torchvision.models.DenseNet``, for inference.

Parameter names equal torchvision's ``DenseNet.state_dict()`` names, so a torchvision checkpoint
(after ``bin/modelsrv-convert densenet``) loads unchanged. Eval mode only: BatchNorm uses its
running statistics (eps 1e-5) and dropout (``drop_rate``) is never active, so it is left out.

Inputs: ``images`` FP32 [N,3,H,W] (already normalized), or ``image`` BYTES [N] (JPEG/PNG/WebP/BMP
bytes) preprocessed exactly like torchvision's ImageNet recipe: PIL decode, ``convert('RGB')``,
``Resize(256)``, ``CenterCrop(224)``, ``ToTensor()``, ``Normalize(mean, std)``.
Output: ``logits`` FP32 [N,num_classes].

``config.json``: torchvision's constructor arguments (growth_rate, block_config, num_init_features,
bn_size, num_classes; densenet121 by default), plus an optional ``channels_last`` (bool; default
true on CUDA, false on the CPU, where it is faster but unshares the memory-mapped conv weights).
"""

from __future__ import annotations

import argparse
import io
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from models import weights
from models.base import InputError, Model, RequestTensor, TensorSpec
from models.weights import build_on_meta, load_into, read_state_dict, torch_load_tensors, write_model_folder

# torchvision's densenet121/161/169/201 (torchvision.models.densenet).
ARCHS: dict[str, dict[str, Any]] = {
    "densenet121": {"growth_rate": 32, "block_config": [6, 12, 24, 16], "num_init_features": 64},
    "densenet161": {"growth_rate": 48, "block_config": [6, 12, 36, 24], "num_init_features": 96},
    "densenet169": {"growth_rate": 32, "block_config": [6, 12, 32, 32], "num_init_features": 64},
    "densenet201": {"growth_rate": 32, "block_config": [6, 12, 48, 32], "num_init_features": 64},
}

# torchvision's ImageNet preprocessing (the weights' transforms: Resize(256), CenterCrop(224)).
RESIZE_SIZE = 256
CROP_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Only decoders that run in-process and parse simple formats (no EPS/ghostscript and friends).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# Decompression bombs and absurd aspect ratios: Resize(256) scales the SHORT side to 256, so a
# 1x100000 picture would become 256x25600000. Both are refused rather than padded or cropped early.
# The pixel limits are the ``max_image_pixels`` model option (the server's directive of that name):
# encoded ``image`` bytes are decoded whole before Resize(256), so their cost is the source size
# (measured on 2 shared cores: 1 Mpx JPEG 0.1 s, 4 Mpx 0.4 s, 16 Mpx 0.7 s and +190 MB); FP32
# ``images`` run the network at their own size (2300x2300: 22 s and 1.7 GB of activations), so
# their default is lower. A set option applies to both (tensors of 224x224, what image bytes
# become, are always accepted).
MAX_SOURCE_PIXELS = 16 * 1024 * 1024  # image bytes: a 12 Mpx phone photo fits; 4096x4096 at most
MAX_TENSOR_PIXELS = 1024 * 1024  # images tensors: 1024x1024, 2.5 s on one core (224x224: 0.09 s)
MAX_RESIZED_LONG_SIDE = 32 * RESIZE_SIZE


# ---------------------------------------------------------------------------------------------
# The network (torchvision.models.densenet, same module tree and names)
# ---------------------------------------------------------------------------------------------
class _DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (bottleneck to bn_size*growth_rate) then BN-ReLU-Conv3x3 (to growth_rate)."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)  # [N, C_in, H, W]: every earlier output of the block
        # norm1 output is a fresh tensor, so the in-place ReLU never touches the inputs.
        x = self.conv1(self.relu1(self.norm1(x)))  # [N, bn_size*growth_rate, H, W]
        return self.conv2(self.relu2(self.norm2(x)))  # [N, growth_rate, H, W]


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; each sees the concatenation of the block input and all earlier outputs."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)  # [N, C_in + num_layers*growth_rate, H, W]


class _Transition(nn.Sequential):
    """BN-ReLU-Conv1x1 (halves the channels) then AvgPool 2x2 (halves H and W, floor)."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """torchvision's DenseNet-BC: stem, dense blocks with transitions, norm5, ReLU, global pool, Linear."""

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                [
                    # [N,3,H,W] -> [N,num_init_features,H/2,W/2] -> maxpool -> [.., H/4, W/4]
                    ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                ]
            )
        )
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, num_features, bn_size, growth_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(num_features, num_features // 2))
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)  # [N, num_features, H/32, W/32] for four blocks
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))  # [N, num_features, 1, 1]
        out = torch.flatten(out, 1)  # [N, num_features]
        return self.classifier(out)  # [N, num_classes]


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DenseNetConfig:
    """torchvision's ``DenseNet`` constructor arguments; the defaults are densenet121's."""

    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    num_classes: int = 1000
    channels_last: bool | None = None  # None: true on CUDA, false on the CPU (see DenseNetModel)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> DenseNetConfig:
        """Validate a config.json dict (absent keys take the defaults; others such as ``model_type`` are ignored)."""
        d = {f: config[f] for f in cls.__dataclass_fields__ if f in config}
        channels_last = d.get("channels_last")
        if channels_last is not None and not isinstance(channels_last, bool):
            raise ValueError(f"densenet config: channels_last must be true or false, got {channels_last!r}")
        for key in ("growth_rate", "num_init_features", "bn_size", "num_classes"):
            v = d.get(key, getattr(cls, key))
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"densenet config: {key} must be a positive integer, got {v!r}")
        blocks = d.get("block_config", cls.block_config)
        if (
            not isinstance(blocks, list | tuple)
            or not blocks
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in blocks)
        ):
            raise ValueError(f"densenet config: block_config must be a non-empty list of positive integers, got {blocks!r}")
        return cls(
            growth_rate=d.get("growth_rate", cls.growth_rate),
            block_config=tuple(int(b) for b in blocks),
            num_init_features=d.get("num_init_features", cls.num_init_features),
            bn_size=d.get("bn_size", cls.bn_size),
            num_classes=d.get("num_classes", cls.num_classes),
            channels_last=channels_last,
        )

    def to_json(self) -> dict[str, Any]:
        """The config.json of this architecture (``channels_last`` only when it was set)."""
        out: dict[str, Any] = {
            "model_type": "densenet",
            "growth_rate": self.growth_rate,
            "block_config": list(self.block_config),
            "num_init_features": self.num_init_features,
            "bn_size": self.bn_size,
            "num_classes": self.num_classes,
        }
        if self.channels_last is not None:
            out["channels_last"] = self.channels_last
        return out


def densenet_from_config(cfg: DenseNetConfig) -> DenseNet:
    return DenseNet(
        growth_rate=cfg.growth_rate,
        block_config=cfg.block_config,
        num_init_features=cfg.num_init_features,
        bn_size=cfg.bn_size,
        num_classes=cfg.num_classes,
    )


def min_input_size(num_blocks: int) -> int:
    """Smallest H (or W) the network accepts: every transition's AvgPool 2x2 needs at least 2 rows."""
    size = 1
    while True:
        h = (size - 1) // 2 + 1  # conv0 7x7/2 pad 3
        h = (h - 1) // 2 + 1  # pool0 3x3/2 pad 1
        ok = True
        for _ in range(num_blocks - 1):
            if h < 2:
                ok = False
                break
            h //= 2
        if ok:
            return size
        size += 1


# ---------------------------------------------------------------------------------------------
# torchvision's ImageNet preprocessing, on PIL images like torchvision.transforms does it
# ---------------------------------------------------------------------------------------------
def resized_size(width: int, height: int, size: int = RESIZE_SIZE) -> tuple[int, int]:
    """``Resize(size)``'s output (w, h): shorter side -> size, longer side TRUNCATED (torchvision)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop(img: Image.Image, size: int = CROP_SIZE) -> Image.Image:
    """torchvision's ``CenterCrop`` on a PIL image: zero padding if smaller, offsets with Python's round.

    After ``Resize(256)`` the image is never smaller than 224, so the padding only matters for
    direct calls; it follows ``torchvision.transforms.functional.center_crop`` anyway.
    """
    width, height = img.size
    if size > width or size > height:
        pad_l = (size - width) // 2 if size > width else 0
        pad_t = (size - height) // 2 if size > height else 0
        pad_r = (size - width + 1) // 2 if size > width else 0
        pad_b = (size - height + 1) // 2 if size > height else 0
        padded = Image.new(img.mode, (width + pad_l + pad_r, height + pad_t + pad_b), 0)
        padded.paste(img, (pad_l, pad_t))
        img = padded
        width, height = img.size
        if (width, height) == (size, size):
            return img
    top = int(round((height - size) / 2.0))  # round half to even, like torchvision
    left = int(round((width - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def clean_message(text: str) -> str:
    """An exception's text without object reprs and heap addresses (``<_io.BytesIO object at 0x7f..>``)."""
    text = re.sub(r"<[^<>]*\bat 0x[0-9a-fA-F]+>", "the data", text)
    return re.sub(r"\b0x[0-9a-fA-F]{6,}\b", "0x...", text)


def too_many_pixels(what: str, limit: int) -> str:
    return f"{what} is more than the {limit} allowed (max_image_pixels {limit})"


def decode_and_crop(data: bytes, max_pixels: int = MAX_SOURCE_PIXELS) -> torch.Tensor:
    """Image bytes -> uint8 [3,224,224] RGB after Resize(256) + CenterCrop(224). ValueError if unusable.

    The size is checked from the header (``Image.open`` reads no pixel) before anything is decoded.
    """
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        width, height = img.size
        if width * height > max_pixels:
            raise ValueError(too_many_pixels(f"{width}x{height} pixels", max_pixels))
        # convert('RGB') DROPS alpha (no compositing), as torchvision's pil_loader does.
        img = img.convert("RGB")
    except ValueError:
        raise
    except Image.DecompressionBombError:  # PIL's own check, above 2**27 pixels: before ours, in open()
        raise ValueError(too_many_pixels("the number of pixels", max_pixels)) from None
    except Exception as exc:  # UnidentifiedImageError, truncated data, decoder errors
        raise ValueError(f"cannot decode image ({type(exc).__name__}: {clean_message(str(exc))})") from None
    if min(width, height) < 1:
        raise ValueError("image has no pixels")
    new_w, new_h = resized_size(width, height)
    if max(new_w, new_h) > MAX_RESIZED_LONG_SIDE:
        raise ValueError(
            f"aspect ratio too extreme: {width}x{height} would be resized to {new_w}x{new_h} "
            f"(longest side allowed {MAX_RESIZED_LONG_SIDE})"
        )
    if (new_w, new_h) != (width, height):
        # PIL's own bilinear on uint8: antialiased when shrinking, rounded to uint8.
        img = img.resize((new_w, new_h), Image.BILINEAR)
    img = center_crop(img, CROP_SIZE)
    hwc = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))  # [224,224,3]
    return hwc.permute(2, 0, 1).contiguous()  # [3,224,224]


_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(-1, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(-1, 1, 1)


def normalize(cropped: torch.Tensor) -> torch.Tensor:
    """uint8 [...,3,H,W] -> float32, ``ToTensor`` (/255) then ``Normalize`` with the same op order."""
    return cropped.to(torch.float32).div(255).sub(_MEAN).div(_STD)


# ---------------------------------------------------------------------------------------------
# The servable model
# ---------------------------------------------------------------------------------------------
class DenseNetModel(Model):
    """Image classifier: ``images`` (normalized FP32) or ``image`` (encoded bytes) -> ``logits``."""

    model_type: ClassVar[str] = "densenet"

    @classmethod
    def convert(cls, src: Path, out: Path, args: argparse.Namespace) -> Path:
        return convert_densenet(src, out, args)

    @classmethod
    def add_convert_arguments(cls, parser: argparse.ArgumentParser) -> None:
        _add_arguments(parser)

    def __init__(
        self, folder: Path, config: dict[str, Any], device: torch.device, cfg: DenseNetConfig, module: DenseNet
    ) -> None:
        super().__init__(folder, config, device)
        self.cfg = cfg
        self.module = module
        self.num_classes = cfg.num_classes
        self.min_size = min_input_size(len(cfg.block_config))
        # the server's max_image_pixels directive arrives as a config option (load_model(options=))
        limit = config.get("max_image_pixels")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ValueError(f"densenet: max_image_pixels must be a positive integer, got {limit!r}")
        self.max_image_pixels = limit or MAX_SOURCE_PIXELS
        self.max_tensor_pixels = max(limit, CROP_SIZE * CROP_SIZE) if limit else MAX_TENSOR_PIXELS  # 224x224 always
        # channels_last runs ~15% faster on CPU (oneDNN) but copies the conv weights out of the
        # shared memory map into every worker, so on the CPU it is opt-in ("channels_last": true);
        # on CUDA the weights are copied to the device anyway.
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
        if self.channels_last:
            self.module = module.to(memory_format=torch.channels_last)
        # Both optional in the specs; prepare requires exactly one of them.
        self.inputs = (
            TensorSpec("images", "FP32", (-1, 3, -1, -1), optional=True),
            TensorSpec("image", "BYTES", (-1,), optional=True),
        )
        self.outputs = (TensorSpec("logits", "FP32", (-1, self.num_classes)),)

    @classmethod
    def build(cls, folder: Path, config: dict[str, Any], device: torch.device) -> DenseNetModel:
        cfg = DenseNetConfig.from_dict(config)
        module = build_on_meta(lambda: densenet_from_config(cfg))
        # torchvision's published .pth files have no num_batches_tracked: unused in eval anyway.
        load_into(module, read_state_dict(folder), device, optional=("num_batches_tracked",))
        if any(p.dtype != torch.float32 for p in module.parameters()):
            module = module.float()
        return cls(Path(folder), config, device, cfg, module)

    def prepare(self, inputs: Mapping[str, RequestTensor], parameters: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        self.check_inputs(inputs)
        if ("images" in inputs) == ("image" in inputs):
            raise InputError("send exactly one of 'images' (FP32 [N,3,H,W], normalized) or 'image' (BYTES [N])")
        if "images" in inputs:
            images = inputs["images"]
            assert isinstance(images, np.ndarray)
            h, w = images.shape[2:]
            if h < self.min_size or w < self.min_size:
                raise InputError(
                    f"input 'images' is {h}x{w}; this model needs at least {self.min_size}x{self.min_size}"
                )
            if h * w > self.max_tensor_pixels:
                raise InputError(f"input 'images': {too_many_pixels(f'{h}x{w}', self.max_tensor_pixels)}")
            return {"images": torch.tensor(images)}  # a copy: the request buffer may be read-only
        crops = []
        for i, data in enumerate(inputs["image"]):
            if not isinstance(data, bytes | bytearray | memoryview):
                raise InputError(f"input 'image' item {i}: expected bytes, got {type(data).__name__}")
            try:
                crops.append(decode_and_crop(bytes(data), self.max_image_pixels))
            except ValueError as exc:
                raise InputError(f"input 'image' item {i}: {exc}") from None
        return {"images": normalize(torch.stack(crops))}  # [N,3,224,224]

    def forward(self, batch: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            images = batch["images"].to(self.device, torch.float32)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            logits = self.module(images)
        return {"logits": logits.float().cpu()}

    def example_inputs(self, batch_size: int = 1) -> dict[str, RequestTensor]:
        rng = np.random.default_rng(0)
        return {"images": rng.standard_normal((batch_size, 3, CROP_SIZE, CROP_SIZE), dtype=np.float32)}


def random_densenet_folder(out: Path, config: dict | None = None, seed: int = 0) -> Path:
    """Write a deterministic randomly initialised model folder (demo densenet121, tiny test models).

    torch's default nn init under ``manual_seed(seed)`` inside ``fork_rng``, so the same seed
    gives the same bytes and the caller's global RNG is left alone. BatchNorm keeps its default
    running statistics (mean 0, var 1).
    """
    cfg = DenseNetConfig.from_dict(config or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = densenet_from_config(cfg)
    return write_model_folder(Path(out), cfg.to_json(), module.state_dict())


# ---------------------------------------------------------------------------------------------
# Converter: torchvision .pth -> model folder
# ---------------------------------------------------------------------------------------------
# torchvision's published files use 'denselayerN.norm.1.weight' (from an older nn.Sequential).
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_CONFIG_KEYS = ("growth_rate", "block_config", "num_init_features", "bn_size", "num_classes")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=sorted(ARCHS), help="take the architecture of a torchvision model")
    parser.add_argument("--growth-rate", type=int)
    parser.add_argument(
        "--block-config", type=lambda s: [int(x) for x in s.split(",")], help="layers per block, e.g. 6,12,24,16"
    )
    parser.add_argument("--num-init-features", type=int)
    parser.add_argument("--bn-size", type=int)
    parser.add_argument("--num-classes", type=int)


def rename_legacy_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """'...denselayer1.norm.1.weight' -> '...denselayer1.norm1.weight'; strip a DataParallel 'module.'."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        m = _LEGACY_KEY.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out


def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Read the architecture off the weight shapes (torchvision names)."""
    try:
        num_init_features = state["features.conv0.weight"].shape[0]
        growth_rate = state["features.denseblock1.denselayer1.conv2.weight"].shape[0]
        bn_size = state["features.denseblock1.denselayer1.conv1.weight"].shape[0] // growth_rate
        num_classes = state["classifier.weight"].shape[0]
    except KeyError as exc:
        raise ValueError(f"not a torchvision DenseNet state dict: no {exc.args[0]!r}") from None
    layers: dict[int, int] = {}
    for key in state:
        m = re.match(r"^features\.denseblock(\d+)\.denselayer(\d+)\.", key)
        if m:
            b, n = int(m.group(1)), int(m.group(2))
            layers[b] = max(layers.get(b, 0), n)
    block_config = [layers[b] for b in sorted(layers)]
    if sorted(layers) != list(range(1, len(layers) + 1)):
        raise ValueError(f"not a torchvision DenseNet state dict: dense blocks {sorted(layers)}")
    return {
        "model_type": "densenet",
        "growth_rate": int(growth_rate),
        "block_config": block_config,
        "num_init_features": int(num_init_features),
        "bn_size": int(bn_size),
        "num_classes": int(num_classes),
    }


def check_state(cfg: DenseNetConfig, state: Mapping[str, torch.Tensor]) -> None:
    """ValueError unless ``state`` has exactly the names and shapes of the architecture of ``cfg``."""
    weights.check_state(lambda: densenet_from_config(cfg), state, f"the DenseNet config {cfg.to_json()}")


def convert_densenet(src: Path, out: Path, args: argparse.Namespace | None = None) -> Path:
    """torchvision densenet*.pth (legacy or modern key names) -> ``config.json`` + ``model.safetensors``.

    The architecture is read off the weights; ``--arch`` or explicit options override it and are
    then checked against the weights (a mismatch is an error, never a silent partial load).
    """
    state = rename_legacy_keys(weights.plain_state_dict(torch_load_tensors(Path(src))))
    config = infer_config(state)
    if args is not None:
        if getattr(args, "arch", None):
            config.update(ARCHS[args.arch])
        for key in _CONFIG_KEYS:
            value = getattr(args, key, None)
            if value is not None:
                config[key] = value
    cfg = DenseNetConfig.from_dict(config)
    check_state(cfg, state)
    # Serve in fp32 (the reference precision); integers (num_batches_tracked) stay as they are.
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return write_model_folder(Path(out), cfg.to_json(), state)
