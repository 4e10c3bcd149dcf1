"""MaskFormer (Cheng et al., 2021), transformers' ``MaskFormerForInstanceSegmentation``, for inference.

Parameter names equal the names transformers writes to ``model.safetensors`` (and that the
facebook/maskformer-* Hub checkpoints use), so ``save_pretrained`` folders and Hub checkpoints
load unchanged. transformers 5.x renames a few DETR-decoder parameters in memory (``o_proj``,
``layers.N.mlp.fc1``) and back on save; both spellings are accepted (``normalize_state_keys``).

The network, eval mode only (dropout, drop-path and the training loss are left out):

- pixel-level module: a backbone (``MaskFormerSwinBackbone``, the default, or transformers'
  ``ResNetBackbone`` when ``backbone_config.model_type == "resnet"``) gives 4 feature maps
  (strides 4, 8, 16, 32); a feature pyramid network (FPN) merges them top-down and a 3x3 conv
  projects the finest one to the *pixel embeddings* [N, mask_feature_size, H/4, W/4];
- transformer module: the coarsest backbone map (projected 1x1 to ``d_model`` when needed) is
  the memory of a DETR decoder (post-norm, learned queries used as query position embeddings,
  fixed 2-D sine position embeddings on the memory);
- heads: ``class_predictor`` (Linear to num_labels + 1, the last one being "no object") and
  ``mask_embedder`` (3-layer MLP); mask logits = einsum(mask embeddings, pixel embeddings).

The semantic map is ``MaskFormerImageProcessor.post_process_semantic_segmentation`` with the
input's own size as target: softmax over classes without the null class, sigmoid of the masks,
einsum into per-class scores at H/4 x W/4, bilinear resize (align_corners=False) to H x W,
argmax. (transformers resizes the per-class scores after the einsum, not the masks before it;
bilinear resizing is linear, so both orders agree up to rounding, and this one is transformers'.)

Inputs: ``pixel_values`` FP32 [N,3,H,W], already normalized as the image processor does
(ImageNet mean/std). H and W must be multiples of the backbone's total stride (32) and at least
that: an image of another size is refused (InputError), never padded, so that the outputs'
H/4 x W/4 and H x W shapes are exact.
Outputs: ``class_queries_logits`` FP32 [N,Q,num_labels+1], ``masks_queries_logits`` FP32
[N,Q,H/4,W/4], ``segmentation`` INT64 [N,H,W].
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import weights
from models.base import InputError, Model, RequestTensor, TensorSpec
from models.weights import build_on_meta, load_into, read_state_dict, torch_load_tensors, write_model_folder

# ---------------------------------------------------------------------------------------------
# Configuration: transformers' MaskFormerConfig as saved in config.json (nested dicts)
# ---------------------------------------------------------------------------------------------
# Defaults of the transformers config classes, for keys a config.json leaves out.
SWIN_DEFAULTS: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 4,
    "num_channels": 3,
    "embed_dim": 96,
    "depths": [2, 2, 6, 2],
    "num_heads": [3, 6, 12, 24],
    "window_size": 7,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "hidden_act": "gelu",
    "use_absolute_embeddings": False,
    "layer_norm_eps": 1e-5,
}
# MaskFormerConfig's backbone when config.json has none (facebook/maskformer-swin-base-ade).
MASKFORMER_DEFAULT_BACKBONE: dict[str, Any] = {
    "model_type": "swin",
    "depths": [2, 2, 18, 2],
    "image_size": 384,
    "embed_dim": 128,
    "num_heads": [4, 8, 16, 32],
    "window_size": 12,
}
RESNET_DEFAULTS: dict[str, Any] = {
    "num_channels": 3,
    "embedding_size": 64,
    "hidden_sizes": [256, 512, 1024, 2048],
    "depths": [3, 4, 6, 3],
    "layer_type": "bottleneck",
    "hidden_act": "relu",
    "downsample_in_first_stage": False,
    "downsample_in_bottleneck": False,
}
DETR_DEFAULTS: dict[str, Any] = {
    "d_model": 256,
    "decoder_layers": 6,
    "decoder_attention_heads": 8,
    "decoder_ffn_dim": 2048,
    "num_queries": 100,
    "activation_function": "relu",
}

# transformers' ACT2FN entries that these configs use.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}

# Largest image accepted (per image, H*W): the per-class score maps at full size dominate memory.
MAX_PIXELS = 4096 * 4096
# The full-size per-class score maps are resized this many elements (classes x H x W) at a time.
SEG_CHUNK_ELEMENTS = 1 << 24


def _activation(name: Any) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} not supported (known: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]()


@dataclass(frozen=True)
class SwinSettings:
    """What the (MaskFormer) Swin backbone needs from ``backbone_config``."""

    patch_size: int
    num_channels: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    mlp_ratio: float
    qkv_bias: bool
    hidden_act: str
    layer_norm_eps: float
    out_indices: tuple[int, ...]  # 1-based stage numbers whose maps go to the FPN

    @property
    def channels(self) -> list[int]:
        return [self.embed_dim * 2 ** (i - 1) for i in self.out_indices]

    @property
    def strides(self) -> list[int]:
        return [self.patch_size * 2 ** (i - 1) for i in self.out_indices]

    def to_json(self) -> dict[str, Any]:
        """transformers' ``MaskFormerSwinConfig`` dict for these settings."""
        return {
            "model_type": "maskformer-swin", "patch_size": self.patch_size, "num_channels": self.num_channels,
            "embed_dim": self.embed_dim, "depths": list(self.depths), "num_heads": list(self.num_heads),
            "window_size": self.window_size, "mlp_ratio": self.mlp_ratio, "qkv_bias": self.qkv_bias,
            "hidden_act": self.hidden_act, "use_absolute_embeddings": False, "layer_norm_eps": self.layer_norm_eps,
            "out_indices": list(self.out_indices),
        }


@dataclass(frozen=True)
class ResNetSettings:
    """What transformers' ResNet backbone needs from ``backbone_config``."""

    num_channels: int
    embedding_size: int
    hidden_sizes: tuple[int, ...]
    depths: tuple[int, ...]
    layer_type: str
    hidden_act: str
    downsample_in_first_stage: bool
    downsample_in_bottleneck: bool
    out_indices: tuple[int, ...]  # 0 = the stem, i = stage i

    @property
    def channels(self) -> list[int]:
        widths = [self.embedding_size, *self.hidden_sizes]
        return [widths[i] for i in self.out_indices]

    @property
    def strides(self) -> list[int]:
        strides = [4]  # stem: conv stride 2 + max-pool stride 2
        for i in range(len(self.depths)):
            strides.append(strides[-1] * (2 if i > 0 or self.downsample_in_first_stage else 1))
        return [strides[i] for i in self.out_indices]

    def to_json(self) -> dict[str, Any]:
        """transformers' ``ResNetConfig`` dict for these settings."""
        return {
            "model_type": "resnet", "num_channels": self.num_channels, "embedding_size": self.embedding_size,
            "hidden_sizes": list(self.hidden_sizes), "depths": list(self.depths), "layer_type": self.layer_type,
            "hidden_act": self.hidden_act, "downsample_in_first_stage": self.downsample_in_first_stage,
            "downsample_in_bottleneck": self.downsample_in_bottleneck, "out_indices": list(self.out_indices),
        }


@dataclass(frozen=True)
class DecoderSettings:
    """The DETR decoder's part of ``decoder_config``."""

    d_model: int
    layers: int
    heads: int
    ffn_dim: int
    num_queries: int
    activation: str

    def to_json(self) -> dict[str, Any]:
        """transformers' ``DetrConfig`` dict (the decoder part) for these settings."""
        return {
            "model_type": "detr", "d_model": self.d_model, "decoder_layers": self.layers,
            "decoder_attention_heads": self.heads, "decoder_ffn_dim": self.ffn_dim,
            "num_queries": self.num_queries, "activation_function": self.activation,
        }


@dataclass(frozen=True)
class MaskFormerConfig:
    """What the network needs from transformers' ``MaskFormerConfig`` (config.json, nested dicts).

    ``from_dict`` reads and validates it (transformers' defaults for absent keys); ``to_json``
    writes a MaskFormerConfig dict of the same network. A model folder keeps its own config.json
    as written (labels' names and all); ``to_json`` is for folders made from these settings.
    """

    backbone: SwinSettings | ResNetSettings
    decoder: DecoderSettings
    fpn_feature_size: int
    mask_feature_size: int
    num_labels: int
    no_object_weight: float

    @property
    def num_channels(self) -> int:
        return self.backbone.num_channels

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this (the coarsest feature map's stride)."""
        return max(self.backbone.strides)

    @property
    def mask_stride(self) -> int:
        """The pixel embeddings (and mask logits) are at this stride (4 for the usual backbones)."""
        return min(self.backbone.strides)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> MaskFormerConfig:
        """Read transformers' MaskFormerConfig (as a dict); raise ValueError for what is not supported."""
        try:
            return _read_config(config)
        except (ValueError, TypeError, KeyError) as exc:  # a value of the wrong type fails inside int(), len() ...
            raise ValueError(f"maskformer config: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        return {
            "model_type": "maskformer",
            "backbone_config": self.backbone.to_json(),
            "decoder_config": self.decoder.to_json(),
            "fpn_feature_size": self.fpn_feature_size,
            "mask_feature_size": self.mask_feature_size,
            "num_labels": self.num_labels,
            "no_object_weight": self.no_object_weight,
        }


def _out_indices(cfg: Mapping[str, Any], num_stages: int, allow_stem: bool) -> tuple[int, ...]:
    """transformers' BackboneConfigMixin rule: out_indices, else out_features, else the last stage."""
    stage_names = ["stem"] + [f"stage{i}" for i in range(1, num_stages + 1)]
    if cfg.get("out_indices") is not None:
        indices = [int(i) % len(stage_names) for i in cfg["out_indices"]]
    elif cfg.get("out_features") is not None:
        try:
            indices = [stage_names.index(name) for name in cfg["out_features"]]
        except ValueError:
            raise ValueError(f"backbone out_features {cfg['out_features']} not in {stage_names}") from None
    else:
        indices = [num_stages]
    if not allow_stem and 0 in indices:
        raise ValueError("this backbone does not support 'stem' in out_features")
    if len(indices) < 2 or indices != sorted(set(indices)):
        raise ValueError(f"MaskFormer needs >= 2 increasing backbone feature maps; got out_indices {indices}")
    return tuple(indices)


def _pair_int(value: Any, what: str) -> int:
    """Swin allows (h, w) tuples for sizes; every MaskFormer checkpoint uses squares."""
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{what} {value}: only square sizes are supported")
        value = value[0]
    return int(value)


def _read_config(config: Mapping[str, Any]) -> MaskFormerConfig:
    """``MaskFormerConfig.from_dict``."""
    if config.get("model_type") != "maskformer":
        raise ValueError(f"model_type {config.get('model_type')!r} is not 'maskformer'")
    backbone = config.get("backbone_config")
    if backbone is None:
        if config.get("backbone") or config.get("use_timm_backbone"):
            raise ValueError("timm / named backbones are not supported; use a backbone_config (swin or resnet)")
        backbone = MASKFORMER_DEFAULT_BACKBONE
    if not isinstance(backbone, Mapping):
        raise ValueError("backbone_config must be a dict")
    kind = backbone.get("model_type")
    if kind in ("swin", "maskformer-swin"):
        b = {**SWIN_DEFAULTS, **backbone}
        if b["use_absolute_embeddings"]:
            raise ValueError("Swin use_absolute_embeddings=True is not supported")
        depths = tuple(int(d) for d in b["depths"])
        heads = tuple(int(h) for h in b["num_heads"])
        if len(heads) != len(depths):
            raise ValueError(f"swin depths {depths} and num_heads {heads} differ in length")
        embed_dim = int(b["embed_dim"])
        for i, h in enumerate(heads):
            if (embed_dim * 2**i) % h:
                raise ValueError(f"swin stage {i + 1}: width {embed_dim * 2**i} not divisible by {h} heads")
        # transformers turns a plain "swin" config into MaskFormerSwin with all stages out.
        out = tuple(range(1, len(depths) + 1)) if kind == "swin" else _out_indices(b, len(depths), False)
        backbone_settings: SwinSettings | ResNetSettings = SwinSettings(
            patch_size=_pair_int(b["patch_size"], "patch_size"),
            num_channels=int(b["num_channels"]),
            embed_dim=embed_dim,
            depths=depths,
            num_heads=heads,
            window_size=int(b["window_size"]),
            mlp_ratio=float(b["mlp_ratio"]),
            qkv_bias=bool(b["qkv_bias"]),
            hidden_act=str(b["hidden_act"]),
            layer_norm_eps=float(b["layer_norm_eps"]),
            out_indices=out,
        )
        _activation(backbone_settings.hidden_act)
        if len(out) < 2:
            raise ValueError("MaskFormer needs >= 2 backbone feature maps")
    elif kind == "resnet":
        b = {**RESNET_DEFAULTS, **backbone}
        if b["layer_type"] not in ("basic", "bottleneck"):
            raise ValueError(f"resnet layer_type {b['layer_type']!r} is not 'basic' or 'bottleneck'")
        depths = tuple(int(d) for d in b["depths"])
        sizes = tuple(int(s) for s in b["hidden_sizes"])
        if len(sizes) != len(depths):
            raise ValueError(f"resnet depths {depths} and hidden_sizes {sizes} differ in length")
        backbone_settings = ResNetSettings(
            num_channels=int(b["num_channels"]),
            embedding_size=int(b["embedding_size"]),
            hidden_sizes=sizes,
            depths=depths,
            layer_type=str(b["layer_type"]),
            hidden_act=str(b["hidden_act"]),
            downsample_in_first_stage=bool(b["downsample_in_first_stage"]),
            downsample_in_bottleneck=bool(b["downsample_in_bottleneck"]),
            out_indices=_out_indices(b, len(depths), True),
        )
        _activation(backbone_settings.hidden_act)
    else:
        raise ValueError(f"backbone model_type {kind!r} not supported (swin, maskformer-swin, resnet)")

    dec_cfg = config.get("decoder_config") or {}
    if dec_cfg.get("model_type", "detr") != "detr":
        raise ValueError(f"decoder model_type {dec_cfg.get('model_type')!r} not supported (detr)")
    d = {**DETR_DEFAULTS, **dec_cfg}
    decoder = DecoderSettings(
        d_model=int(d["d_model"]),
        layers=int(d["decoder_layers"]),
        heads=int(d["decoder_attention_heads"]),
        ffn_dim=int(d["decoder_ffn_dim"]),
        num_queries=int(d["num_queries"]),
        activation=str(d["activation_function"]),
    )
    _activation(decoder.activation)
    if decoder.d_model % decoder.heads or decoder.d_model % 2:
        raise ValueError(f"d_model {decoder.d_model} must be even and divisible by {decoder.heads} heads")

    if config.get("num_labels") is not None:
        num_labels = int(config["num_labels"])
    elif config.get("id2label"):
        num_labels = len(config["id2label"])
    else:
        num_labels = 2  # PreTrainedConfig's default
    fpn = int(config.get("fpn_feature_size", 256))
    if fpn % 32:
        raise ValueError(f"fpn_feature_size {fpn} must be a multiple of 32 (GroupNorm with 32 groups)")
    return MaskFormerConfig(
        backbone=backbone_settings,
        decoder=decoder,
        fpn_feature_size=fpn,
        mask_feature_size=int(config.get("mask_feature_size", 256)),
        num_labels=num_labels,
        no_object_weight=float(config.get("no_object_weight", 0.1)),
    )


# ---------------------------------------------------------------------------------------------
# Swin backbone (transformers' MaskFormerSwinBackbone: same module tree and names)
# ---------------------------------------------------------------------------------------------
def relative_position_index(window_size: int) -> torch.Tensor:
    """[ws*ws, ws*ws] int64: index into the (2ws-1)^2 bias table for every (query, key) pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)  # [2, ws*ws]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()  # [N, N, 2]
    rel[:, :, 0] += window_size - 1
    rel[:, :, 1] += window_size - 1
    rel[:, :, 0] *= 2 * window_size - 1
    return rel.sum(-1)


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * H/ws * W/ws, ws*ws, C] (batch-major, then row-major windows)."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).transpose(2, 3)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``window_partition``: [B*nW, ws*ws, C] -> [B, H, W, C]."""
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c).transpose(2, 3)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(h: int, w: int, ws: int, shift: int, device: torch.device) -> torch.Tensor:
    """[nW, ws*ws, ws*ws] additive mask (0 / -100) that keeps a shifted window from mixing regions.

    After the cyclic shift a window at the border holds pixels from up to 4 regions that were not
    neighbours; each position gets a region id (3 bands per axis) and pairs of different ids are masked.
    """
    hi = torch.arange(h, device=device)
    wi = torch.arange(w, device=device)
    h_region = (hi >= h - ws).long() + (hi >= h - shift).long()
    w_region = (wi >= w - ws).long() + (wi >= w - shift).long()
    img = (h_region[None, :, None, None] * 3 + w_region[None, None, :, None]).float()  # [1, H, W, 1]
    ids = window_partition(img, ws).squeeze(-1)  # [nW, N]
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class SwinPatchEmbeddings(nn.Module):
    def __init__(self, s: SwinSettings) -> None:
        super().__init__()
        self.patch_size = s.patch_size
        self.projection = nn.Conv2d(s.num_channels, s.embed_dim, kernel_size=s.patch_size, stride=s.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        p = self.patch_size
        h, w = pixel_values.shape[-2:]
        pixel_values = F.pad(pixel_values, (0, (p - w % p) % p, 0, (p - h % p) % p))
        x = self.projection(pixel_values)  # [B, C, H/p, W/p]
        dims = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), dims  # [B, L, C]


class SwinEmbeddings(nn.Module):
    def __init__(self, s: SwinSettings) -> None:
        super().__init__()
        self.patch_embeddings = SwinPatchEmbeddings(s)
        self.norm = nn.LayerNorm(s.embed_dim)  # eps 1e-5 as transformers (not layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x, dims = self.patch_embeddings(pixel_values)
        return self.norm(x), dims


class SwinSelfAttention(nn.Module):
    def __init__(self, s: SwinSettings, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.window_size = s.window_size
        ws = s.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        # Persistent as in transformers, so checkpoints carry it; rebuilt when a checkpoint lacks it.
        self.register_buffer("relative_position_index", relative_position_index(ws))
        self.query = nn.Linear(dim, dim, bias=s.qkv_bias)
        self.key = nn.Linear(dim, dim, bias=s.qkv_bias)
        self.value = nn.Linear(dim, dim, bias=s.qkv_bias)

    def forward(self, x: torch.Tensor, batch: int, mask: torch.Tensor | None) -> torch.Tensor:
        """x: [B*nW, N, C] windows (batch-major); mask: [nW, N, N] or None -> [B*nW, N, C].

        Kept 4-D for the fused SDPA kernels: without a mask the windows are the batch and the
        [heads, N, N] bias broadcasts; with one, (window, head) pairs share a dimension so the
        [nW*heads, N, N] bias + mask broadcasts over images.
        """
        bw, n, c = x.shape
        nw, heads, hd = bw // batch, self.heads, self.head_dim
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, heads).permute(2, 0, 1)  # [heads, N, N]
        if mask is None:
            shape: tuple[int, ...] = (bw, heads, n, hd)
        else:
            shape = (batch, nw * heads, n, hd)
            bias = (bias[None] + mask[:, None]).reshape(nw * heads, n, n)

        def split(t: torch.Tensor) -> torch.Tensor:  # [B*nW, N, C] -> shape
            return t.view(bw, n, heads, hd).transpose(1, 2).reshape(shape)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # scale hd**-0.5
        return out.reshape(bw, heads, n, hd).transpose(1, 2).reshape(bw, n, c)


class SwinSelfOutput(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)


class SwinAttention(nn.Module):
    def __init__(self, s: SwinSettings, dim: int, heads: int) -> None:
        super().__init__()
        self.self = SwinSelfAttention(s, dim, heads)
        self.output = SwinSelfOutput(dim)

    def forward(self, x: torch.Tensor, batch: int, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output.dense(self.self(x, batch, mask))


class SwinIntermediate(nn.Module):
    def __init__(self, s: SwinSettings, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, int(s.mlp_ratio * dim))
        self.act = _activation(s.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class SwinOutput(nn.Module):
    def __init__(self, s: SwinSettings, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(int(s.mlp_ratio * dim), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class SwinLayer(nn.Module):
    """One (shifted-)window attention block, pre-norm. Unlike plain Swin, MaskFormer's never shrinks
    the window to a small feature map: it pads the map up to a multiple of the window instead."""

    def __init__(self, s: SwinSettings, dim: int, heads: int, shift: int) -> None:
        super().__init__()
        self.window_size = s.window_size
        self.shift = shift
        self.layernorm_before = nn.LayerNorm(dim, eps=s.layer_norm_eps)
        self.attention = SwinAttention(s, dim, heads)
        self.layernorm_after = nn.LayerNorm(dim, eps=s.layer_norm_eps)
        self.intermediate = SwinIntermediate(s, dim)
        self.output = SwinOutput(s, dim)

    def forward(self, x: torch.Tensor, dims: tuple[int, int]) -> torch.Tensor:
        h, w = dims
        b, _, c = x.shape
        ws = self.window_size
        y = self.layernorm_before(x).view(b, h, w, c)
        y = F.pad(y, (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
        hp, wp = y.shape[1], y.shape[2]
        mask = None
        if self.shift > 0:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = shifted_window_mask(hp, wp, ws, self.shift, y.device).to(y.dtype)
        y = self.attention(window_partition(y, ws), b, mask)
        y = window_reverse(y, ws, hp, wp)
        if self.shift > 0:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        y = y[:, :h, :w, :].reshape(b, h * w, c)
        x = x + y
        return x + self.output(self.intermediate(self.layernorm_after(x)))


class SwinPatchMerging(nn.Module):
    """2x2 neighbourhoods concatenated (4C), normalized, reduced to 2C: halves H and W."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, dims: tuple[int, int]) -> torch.Tensor:
        h, w = dims
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))  # [B, H/2*W/2, 2C]


class SwinStage(nn.Module):
    def __init__(self, s: SwinSettings, dim: int, depth: int, heads: int, downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [SwinLayer(s, dim, heads, 0 if i % 2 == 0 else s.window_size // 2) for i in range(depth)]
        )
        self.downsample = SwinPatchMerging(dim) if downsample else None


class SwinEncoder(nn.Module):
    def __init__(self, s: SwinSettings) -> None:
        super().__init__()
        n = len(s.depths)
        self.layers = nn.ModuleList(
            [SwinStage(s, s.embed_dim * 2**i, s.depths[i], s.num_heads[i], i < n - 1) for i in range(n)]
        )


class SwinModel(nn.Module):
    def __init__(self, s: SwinSettings) -> None:
        super().__init__()
        self.embeddings = SwinEmbeddings(s)
        self.encoder = SwinEncoder(s)
        # Final norm of MaskFormerSwinModel: in the checkpoint, unused by the backbone's feature maps.
        self.layernorm = nn.LayerNorm(s.embed_dim * 2 ** (len(s.depths) - 1), eps=s.layer_norm_eps)


class SwinBackbone(nn.Module):
    """Feature maps = each stage's last block output (before patch merging), layer-normed, as [B, C, H, W]."""

    def __init__(self, s: SwinSettings) -> None:
        super().__init__()
        self.out_indices = s.out_indices
        self.model = SwinModel(s)
        self.hidden_states_norms = nn.ModuleList([nn.LayerNorm(s.embed_dim * 2**i) for i in range(len(s.depths))])

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        x, dims = self.model.embeddings(pixel_values)
        maps = []
        for i, stage in enumerate(self.model.encoder.layers):
            for block in stage.blocks:
                x = block(x, dims)
            if i + 1 in self.out_indices:
                y = self.hidden_states_norms[i](x)
                maps.append(y.transpose(1, 2).reshape(x.shape[0], -1, dims[0], dims[1]))  # [B, C, h, w]
            if stage.downsample is not None:
                x = stage.downsample(x, dims)
                dims = ((dims[0] + 1) // 2, (dims[1] + 1) // 2)
        return maps


# ---------------------------------------------------------------------------------------------
# ResNet backbone (transformers' ResNetBackbone: same module tree and names)
# ---------------------------------------------------------------------------------------------
class ResNetConvLayer(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, act: str | None = "relu") -> None:
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.normalization = nn.BatchNorm2d(cout)
        self.activation = _activation(act) if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.normalization(self.convolution(x)))


class ResNetEmbeddings(nn.Module):
    def __init__(self, s: ResNetSettings) -> None:
        super().__init__()
        self.embedder = ResNetConvLayer(s.num_channels, s.embedding_size, kernel=7, stride=2, act=s.hidden_act)
        self.pooler = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooler(self.embedder(x))  # [B, embedding_size, H/4, W/4]


class ResNetShortCut(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)
        self.normalization = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalization(self.convolution(x))


class ResNetResidualLayer(nn.Module):
    """transformers' ResNetBasicLayer (two 3x3) or ResNetBottleNeckLayer (1x1, 3x3, 1x1; width/4)."""

    def __init__(self, s: ResNetSettings, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        needs_shortcut = cin != cout or stride != 1
        self.shortcut = ResNetShortCut(cin, cout, stride) if needs_shortcut else nn.Identity()
        if s.layer_type == "bottleneck":
            mid = cout // 4
            first, second = (stride, 1) if s.downsample_in_bottleneck else (1, stride)
            self.layer = nn.Sequential(
                ResNetConvLayer(cin, mid, kernel=1, stride=first),
                ResNetConvLayer(mid, mid, stride=second),
                ResNetConvLayer(mid, cout, kernel=1, act=None),
            )
        else:
            self.layer = nn.Sequential(ResNetConvLayer(cin, cout, stride=stride), ResNetConvLayer(cout, cout, act=None))
        self.activation = _activation(s.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.layer(x) + self.shortcut(x))


class ResNetStage(nn.Module):
    def __init__(self, s: ResNetSettings, cin: int, cout: int, stride: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            ResNetResidualLayer(s, cin, cout, stride),
            *[ResNetResidualLayer(s, cout, cout, 1) for _ in range(depth - 1)],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ResNetEncoder(nn.Module):
    def __init__(self, s: ResNetSettings) -> None:
        super().__init__()
        widths = [s.embedding_size, *s.hidden_sizes]
        self.stages = nn.ModuleList(
            [
                ResNetStage(s, widths[i], widths[i + 1], 2 if i > 0 or s.downsample_in_first_stage else 1, d)
                for i, d in enumerate(s.depths)
            ]
        )


class ResNetBackbone(nn.Module):
    def __init__(self, s: ResNetSettings) -> None:
        super().__init__()
        self.out_indices = s.out_indices
        self.embedder = ResNetEmbeddings(s)
        self.encoder = ResNetEncoder(s)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        x = self.embedder(pixel_values)
        maps = [x] if 0 in self.out_indices else []
        for i, stage in enumerate(self.encoder.stages):
            x = stage(x)
            if i + 1 in self.out_indices:
                maps.append(x)
        return maps


# ---------------------------------------------------------------------------------------------
# Pixel decoder (FPN) and the pixel-level module
# ---------------------------------------------------------------------------------------------
def fpn_conv_layer(cin: int, cout: int) -> nn.Sequential:
    """conv3x3 (no bias) -> GroupNorm(32) -> ReLU; names '0', '1' as transformers' MaskFormerFPNConvLayer."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(32, cout), nn.ReLU())


class FPNLayer(nn.Module):
    """Upsample the coarser map (nearest), add the 1x1-projected lateral backbone map, refine."""

    def __init__(self, feature_size: int, lateral: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(lateral, feature_size, 1, bias=False), nn.GroupNorm(32, feature_size))
        self.block = fpn_conv_layer(feature_size, feature_size)

    def forward(self, down: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        left = self.proj(left)
        down = F.interpolate(down, size=left.shape[-2:], mode="nearest")
        return self.block(down + left)


class FPNModel(nn.Module):
    def __init__(self, in_features: int, laterals: list[int], feature_size: int) -> None:
        super().__init__()
        self.stem = fpn_conv_layer(in_features, feature_size)
        self.layers = nn.Sequential(*[FPNLayer(feature_size, w) for w in laterals[::-1]])

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """features fine -> coarse; returns the finest FPN map [B, fpn, h1, w1]."""
        x = self.stem(features[-1])
        for layer, left in zip(self.layers, features[:-1][::-1], strict=True):
            x = layer(x, left)
        return x


class PixelDecoder(nn.Module):
    def __init__(self, channels: list[int], feature_size: int, mask_feature_size: int) -> None:
        super().__init__()
        self.fpn = FPNModel(channels[-1], channels[:-1], feature_size)
        self.mask_projection = nn.Conv2d(feature_size, mask_feature_size, kernel_size=3, padding=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.mask_projection(self.fpn(features))  # pixel embeddings [B, mask_feature_size, H/4, W/4]


class PixelLevelModule(nn.Module):
    def __init__(self, s: MaskFormerConfig) -> None:
        super().__init__()
        b = s.backbone
        self.encoder: nn.Module = SwinBackbone(b) if isinstance(b, SwinSettings) else ResNetBackbone(b)
        self.decoder = PixelDecoder(b.channels, s.fpn_feature_size, s.mask_feature_size)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (coarsest backbone map [B, C4, H/32, W/32], pixel embeddings [B, E, H/4, W/4])."""
        features = self.encoder(pixel_values)
        return features[-1], self.decoder(features)


# ---------------------------------------------------------------------------------------------
# Transformer module: DETR decoder over the coarsest backbone map
# ---------------------------------------------------------------------------------------------
def sine_position_embedding(h: int, w: int, channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """DETR's normalized 2-D sine embedding (temperature 1e4, scale 2*pi, no mask) -> [1, h*w, channels].

    The first channels/2 encode y, the rest x; within each half sin/cos alternate per frequency.
    """
    feats = channels // 2
    scale, eps = 2 * torch.pi, 1e-6
    y = torch.arange(1, h + 1, dtype=dtype, device=device)[None, :, None].expand(1, h, w)
    x = torch.arange(1, w + 1, dtype=dtype, device=device)[None, None, :].expand(1, h, w)
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(feats, dtype=torch.int64, device=device).to(dtype)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / feats)
    pos_x = x[..., None] / dim_t
    pos_y = y[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    pos = torch.cat((pos_y, pos_x), dim=3)  # [1, h, w, channels]
    return pos.flatten(1, 2)


class DetrAttention(nn.Module):
    """Multi-head attention; position embeddings are added by the caller to the query/key inputs only."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, lq, d = q.shape
        hd = d // self.heads
        q = self.q_proj(q).view(b, lq, self.heads, hd).transpose(1, 2)
        k = self.k_proj(k).view(b, -1, self.heads, hd).transpose(1, 2)
        v = self.v_proj(v).view(b, -1, self.heads, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # scale hd**-0.5 as DETR
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, d))


class DetrDecoderLayer(nn.Module):
    """Post-norm: self-attention (q = k = x + query_pos), cross-attention (q = x + query_pos,
    k = memory + memory_pos, v = memory), MLP; each followed by residual add and LayerNorm."""

    def __init__(self, s: DecoderSettings) -> None:
        super().__init__()
        self.self_attn = DetrAttention(s.d_model, s.heads)
        self.self_attn_layer_norm = nn.LayerNorm(s.d_model)
        self.encoder_attn = DetrAttention(s.d_model, s.heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(s.d_model)
        self.fc1 = nn.Linear(s.d_model, s.ffn_dim)
        self.fc2 = nn.Linear(s.ffn_dim, s.d_model)
        self.act = _activation(s.activation)
        self.final_layer_norm = nn.LayerNorm(s.d_model)

    def forward(
        self, x: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor
    ) -> torch.Tensor:
        qk = x + query_pos
        x = self.self_attn_layer_norm(x + self.self_attn(qk, qk, x))
        x = self.encoder_attn_layer_norm(x + self.encoder_attn(x + query_pos, memory + memory_pos, memory))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class DetrDecoder(nn.Module):
    def __init__(self, s: DecoderSettings) -> None:
        super().__init__()
        self.layers = nn.ModuleList([DetrDecoderLayer(s) for _ in range(s.layers)])
        self.layernorm = nn.LayerNorm(s.d_model)


class TransformerModule(nn.Module):
    def __init__(self, in_features: int, s: DecoderSettings) -> None:
        super().__init__()
        self.queries_embedder = nn.Embedding(s.num_queries, s.d_model)
        self.input_projection = nn.Conv2d(in_features, s.d_model, 1) if in_features != s.d_model else None
        self.decoder = DetrDecoder(s)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """[B, C4, h, w] -> query states [B, Q, d_model]."""
        if self.input_projection is not None:
            image_features = self.input_projection(image_features)
        b, c, h, w = image_features.shape
        memory = image_features.flatten(2).transpose(1, 2)  # [B, h*w, d]
        memory_pos = sine_position_embedding(h, w, c, memory.device, memory.dtype)  # [1, h*w, d]
        query_pos = self.queries_embedder.weight[None].expand(b, -1, -1)  # [B, Q, d]
        x = torch.zeros_like(query_pos)  # DETR starts from zero targets; the queries are positions
        for layer in self.decoder.layers:
            x = layer(x, query_pos, memory, memory_pos)
        return self.decoder.layernorm(x)


# ---------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------
class MaskFormerModel(nn.Module):
    def __init__(self, s: MaskFormerConfig) -> None:
        super().__init__()
        self.pixel_level_module = PixelLevelModule(s)
        self.transformer_module = TransformerModule(s.backbone.channels[-1], s.decoder)


class Criterion(nn.Module):
    """Holds only ``empty_weight`` (the loss' class weights), which checkpoints carry; unused here."""

    def __init__(self, num_labels: int, no_object_weight: float) -> None:
        super().__init__()
        self.register_buffer("empty_weight", empty_weight(num_labels, no_object_weight))


def empty_weight(num_labels: int, no_object_weight: float) -> torch.Tensor:
    w = torch.ones(num_labels + 1)
    w[-1] = no_object_weight
    return w


class MaskFormerForInstanceSegmentation(nn.Module):
    def __init__(self, s: MaskFormerConfig) -> None:
        super().__init__()
        d = s.decoder.d_model
        self.model = MaskFormerModel(s)
        self.class_predictor = nn.Linear(d, s.num_labels + 1)
        # transformers' MaskformerMLPPredictionHead: blocks '0', '1', '2', each (Linear '0', act '1')
        self.mask_embedder = nn.Sequential(
            nn.Sequential(nn.Linear(d, d), nn.ReLU()),
            nn.Sequential(nn.Linear(d, d), nn.ReLU()),
            nn.Sequential(nn.Linear(d, s.mask_feature_size), nn.Identity()),
        )
        self.criterion = Criterion(s.num_labels, s.no_object_weight)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, H, W] -> (class logits [B, Q, L+1], mask logits [B, Q, H/4, W/4])."""
        image_features, pixel_embeddings = self.model.pixel_level_module(pixel_values)
        queries = self.model.transformer_module(image_features)
        class_logits = self.class_predictor(queries)
        mask_embeddings = self.mask_embedder(queries)  # [B, Q, E]
        masks = torch.einsum("bqc, bchw -> bqhw", mask_embeddings, pixel_embeddings)
        return class_logits, masks


def semantic_segmentation(class_logits: torch.Tensor, mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """transformers' ``post_process_semantic_segmentation`` with ``target_sizes`` = ``size`` -> INT64 [B, H, W].

    The resized score maps are never held whole: classes go through the resize in chunks (the
    bilinear resize is per channel, so the values are the same) and a running maximum keeps the
    first of equal maxima, as ``argmax`` does. Memory stays at ~64 MiB per chunk whatever the image.
    """
    probs = class_logits.softmax(dim=-1)[..., :-1]  # [B, Q, L] without "no object"
    masks = mask_logits.sigmoid()  # [B, Q, h, w]
    scores = torch.einsum("bqc, bqhw -> bchw", probs, masks)  # [B, L, h, w]
    b, num_classes = scores.shape[:2]
    chunk = max(1, SEG_CHUNK_ELEMENTS // (size[0] * size[1]))
    out = torch.empty((b, *size), dtype=torch.int64, device=scores.device)
    for i in range(b):
        best_val: torch.Tensor | None = None
        best_idx = out[i]
        for c0 in range(0, num_classes, chunk):
            up = F.interpolate(scores[i : i + 1, c0 : c0 + chunk], size=size, mode="bilinear", align_corners=False)
            val, idx = up[0].max(dim=0)
            if best_val is None:
                best_val = val
                best_idx.copy_(idx)
            else:
                better = val > best_val
                best_val = torch.where(better, val, best_val)
                best_idx.copy_(torch.where(better, idx + c0, best_idx))
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoint names
# ---------------------------------------------------------------------------------------------
# transformers 5.x in-memory names of the DETR decoder -> the names on disk / on the Hub.
_MEMORY_NAMES = (
    (
        re.compile(r"^(model\.transformer_module\.decoder\.layers\.\d+\.(?:self_attn|encoder_attn))\.o_proj\."),
        r"\1.out_proj.",
    ),
    (re.compile(r"^(model\.transformer_module\.decoder\.layers\.\d+)\.mlp\.(fc[12])\."), r"\1.\2."),
)


def normalize_state_keys(state: Mapping[str, torch.Tensor], settings: MaskFormerConfig) -> dict[str, torch.Tensor]:
    """Accept transformers' in-memory spellings; fill in the derived buffers a checkpoint may lack.

    ``relative_position_index`` (a function of the window size) and ``criterion.empty_weight``
    (of num_labels and no_object_weight) are persistent buffers in transformers, so checkpoints
    normally carry them; when one is missing it is rebuilt exactly, not zero-filled.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        for pattern, repl in _MEMORY_NAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    if isinstance(settings.backbone, SwinSettings):
        index = relative_position_index(settings.backbone.window_size)
        prefix = "model.pixel_level_module.encoder.model.encoder.layers"
        for i, depth in enumerate(settings.backbone.depths):
            for j in range(depth):
                out.setdefault(f"{prefix}.{i}.blocks.{j}.attention.self.relative_position_index", index.clone())
    out.setdefault("criterion.empty_weight", empty_weight(settings.num_labels, settings.no_object_weight))
    return out


def check_state(settings: MaskFormerConfig, state: Mapping[str, torch.Tensor]) -> None:
    """ValueError unless ``state`` has exactly the names and shapes of the architecture."""
    expected = build_on_meta(lambda: MaskFormerForInstanceSegmentation(settings)).state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in expected.items():
        if k in state and tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"weight {k}: shape {tuple(state[k].shape)} != expected {tuple(v.shape)}")


# ---------------------------------------------------------------------------------------------
# The servable model
# ---------------------------------------------------------------------------------------------
class MaskFormer(Model):
    model_type = "maskformer"

    @classmethod
    def convert(cls, src: Path, out: Path, args: argparse.Namespace) -> Path:
        return convert_maskformer(src, out, args)

    @classmethod
    def add_convert_arguments(cls, parser: argparse.ArgumentParser) -> None:
        _add_arguments(parser)
    inputs = (TensorSpec("pixel_values", "FP32", (-1, 3, -1, -1)),)
    outputs = (
        TensorSpec("class_queries_logits", "FP32", (-1, -1, -1)),
        TensorSpec("masks_queries_logits", "FP32", (-1, -1, -1, -1)),
        TensorSpec("segmentation", "INT64", (-1, -1, -1)),
    )

    def __init__(
        self,
        folder: Path,
        config: dict[str, Any],
        device: torch.device,
        module: MaskFormerForInstanceSegmentation,
        settings: MaskFormerConfig,
    ) -> None:
        super().__init__(folder, config, device)
        self.module = module
        self.cfg = settings
        q, labels = settings.decoder.num_queries, settings.num_labels
        self.inputs = (TensorSpec("pixel_values", "FP32", (-1, settings.num_channels, -1, -1)),)
        self.outputs = (
            TensorSpec("class_queries_logits", "FP32", (-1, q, labels + 1)),
            TensorSpec("masks_queries_logits", "FP32", (-1, q, -1, -1)),
            TensorSpec("segmentation", "INT64", (-1, -1, -1)),
        )
        self.size_multiple = settings.size_multiple

    @classmethod
    def build(cls, folder: Path, config: dict[str, Any], device: torch.device) -> MaskFormer:
        settings = MaskFormerConfig.from_dict(config)
        module = build_on_meta(lambda: MaskFormerForInstanceSegmentation(settings))
        state = normalize_state_keys(read_state_dict(Path(folder)), settings)
        # Serve in fp32 (the reference precision); a half-precision checkpoint is upcast.
        state = {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in state.items()}
        load_into(module, state, device, optional=("num_batches_tracked",))
        return cls(Path(folder), config, device, module, settings)

    def prepare(self, inputs: Mapping[str, RequestTensor], parameters: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        self.check_inputs(inputs)
        pixels = inputs["pixel_values"]
        assert isinstance(pixels, np.ndarray)
        h, w = pixels.shape[2:]
        m = self.size_multiple
        if h < m or w < m or h % m or w % m:
            raise InputError(
                f"input 'pixel_values' is {h}x{w}; height and width must be multiples of {m} (and >= {m}): "
                "resize or pad the image (the image processor pads to a multiple of 32)"
            )
        if h * w > MAX_PIXELS:
            raise InputError(f"input 'pixel_values' is {h}x{w}; at most {MAX_PIXELS} pixels per image")
        if not np.isfinite(pixels).all():
            raise InputError("input 'pixel_values' contains NaN or infinity")
        return {"pixel_values": torch.tensor(pixels)}  # a copy: the request buffer may be read-only

    def forward(self, batch: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            pixels = batch["pixel_values"].to(self.device, torch.float32)
            class_logits, mask_logits = self.module(pixels)
            segmentation = semantic_segmentation(class_logits, mask_logits, (pixels.shape[2], pixels.shape[3]))
        return {
            "class_queries_logits": class_logits.float().cpu(),
            "masks_queries_logits": mask_logits.float().cpu(),
            "segmentation": segmentation.cpu(),
        }

    def example_inputs(self, batch_size: int = 1) -> dict[str, RequestTensor]:
        rng = np.random.default_rng(0)
        side = 2 * self.size_multiple
        return {
            "pixel_values": rng.standard_normal((batch_size, self.cfg.num_channels, side, side), dtype=np.float32)
        }


# ---------------------------------------------------------------------------------------------
# A small random model folder (tests, demos), written without transformers
# ---------------------------------------------------------------------------------------------
def tiny_config(num_labels: int = 5, backbone: str = "swin") -> dict[str, Any]:
    """A small MaskFormerConfig dict in transformers' config.json format (Swin or ResNet backbone)."""
    stages = ["stage1", "stage2", "stage3", "stage4"]
    if backbone == "swin":
        backbone_config: dict[str, Any] = {
            "model_type": "maskformer-swin",
            "image_size": 64,
            "patch_size": 4,
            "num_channels": 3,
            "embed_dim": 16,
            "depths": [1, 2, 1, 1],
            "num_heads": [1, 2, 2, 4],
            "window_size": 4,
            "mlp_ratio": 2.0,
            "qkv_bias": True,
            "hidden_act": "gelu",
            "use_absolute_embeddings": False,
            "layer_norm_eps": 1e-5,
            "drop_path_rate": 0.0,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "out_features": stages,
            "out_indices": [1, 2, 3, 4],
        }
    elif backbone == "resnet":
        backbone_config = {
            "model_type": "resnet",
            "num_channels": 3,
            "embedding_size": 16,
            "hidden_sizes": [32, 32, 64, 64],
            "depths": [1, 2, 1, 1],
            "layer_type": "bottleneck",
            "hidden_act": "relu",
            "downsample_in_first_stage": False,
            "downsample_in_bottleneck": False,
            "out_features": stages,
            "out_indices": [1, 2, 3, 4],
        }
    else:
        raise ValueError(f"backbone {backbone!r}: swin or resnet")
    return {
        "architectures": ["MaskFormerForInstanceSegmentation"],
        "model_type": "maskformer",
        "backbone_config": backbone_config,
        "decoder_config": {
            "model_type": "detr",
            "d_model": 32,
            "decoder_layers": 2,
            "decoder_attention_heads": 4,
            "decoder_ffn_dim": 64,
            "num_queries": 10,
            "activation_function": "relu",
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "activation_dropout": 0.0,
            "position_embedding_type": "sine",
            "use_timm_backbone": False,
        },
        "fpn_feature_size": 32,
        "mask_feature_size": 32,
        "no_object_weight": 0.1,
        "use_auxiliary_loss": False,
        "id2label": {str(i): f"class_{i}" for i in range(num_labels)},
        "label2id": {f"class_{i}": i for i in range(num_labels)},
    }


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Deterministic random values everywhere that matters (norm affines, biases, BN statistics,
    Swin position biases), so a comparison against a reference exercises every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "queries_embedder" in name:  # the learned queries: N(0, 1) as nn.Embedding
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() >= 2 and "bias_table" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            elif name.endswith("weight"):  # norm scales
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:  # biases, Swin relative position bias tables
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        for name, buf in module.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.2 * torch.randn(buf.shape, generator=g))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=g))
        # Without training the queries barely differ (near-uniform cross-attention) and every query
        # votes for the same class. Sharper cross-attention and class logits make them differ, so
        # the semantic map holds several classes and a comparison of it means something.
        for name, p in module.named_parameters():
            if re.search(r"encoder_attn\.[qk]_proj\.weight$", name):
                p.mul_(2.0)
            elif name == "class_predictor.weight":
                p.mul_(4.0)
    return module


def random_maskformer_folder(out: Path, seed: int = 0, config: dict[str, Any] | None = None) -> Path:
    """Write a small deterministic MaskFormer folder (config.json in transformers' format + safetensors).

    Default: ``tiny_config()`` (MaskFormer-Swin, embed_dim 16, 10 queries, 5 labels). The same seed
    gives the same bytes; the caller's global RNG is left alone. transformers loads it unchanged.
    """
    config = copy.deepcopy(config) if config is not None else tiny_config()
    settings = MaskFormerConfig.from_dict(config)
    module = randomize_(MaskFormerForInstanceSegmentation(settings), seed)
    return write_model_folder(Path(out), config, module.state_dict())


# ---------------------------------------------------------------------------------------------
# Converter: a pickled transformers checkpoint (pytorch_model.bin + config.json) -> model folder
# ---------------------------------------------------------------------------------------------
def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="the model's config.json (MaskFormerConfig); default: config.json beside SRC"
    )


def convert_maskformer(src: Path, out: Path, args: argparse.Namespace | None = None) -> Path:
    """transformers ``pytorch_model.bin`` (Hub or ``torch.save(model.state_dict())``, either key
    spelling) + its ``config.json`` -> ``config.json`` + ``model.safetensors`` (fp32).

    The config is validated, the weights checked name by name and shape by shape against it.
    """
    src = Path(src)
    config_path = getattr(args, "config", None) or src.parent / "config.json"
    try:
        config = json.loads(Path(config_path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{config_path}: missing (pass --config with the model's config.json)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path}: not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: not a JSON object")
    settings = MaskFormerConfig.from_dict(config)
    state = normalize_state_keys(weights.plain_state_dict(torch_load_tensors(src)), settings)
    check_state(settings, state)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return write_model_folder(Path(out), config, state)
