"""DETR3D (Wang et al., CoRL 2021): multi-camera 3D object detection from 2D features, for inference.

A plain-torch re-implementation of the released code (WangYueFt/detr3d, mmdet3d plugin):
``Detr3D`` detector = mmdet ``ResNet`` (optionally with mmcv ``DCNv2`` in some stages) + mmdet ``FPN``
+ ``Detr3DHead`` (``Detr3DTransformer`` with a ``Detr3DTransformerDecoder`` of mmcv
``DetrTransformerDecoderLayer``s: self-attention, norm, ``Detr3DCrossAtten``, norm, FFN, norm) and the
``NMSFreeCoder`` followed by ``Detr3DHead.get_bboxes``' shift of z from the box centre to its bottom.

Parameter names equal the released checkpoint's ``state_dict`` names (``img_backbone.*``,
``img_neck.*``, ``pts_bbox_head.*``), so ``bin/modelsrv-convert detr3d ckpt.pth OUT`` only drops
training-only entries. Eval mode only: BatchNorm uses running statistics, dropout is off, grid mask
(a training augmentation) is never applied.

Inputs: ``images`` FP32 [N,cams,3,H,W] (already normalized as the release's pipeline does, padded to
the size the ``lidar2img`` matrices refer to) and ``lidar2img`` FP32 [N,cams,4,4] (LiDAR -> pixel
projection of each camera, as mmdet3d's img_metas carry it).
Outputs: ``boxes`` FP32 [N,K,9] (x, y, z, w, l, h, yaw, vx, vy; z is the box bottom), ``scores`` FP32
[N,K], ``labels`` INT64 [N,K]; K = ``max_num``; rows beyond the kept boxes have score 0, label -1,
box 0. See docs/DETR3D.md for config.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import weights
from models.base import InputError, Model, RequestTensor, TensorSpec
from models.weights import build_on_meta, load_into, read_state_dict, torch_load_tensors, write_model_folder

NUSCENES_CLASSES = [
    "car",
    "truck",
    "construction_vehicle",
    "bus",
    "trailer",
    "barrier",
    "motorcycle",
    "bicycle",
    "pedestrian",
    "traffic_cone",
]

# The released nuScenes config (projects/configs/detr3d/detr3d_res101_gridmask.py).
DEFAULT_CONFIG: dict[str, Any] = {
    "model_type": "detr3d",
    # img_backbone: mmdet ResNet
    "depth": 101,
    "base_channels": 64,
    "stage_blocks": None,  # project extension: blocks per stage, overriding the depth's (tiny test models)
    "style": "caffe",
    "dcn_stages": [False, False, True, True],
    "dcn_deform_groups": 1,
    # img_neck: mmdet FPN (out_channels = embed_dims, num_outs = num_levels)
    "fpn_start_level": 1,
    "fpn_add_extra_convs": "on_output",
    "fpn_relu_before_extra_convs": True,
    # pts_bbox_head
    "num_levels": 4,
    "num_cams": 6,
    "num_points": 1,
    "embed_dims": 256,
    "num_heads": 8,
    "feedforward_channels": 512,
    "num_layers": 6,
    "num_query": 900,
    "num_classes": 10,
    "code_size": 10,
    "num_reg_fcs": 2,
    "with_box_refine": True,
    "pc_range": [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0],
    # bbox_coder: NMSFreeCoder
    "post_center_range": [-61.2, -61.2, -10.0, 61.2, 61.2, 10.0],
    "max_num": 300,
    "score_threshold": None,
    # informational / example inputs only
    "image_size": [928, 1600],
    "class_names": NUSCENES_CLASSES,
}

# mmdet ResNet.arch_settings: depth -> (block, blocks per stage)
RESNET_ARCHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
EXTRA_CONVS = ("on_input", "on_lateral", "on_output")
DEPTH_EPS = 1e-5  # feature_sampling's guard on the camera depth
MIN_IMAGE_SIDE = 32


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped into [0, 1] and both terms kept >= eps (mmdet's helper)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


# ---------------------------------------------------------------------------------------------
# Backbone: mmdet ResNet (caffe or pytorch style), mmcv DCNv2 in the stages that ask for it
# ---------------------------------------------------------------------------------------------
def modulated_deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    padding: int,
    dilation: int,
    deform_groups: int,
) -> torch.Tensor:
    """mmcv's ``modulated_deform_conv2d`` (DCNv2) in plain torch.

    x [B,C,H,W]; offset [B,2*g*kh*kw,Ho,Wo] as (dy, dx) pairs per kernel tap (tap k = i*kw + j);
    mask [B,g*kh*kw,Ho,Wo] (already sigmoided). Kernel tap (i, j) of output (ho, wo) reads
    x at (ho*stride - padding + i*dilation + dy, wo*stride - padding + j*dilation + dx), bilinearly,
    with out-of-image corners counting as 0 (mmcv's ``dmcn_im2col_bilinear``), times the mask.
    Processed in chunks of images so the im2col buffer stays bounded.
    """
    b, c, h, w = x.shape
    cout, cin, kh, kw = weight.shape
    g = deform_groups
    if cin != c or c % g:
        raise ValueError("grouped deformable convolution is not supported; channels must divide by deform_groups")
    ho, wo = offset.shape[-2:]
    k, hw, cg = kh * kw, h * w, c // g
    dev = x.device
    tap_i = torch.arange(kh, device=dev).repeat_interleave(kw) * dilation  # [K]
    tap_j = torch.arange(kw, device=dev).repeat(kh) * dilation  # [K]
    base_y = (tap_i[:, None, None] + (torch.arange(ho, device=dev) * stride - padding)[None, :, None]).to(x.dtype)
    base_x = (tap_j[:, None, None] + (torch.arange(wo, device=dev) * stride - padding)[None, None, :]).to(x.dtype)
    # Columns are gathered channels-last, [n, Ho*Wo, K, C] (a row per sampled pixel: contiguous copies),
    # so the weight is laid out (Cout, K, C) to match.
    wmat = weight.permute(0, 2, 3, 1).reshape(cout, k * c)
    chunk = max(1, (1 << 25) // max(c * k * ho * wo, 1))  # ~128 MiB of fp32 columns per chunk
    outs = []
    for s in range(0, b, chunk):
        n = min(chunk, b - s)
        rows = x[s : s + n].permute(0, 2, 3, 1).reshape(n * hw, g, cg)  # [n*H*W, g, C/g]
        # [n,g,K,Ho,Wo] -> [n,Ho,Wo,K,g]: the order the columns take.
        off = offset[s : s + n].reshape(n, g, k, 2, ho, wo)
        py = (base_y + off[:, :, :, 0]).permute(0, 3, 4, 2, 1)
        px = (base_x + off[:, :, :, 1]).permute(0, 3, 4, 2, 1)
        m = mask[s : s + n].reshape(n, g, k, ho, wo).permute(0, 3, 4, 2, 1)
        y0, x0 = torch.floor(py), torch.floor(px)
        ly, lx = py - y0, px - x0
        image = (torch.arange(n, device=dev) * hw).view(n, 1, 1, 1, 1)
        cols = torch.zeros(n, ho, wo, k, g, cg, dtype=x.dtype, device=dev)
        vals = torch.empty(n * ho * wo * k, cg, dtype=x.dtype, device=dev)
        for dy, dx, wgt in (
            (0, 0, (1 - ly) * (1 - lx)),
            (0, 1, (1 - ly) * lx),
            (1, 0, ly * (1 - lx)),
            (1, 1, ly * lx),
        ):
            yy, xx = y0 + dy, x0 + dx
            valid = (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
            idx = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).long() + image  # [n,Ho,Wo,K,g]
            coeff = wgt * m * valid
            for gi in range(g):
                torch.index_select(rows[:, gi], 0, idx[..., gi].reshape(-1), out=vals)
                cols[..., gi, :].addcmul_(vals.view(n, ho, wo, k, cg), coeff[..., gi, None])
        out = torch.matmul(cols.view(n, ho * wo, k * c), wmat.t())  # [n, Ho*Wo, Cout]
        outs.append(out.permute(0, 2, 1).reshape(n, cout, ho, wo))
    out = torch.cat(outs, 0)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


class ModulatedDeformConv2dPack(nn.Module):
    """mmcv's ``DCNv2`` layer: ``conv_offset`` predicts offsets (first 2/3 of its channels) and masks."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int, dilation: int,
        deform_groups: int, bias: bool = False,
    ) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation, self.deform_groups = stride, padding, dilation, deform_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.conv_offset = nn.Conv2d(
            in_channels, deform_groups * 3 * kernel_size * kernel_size, kernel_size, stride, padding, dilation
        )
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_offset(x)
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        return modulated_deform_conv2d(
            x, offset, mask.sigmoid(), self.weight, self.bias, self.stride, self.padding, self.dilation,
            self.deform_groups,
        )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None, **_: Any) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    """mmdet's Bottleneck: 'caffe' style strides in conv1 (1x1), 'pytorch' style in conv2 (3x3)."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None, style: str = "pytorch",
        dcn_groups: int = 0,
    ) -> None:
        super().__init__()
        s1, s2 = (1, stride) if style == "pytorch" else (stride, 1)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, s1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        if dcn_groups:
            self.conv2: nn.Module = ModulatedDeformConv2dPack(planes, planes, 3, s2, 1, 1, dcn_groups)
        else:
            self.conv2 = nn.Conv2d(planes, planes, 3, s2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class ResNet(nn.Module):
    """mmdet ``ResNet`` (no deep stem, no avg_down), returning every stage's output (out_indices 0..3)."""

    def __init__(
        self, depth: int, base_channels: int = 64, stage_blocks: Sequence[int] | None = None, style: str = "pytorch",
        dcn_stages: Sequence[bool] = (False,) * 4, dcn_deform_groups: int = 1,
    ) -> None:
        super().__init__()
        block_kind, blocks = RESNET_ARCHS[depth]
        blocks = tuple(stage_blocks) if stage_blocks else blocks
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock if block_kind == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, base_channels, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        self.out_channels: list[int] = []
        inplanes = base_channels
        for i, n in enumerate(blocks):
            planes = base_channels * 2**i
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                downsample = None
                if j == 0 and (stride != 1 or inplanes != planes * block.expansion):
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                        nn.BatchNorm2d(planes * block.expansion),
                    )
                layers.append(
                    block(
                        inplanes, planes, stride if j == 0 else 1, downsample, style=style,
                        dcn_groups=dcn_deform_groups if dcn_stages[i] else 0,
                    )
                )
                inplanes = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            self.out_channels.append(inplanes)
        self.num_stages = len(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)  # [B,base,H/4,W/4]
        outs = []
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)  # [B,C_i,H/2^(i+2),W/2^(i+2)]
            outs.append(x)
        return outs


# ---------------------------------------------------------------------------------------------
# Neck: mmdet FPN (ConvModule without norm/activation = a biased conv under ``.conv``)
# ---------------------------------------------------------------------------------------------
class ConvModule(nn.Module):
    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FPN(nn.Module):
    """mmdet ``FPN``: laterals from ``start_level``, nearest top-down, 3x3 outputs, extra levels.

    Extra levels (num_outs beyond the backbone levels used) are stride-2 3x3 convs on the source
    ``add_extra_convs`` names, the first without ReLU and later ones after a ReLU when
    ``relu_before_extra_convs``; with ``add_extra_convs`` False they are 1x1 max-pools of stride 2.
    """

    def __init__(
        self, in_channels: Sequence[int], out_channels: int, num_outs: int, start_level: int = 0,
        add_extra_convs: str | bool = False, relu_before_extra_convs: bool = False,
    ) -> None:
        super().__init__()
        self.start_level = start_level
        self.end_level = len(in_channels)
        self.num_outs = num_outs
        self.add_extra_convs = add_extra_convs
        self.relu_before_extra_convs = relu_before_extra_convs
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1) for c in in_channels[start_level:])
        self.fpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3, 1, 1) for _ in in_channels[start_level:])
        if add_extra_convs:
            for i in range(num_outs - self.end_level + start_level):
                cin = in_channels[-1] if i == 0 and add_extra_convs == "on_input" else out_channels
                self.fpn_convs.append(ConvModule(cin, out_channels, 3, 2, 1))

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(inputs[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]
        used = len(laterals)
        for i in range(used - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
        outs = [self.fpn_convs[i](laterals[i]) for i in range(used)]
        if self.num_outs > used:
            if not self.add_extra_convs:
                for _ in range(self.num_outs - used):
                    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                source = {"on_input": inputs[self.end_level - 1], "on_lateral": laterals[-1], "on_output": outs[-1]}[
                    str(self.add_extra_convs)
                ]
                outs.append(self.fpn_convs[used](source))
                for i in range(used + 1, self.num_outs):
                    prev = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                    outs.append(self.fpn_convs[i](prev))
        return outs


# ---------------------------------------------------------------------------------------------
# Head: Detr3DTransformer decoder with Detr3DCrossAtten
# ---------------------------------------------------------------------------------------------
def feature_sampling(
    mlvl_feats: Sequence[torch.Tensor],
    reference_points: torch.Tensor,
    pc_range: Sequence[float],
    lidar2img: torch.Tensor,
    img_hw: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project normalised 3D reference points into every camera and bilinearly sample each level there.

    mlvl_feats: L tensors [B,N,C,h_l,w_l]; reference_points [B,Q,3] in [0,1] (of ``pc_range``);
    lidar2img [B,N,4,4]; img_hw: the input image's (H, W), which the projected pixels are divided by
    (img_metas' ``img_shape``, the padded image). Returns (reference_points [B,Q,3] unchanged,
    sampled [B,C,Q,N,1,L], mask [B,1,Q,N,1,1] float: 1 where the point is in front of the camera
    (depth > 1e-5) and strictly inside the image, else 0).
    """
    ref_3d = reference_points
    lo = reference_points.new_tensor(pc_range[:3])
    hi = reference_points.new_tensor(pc_range[3:6])
    pts = reference_points * (hi - lo) + lo  # [B,Q,3] metres, LiDAR frame
    pts = torch.cat((pts, torch.ones_like(pts[..., :1])), -1)  # homogeneous [B,Q,4]
    b, q = pts.shape[:2]
    n = lidar2img.shape[1]
    cam = torch.matmul(lidar2img.view(b, n, 1, 4, 4), pts.view(b, 1, q, 4, 1)).squeeze(-1)  # [B,N,Q,4]
    depth = cam[..., 2:3]
    mask = depth > DEPTH_EPS
    uv = cam[..., 0:2] / torch.maximum(depth, torch.full_like(depth, DEPTH_EPS))  # pixels [B,N,Q,2]
    uv = uv / uv.new_tensor([img_hw[1], img_hw[0]])
    uv = (uv - 0.5) * 2  # grid_sample's [-1, 1]
    mask = mask & (uv[..., 0:1] > -1.0) & (uv[..., 0:1] < 1.0) & (uv[..., 1:2] > -1.0) & (uv[..., 1:2] < 1.0)
    mask = mask.view(b, n, 1, q, 1, 1).permute(0, 2, 3, 1, 4, 5).to(reference_points.dtype)  # [B,1,Q,N,1,1]
    sampled = []
    for feat in mlvl_feats:
        _, _, c, h, w = feat.shape
        s = F.grid_sample(feat.reshape(b * n, c, h, w), uv.reshape(b * n, q, 1, 2), align_corners=False)  # [BN,C,Q,1]
        sampled.append(s.view(b, n, c, q, 1).permute(0, 2, 3, 1, 4))  # [B,C,Q,N,1]
    return ref_3d, torch.stack(sampled, -1), mask  # [B,C,Q,N,1,L]


class Detr3DCrossAtten(nn.Module):
    """Cross-attention to the cameras: one sampled feature per (camera, level), weighted and summed."""

    def __init__(
        self, embed_dims: int, num_levels: int, num_points: int, num_cams: int, pc_range: Sequence[float]
    ) -> None:
        super().__init__()
        self.embed_dims, self.num_levels, self.num_points, self.num_cams = embed_dims, num_levels, num_points, num_cams
        self.pc_range = list(pc_range)
        self.attention_weights = nn.Linear(embed_dims, num_cams * num_levels * num_points)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.position_encoder = nn.Sequential(
            nn.Linear(3, embed_dims),
            nn.LayerNorm(embed_dims),
            nn.ReLU(inplace=True),
            nn.Linear(embed_dims, embed_dims),
            nn.LayerNorm(embed_dims),
            nn.ReLU(inplace=True),
        )

    def forward(
        self, query: torch.Tensor, query_pos: torch.Tensor, mlvl_feats: Sequence[torch.Tensor],
        reference_points: torch.Tensor, lidar2img: torch.Tensor, img_hw: tuple[int, int],
    ) -> torch.Tensor:
        """query, query_pos [B,Q,C] -> [B,Q,C] (residual and position encoding included)."""
        residual = query
        query = query + query_pos
        b, q, _ = query.shape
        weights = self.attention_weights(query).view(b, 1, q, self.num_cams, self.num_points, self.num_levels)
        ref_3d, sampled, mask = feature_sampling(mlvl_feats, reference_points, self.pc_range, lidar2img, img_hw)
        sampled = torch.nan_to_num(sampled)
        mask = torch.nan_to_num(mask)
        weights = weights.sigmoid() * mask  # [B,1,Q,N,P,L]
        out = (sampled * weights).sum(-1).sum(-1).sum(-1)  # [B,C,Q]
        out = self.output_proj(out.permute(0, 2, 1))  # [B,Q,C]
        return out + residual + self.position_encoder(inverse_sigmoid(ref_3d))


class SelfAttention(nn.Module):
    """mmcv ``MultiheadAttention`` wrapper: q = k = query + pos, v = query, plus the identity."""

    def __init__(self, embed_dims: int, num_heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, batch_first=True)

    def forward(self, query: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        qk = query + query_pos
        return query + self.attn(qk, qk, query, need_weights=False)[0]


class FFN(nn.Module):
    """mmcv ``FFN`` (2 fcs): layers.0 = (Linear, ReLU, Dropout), layers.1 = Linear, plus the identity."""

    def __init__(self, embed_dims: int, feedforward_channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, feedforward_channels), nn.ReLU(inplace=True), nn.Dropout(0.0)),
            nn.Linear(feedforward_channels, embed_dims),
            nn.Dropout(0.0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class DecoderLayer(nn.Module):
    """mmcv ``DetrTransformerDecoderLayer`` with the released operation order:
    self_attn, norm, cross_attn, norm, ffn, norm (post-norm)."""

    def __init__(
        self, embed_dims: int, num_heads: int, feedforward_channels: int, num_levels: int, num_points: int,
        num_cams: int, pc_range: Sequence[float],
    ) -> None:
        super().__init__()
        self.attentions = nn.ModuleList(
            [
                SelfAttention(embed_dims, num_heads),
                Detr3DCrossAtten(embed_dims, num_levels, num_points, num_cams, pc_range),
            ]
        )
        self.ffns = nn.ModuleList([FFN(embed_dims, feedforward_channels)])
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(3)])

    def forward(
        self, query: torch.Tensor, query_pos: torch.Tensor, mlvl_feats: Sequence[torch.Tensor],
        reference_points: torch.Tensor, lidar2img: torch.Tensor, img_hw: tuple[int, int],
    ) -> torch.Tensor:
        query = self.norms[0](self.attentions[0](query, query_pos))
        query = self.norms[1](self.attentions[1](query, query_pos, mlvl_feats, reference_points, lidar2img, img_hw))
        return self.norms[2](self.ffns[0](query))


class Decoder(nn.Module):
    def __init__(self, num_layers: int, **layer_kwargs: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(**layer_kwargs) for _ in range(num_layers))


class Detr3DTransformer(nn.Module):
    """Holds ``reference_points`` (Linear embed_dims -> 3 on query_pos) and the decoder; the loop
    (with box refinement) lives in ``Detr3DHead.forward`` so only the last layer's boxes are decoded."""

    def __init__(self, embed_dims: int, num_layers: int, **layer_kwargs: Any) -> None:
        super().__init__()
        self.decoder = Decoder(num_layers, embed_dims=embed_dims, **layer_kwargs)
        self.reference_points = nn.Linear(embed_dims, 3)


class Detr3DHead(nn.Module):
    def __init__(self, cfg: Detr3DConfig) -> None:
        super().__init__()
        c = int(cfg.embed_dims)
        self.pc_range = [float(v) for v in cfg.pc_range]
        self.with_box_refine = bool(cfg.with_box_refine)
        self.transformer = Detr3DTransformer(
            embed_dims=c,
            num_layers=int(cfg.num_layers),
            num_heads=int(cfg.num_heads),
            feedforward_channels=int(cfg.feedforward_channels),
            num_levels=int(cfg.num_levels),
            num_points=int(cfg.num_points),
            num_cams=int(cfg.num_cams),
            pc_range=self.pc_range,
        )
        cls_branch: list[nn.Module] = []
        reg_branch: list[nn.Module] = []
        for _ in range(int(cfg.num_reg_fcs)):
            cls_branch += [nn.Linear(c, c), nn.LayerNorm(c), nn.ReLU(inplace=True)]
            reg_branch += [nn.Linear(c, c), nn.ReLU()]
        cls_branch.append(nn.Linear(c, int(cfg.num_classes)))
        reg_branch.append(nn.Linear(c, int(cfg.code_size)))
        fc_cls, fc_reg = nn.Sequential(*cls_branch), nn.Sequential(*reg_branch)
        n = int(cfg.num_layers)
        if self.with_box_refine:  # one branch per decoder layer
            self.cls_branches = nn.ModuleList(copy.deepcopy(fc_cls) for _ in range(n))
            self.reg_branches = nn.ModuleList(copy.deepcopy(fc_reg) for _ in range(n))
        else:  # one branch shared by every layer (the state dict still lists it per layer)
            self.cls_branches = nn.ModuleList([fc_cls] * n)
            self.reg_branches = nn.ModuleList([fc_reg] * n)
        self.query_embedding = nn.Embedding(int(cfg.num_query), 2 * c)

    def forward(
        self, mlvl_feats: Sequence[torch.Tensor], lidar2img: torch.Tensor, img_hw: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Last decoder layer's (class logits [B,Q,num_classes], box code [B,Q,code_size]).

        The code is (cx, cy, log w, log l, cz, log h, sin, cos, vx, vy) with the centre in metres.
        """
        b = mlvl_feats[0].shape[0]
        c = self.query_embedding.weight.shape[1] // 2
        query_pos, query = torch.split(self.query_embedding.weight, c, dim=1)
        query_pos = query_pos.unsqueeze(0).expand(b, -1, -1)  # [B,Q,C]
        query = query.unsqueeze(0).expand(b, -1, -1)
        reference = self.transformer.reference_points(query_pos).sigmoid()  # [B,Q,3] in [0,1]
        layers = self.transformer.decoder.layers
        for lid, layer in enumerate(layers):
            query = layer(query, query_pos, mlvl_feats, reference, lidar2img, img_hw)
            tmp = self.reg_branches[lid](query)  # [B,Q,code_size]
            if lid == len(layers) - 1:
                break
            if self.with_box_refine:
                new_ref = torch.cat((tmp[..., 0:2] + inverse_sigmoid(reference[..., 0:2]),
                                     tmp[..., 4:5] + inverse_sigmoid(reference[..., 2:3])), -1)
                reference = new_ref.sigmoid()
        logits = self.cls_branches[len(layers) - 1](query)
        # Detr3DHead.forward on the last layer: refine with the reference this layer was given.
        ref = inverse_sigmoid(reference)
        lo, hi = self.pc_range[:3], self.pc_range[3:]
        xy = (tmp[..., 0:2] + ref[..., 0:2]).sigmoid()
        z = (tmp[..., 4:5] + ref[..., 2:3]).sigmoid()
        cx = xy[..., 0:1] * (hi[0] - lo[0]) + lo[0]
        cy = xy[..., 1:2] * (hi[1] - lo[1]) + lo[1]
        cz = z * (hi[2] - lo[2]) + lo[2]
        code = torch.cat((cx, cy, tmp[..., 2:4], cz, tmp[..., 5:]), -1)
        return logits, code


class Detr3D(nn.Module):
    """The detector: ``img_backbone`` -> ``img_neck`` -> ``pts_bbox_head`` (decoding outside)."""

    def __init__(self, cfg: Detr3DConfig) -> None:
        super().__init__()
        self.img_backbone = ResNet(
            int(cfg.depth), int(cfg.base_channels), cfg.stage_blocks, str(cfg.style),
            [bool(v) for v in cfg.dcn_stages], int(cfg.dcn_deform_groups),
        )
        self.img_neck = FPN(
            self.img_backbone.out_channels,
            int(cfg.embed_dims),
            int(cfg.num_levels),
            int(cfg.fpn_start_level),
            cfg.fpn_add_extra_convs,
            bool(cfg.fpn_relu_before_extra_convs),
        )
        self.pts_bbox_head = Detr3DHead(cfg)

    def forward(self, images: torch.Tensor, lidar2img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B,N,3,H,W], lidar2img [B,N,4,4] -> (logits [B,Q,classes], code [B,Q,code_size])."""
        b, n, _, h, w = images.shape
        feats = self.img_neck(self.img_backbone(images.reshape(b * n, *images.shape[2:])))
        mlvl = [f.view(b, n, *f.shape[1:]) for f in feats]  # L x [B,N,C,h_l,w_l]
        return self.pts_bbox_head(mlvl, lidar2img, (h, w))


# ---------------------------------------------------------------------------------------------
# Box coding (projects/mmdet3d_plugin/core/bbox/util.py, NMSFreeCoder, Detr3DHead.get_bboxes)
# ---------------------------------------------------------------------------------------------
def normalize_bbox(bboxes: torch.Tensor) -> torch.Tensor:
    """(x, y, z_centre, w, l, h, yaw[, vx, vy]) -> (cx, cy, log w, log l, cz, log h, sin, cos[, vx, vy])."""
    cx, cy, cz = bboxes[..., 0:1], bboxes[..., 1:2], bboxes[..., 2:3]
    w, l, h = bboxes[..., 3:4].log(), bboxes[..., 4:5].log(), bboxes[..., 5:6].log()  # noqa: E741
    rot = bboxes[..., 6:7]
    parts = [cx, cy, w, l, cz, h, rot.sin(), rot.cos()]
    if bboxes.shape[-1] > 7:
        parts += [bboxes[..., 7:8], bboxes[..., 8:9]]
    return torch.cat(parts, -1)


def denormalize_bbox(code: torch.Tensor) -> torch.Tensor:
    """Inverse of ``normalize_bbox`` (z stays the centre); without velocities vx = vy = 0, so 9 columns."""
    rot = torch.atan2(code[..., 6:7], code[..., 7:8])
    sizes = code[..., 2:4].exp()
    parts = [code[..., 0:2], code[..., 4:5], sizes, code[..., 5:6].exp(), rot]
    if code.shape[-1] > 8:
        parts.append(code[..., 8:10])
    else:
        parts.append(torch.zeros_like(code[..., :2]))
    return torch.cat(parts, -1)


def decode_predictions(
    cls_logits: torch.Tensor,
    code: torch.Tensor,
    max_num: int,
    post_center_range: Sequence[float] | None,
    score_threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NMSFreeCoder.decode + get_bboxes, batched and padded.

    cls_logits [B,Q,C], code [B,Q,code_size] -> boxes [B,K,9] (z = bottom), scores [B,K], labels
    [B,K] int64, K = max_num: sigmoid scores, top-K over Q*C (label = index % C, query = index // C),
    keep boxes whose centre lies in post_center_range (inclusive) and, when score_threshold is truthy
    (the release tests ``if self.score_threshold:``), score > score_threshold; kept boxes stay in
    descending score order at the front, the rest is score 0, label -1, box 0.
    """
    b, q, num_classes = cls_logits.shape
    scores, index = cls_logits.sigmoid().reshape(b, q * num_classes).topk(max_num, dim=1)  # [B,K]
    labels = index % num_classes
    query = index // num_classes
    picked = torch.gather(code, 1, query.unsqueeze(-1).expand(-1, -1, code.shape[-1]))
    boxes = denormalize_bbox(picked)  # [B,K,9], z = centre
    keep = torch.ones_like(scores, dtype=torch.bool)
    if post_center_range is not None:
        rng = boxes.new_tensor(list(post_center_range))
        keep &= (boxes[..., :3] >= rng[:3]).all(-1) & (boxes[..., :3] <= rng[3:]).all(-1)
    if score_threshold:
        keep &= scores > score_threshold
    boxes = torch.cat((boxes[..., :2], boxes[..., 2:3] - boxes[..., 5:6] * 0.5, boxes[..., 3:]), -1)  # bottom z
    # Stable compaction: kept rows first, in their (descending score) order.
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    keep = torch.gather(keep, 1, order)
    boxes = torch.gather(boxes, 1, order.unsqueeze(-1).expand(-1, -1, boxes.shape[-1]))
    boxes = torch.where(keep.unsqueeze(-1), boxes, torch.zeros_like(boxes))  # not `* keep`: inf * 0 is NaN
    scores = torch.where(keep, torch.gather(scores, 1, order), torch.zeros_like(scores))
    labels = torch.where(keep, torch.gather(labels, 1, order), torch.full_like(labels, -1))
    return boxes, scores, labels


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Detr3DConfig:
    """config.json of a DETR3D folder (docs/DETR3D.md); ``DEFAULT_CONFIG`` holds the released values.

    Lists are kept as tuples; ``to_json`` writes them back as lists, every key included.
    """

    depth: int
    base_channels: int
    stage_blocks: tuple[int, ...] | None
    style: str
    dcn_stages: tuple[bool, ...]
    dcn_deform_groups: int
    fpn_start_level: int
    fpn_add_extra_convs: str | bool
    fpn_relu_before_extra_convs: bool
    num_levels: int
    num_cams: int
    num_points: int
    embed_dims: int
    num_heads: int
    feedforward_channels: int
    num_layers: int
    num_query: int
    num_classes: int
    code_size: int
    num_reg_fcs: int
    with_box_refine: bool
    pc_range: tuple[float, ...]
    post_center_range: tuple[float, ...] | None
    max_num: int
    score_threshold: float | None
    image_size: tuple[int, ...]
    class_names: tuple[str, ...]

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> Detr3DConfig:
        """Defaults for absent keys, then validation (ValueError names the bad key; unknown keys are refused)."""
        try:
            cfg = _checked(config)
        except TypeError as exc:  # a value of the wrong type, failing inside len(), int() ...
            raise ValueError(f"detr3d config: a value has the wrong type: {exc}") from None
        return cls(**{f.name: _frozen(cfg[f.name]) for f in dataclasses.fields(cls)})

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model_type": "detr3d"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _checked(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with DEFAULT_CONFIG for absent keys, validated (ValueError names the bad key)."""
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(f"detr3d config: unknown keys {unknown}")
    cfg = {**copy.deepcopy(DEFAULT_CONFIG), **copy.deepcopy(dict(config))}
    cfg["model_type"] = "detr3d"
    if cfg["depth"] not in RESNET_ARCHS:
        raise ValueError(f"detr3d config: depth must be one of {sorted(RESNET_ARCHS)}, got {cfg['depth']!r}")
    if cfg["style"] not in ("caffe", "pytorch"):
        raise ValueError(f"detr3d config: style must be 'caffe' or 'pytorch', got {cfg['style']!r}")
    stages = cfg["stage_blocks"] or RESNET_ARCHS[cfg["depth"]][1]
    if len(stages) != 4 or any(int(n) < 1 for n in stages):
        raise ValueError(f"detr3d config: stage_blocks must be 4 positive counts, got {cfg['stage_blocks']!r}")
    if len(cfg["dcn_stages"]) != 4:
        raise ValueError("detr3d config: dcn_stages must have 4 booleans")
    if any(cfg["dcn_stages"]) and RESNET_ARCHS[cfg["depth"]][0] == "basic":
        raise ValueError("detr3d config: DCN needs a Bottleneck ResNet (depth >= 50), as in mmdet")
    if cfg["fpn_add_extra_convs"] is True:
        cfg["fpn_add_extra_convs"] = "on_input"  # mmdet's meaning of True
    if cfg["fpn_add_extra_convs"] not in (False, *EXTRA_CONVS):
        raise ValueError(f"detr3d config: fpn_add_extra_convs must be false or one of {EXTRA_CONVS}")
    if not 0 <= cfg["fpn_start_level"] < 4:
        raise ValueError("detr3d config: fpn_start_level must be in 0..3")
    if cfg["num_levels"] < 4 - cfg["fpn_start_level"]:
        raise ValueError("detr3d config: num_levels (FPN num_outs) must be >= 4 - fpn_start_level")
    for key in ("embed_dims", "num_heads", "feedforward_channels", "num_layers", "num_query", "num_cams",
                "num_points", "num_classes", "max_num", "base_channels", "dcn_deform_groups"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"detr3d config: {key} must be a positive integer, got {cfg[key]!r}")
    if cfg["embed_dims"] % cfg["num_heads"]:
        raise ValueError("detr3d config: embed_dims must be divisible by num_heads")
    if cfg["code_size"] not in (8, 10):
        raise ValueError("detr3d config: code_size must be 8 (no velocity) or 10")
    if cfg["max_num"] > cfg["num_query"] * cfg["num_classes"]:
        raise ValueError("detr3d config: max_num must be <= num_query * num_classes (top-k over all scores)")
    if len(cfg["pc_range"]) != 6 or any(cfg["pc_range"][i + 3] <= cfg["pc_range"][i] for i in range(3)):
        raise ValueError("detr3d config: pc_range must be [x_min, y_min, z_min, x_max, y_max, z_max]")
    if cfg["post_center_range"] is not None and len(cfg["post_center_range"]) != 6:
        raise ValueError("detr3d config: post_center_range must have 6 numbers (or be null)")
    if len(cfg["image_size"]) != 2:
        raise ValueError("detr3d config: image_size must be [H, W]")
    return cfg


def ring_lidar2img(num_cams: int, height: int, width: int, focal: float | None = None) -> np.ndarray:
    """[num_cams,4,4] projections of pinhole cameras at the LiDAR origin looking outwards, evenly
    spaced in yaw (camera k looks along yaw 2*pi*k/num_cams), principal point at the image centre.
    Used for example inputs; camera frame: x right, y down, z forward (OpenCV, as nuScenes)."""
    f = float(focal if focal is not None else width / 2)
    intr = np.array([[f, 0, width / 2, 0], [0, f, height / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)
    out = []
    for k in range(num_cams):
        yaw = 2 * math.pi * k / num_cams
        fwd = np.array([math.cos(yaw), math.sin(yaw), 0.0])
        right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
        down = np.array([0.0, 0.0, -1.0])
        lidar2cam = np.eye(4)
        lidar2cam[:3, :3] = np.stack([right, down, fwd])
        out.append(intr @ lidar2cam)
    return np.stack(out).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The servable model
# ---------------------------------------------------------------------------------------------
class Detr3DModel(Model):
    """Multi-camera 3D detector: ``images`` + ``lidar2img`` -> ``boxes``, ``scores``, ``labels``."""

    model_type: ClassVar[str] = "detr3d"

    @classmethod
    def convert(cls, src: Path, out: Path, args: argparse.Namespace) -> Path:
        return convert_detr3d(src, out, args)

    @classmethod
    def add_convert_arguments(cls, parser: argparse.ArgumentParser) -> None:
        _add_arguments(parser)

    def __init__(
        self, folder: Path, config: dict[str, Any], device: torch.device, cfg: Detr3DConfig, module: Detr3D
    ) -> None:
        super().__init__(folder, config, device)
        self.cfg = cfg
        self.module = module
        self.num_cams = cfg.num_cams
        self.max_num = cfg.max_num
        self.inputs = (
            TensorSpec("images", "FP32", (-1, self.num_cams, 3, -1, -1)),
            TensorSpec("lidar2img", "FP32", (-1, self.num_cams, 4, 4)),
        )
        self.outputs = (
            TensorSpec("boxes", "FP32", (-1, self.max_num, 9)),
            TensorSpec("scores", "FP32", (-1, self.max_num)),
            TensorSpec("labels", "INT64", (-1, self.max_num)),
        )

    @classmethod
    def build(cls, folder: Path, config: dict[str, Any], device: torch.device) -> Detr3DModel:
        cfg = Detr3DConfig.from_dict(config)
        module = build_on_meta(lambda: Detr3D(cfg))
        load_into(module, read_state_dict(folder), device, optional=("num_batches_tracked",))
        if any(p.dtype != torch.float32 for p in module.parameters()):
            module = module.float()
        return cls(Path(folder), config, device, cfg, module)

    def prepare(self, inputs: Mapping[str, RequestTensor], parameters: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        # A cams mismatch gets its own message before the generic shape check.
        for name in ("images", "lidar2img"):
            value = inputs.get(name)
            if isinstance(value, np.ndarray) and value.ndim >= 2 and value.shape[1] != self.num_cams:
                raise InputError(f"input {name!r} has {value.shape[1]} cameras; this model takes {self.num_cams}")
        self.check_inputs(inputs)
        images, lidar2img = inputs["images"], inputs["lidar2img"]
        assert isinstance(images, np.ndarray) and isinstance(lidar2img, np.ndarray)
        if images.shape[0] != lidar2img.shape[0]:
            raise InputError(f"'images' has batch {images.shape[0]} but 'lidar2img' has {lidar2img.shape[0]}")
        h, w = images.shape[3:]
        if h < MIN_IMAGE_SIDE or w < MIN_IMAGE_SIDE:
            raise InputError(f"input 'images' is {h}x{w}; this model needs at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}")
        if not np.isfinite(lidar2img).all():
            raise InputError("input 'lidar2img' holds NaN or infinite values")
        if not np.isfinite(images).all():
            raise InputError("input 'images' holds NaN or infinite values")
        # Copies: the request buffers may be read-only.
        return {"images": torch.tensor(images), "lidar2img": torch.tensor(lidar2img)}

    def forward(self, batch: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        with torch.inference_mode():
            images = batch["images"].to(self.device, torch.float32)
            lidar2img = batch["lidar2img"].to(self.device, torch.float32)
            logits, code = self.module(images, lidar2img)
            boxes, scores, labels = decode_predictions(
                logits, code, self.max_num, cfg.post_center_range, cfg.score_threshold
            )
        return {"boxes": boxes.float().cpu(), "scores": scores.float().cpu(), "labels": labels.long().cpu()}

    def example_inputs(self, batch_size: int = 1) -> dict[str, RequestTensor]:
        h, w = (int(v) for v in self.cfg.image_size)
        rng = np.random.default_rng(0)
        images = rng.standard_normal((batch_size, self.num_cams, 3, h, w), dtype=np.float32)
        lidar2img = np.broadcast_to(ring_lidar2img(self.num_cams, h, w), (batch_size, self.num_cams, 4, 4)).copy()
        return {"images": images, "lidar2img": lidar2img}


def random_detr3d_folder(out: Path, config: dict | None = None, seed: int = 0) -> Path:
    """Write a deterministic, randomly initialised model folder (by default a tiny test model).

    The default is tiny: Bottleneck ResNet with one block per stage, base 4 channels, DCN in
    stages 3-4 (its offsets non-zero), embed_dims 32, 2 layers, 16 queries, 3 classes, 2 cameras,
    64x96 images, max_num 20. ``config`` keys override these. torch's default init under
    ``manual_seed(seed)`` inside ``fork_rng`` (the caller's RNG is untouched), then BatchNorm
    statistics, the DCN offset convs and the query embedding get seeded non-trivial values so every
    code path matters.
    """
    tiny = {
        "depth": 50, "base_channels": 4, "stage_blocks": [1, 1, 1, 1], "embed_dims": 32, "num_heads": 4,
        "feedforward_channels": 64, "num_layers": 2, "num_query": 16, "num_classes": 3, "num_cams": 2,
        "max_num": 20, "image_size": [64, 96], "class_names": ["car", "pedestrian", "barrier"],
    }
    cfg = Detr3DConfig.from_dict({**tiny, **(config or {})})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = Detr3D(cfg)
        with torch.no_grad():
            for name, t in module.state_dict().items():
                if name.endswith("running_mean"):
                    t.copy_(torch.randn_like(t) * 0.1)
                elif name.endswith("running_var"):
                    t.copy_(torch.rand_like(t) * 0.5 + 0.75)
                elif ".conv_offset." in name:
                    t.copy_(torch.randn_like(t) * 0.05)
            module.pts_bbox_head.query_embedding.weight.normal_()
    state = {k: v for k, v in module.state_dict().items()}
    return write_model_folder(Path(out), cfg.to_json(), state)


# ---------------------------------------------------------------------------------------------
# Converter: released mmdet3d checkpoint (.pth with 'state_dict') -> model folder
# ---------------------------------------------------------------------------------------------
TRAINING_ONLY_KEYS = ("pts_bbox_head.code_weights",)  # the L1 loss's per-code weights
_CONVERT_OPTIONS = {"style": "style", "num_heads": "num_heads", "num_cams": "num_cams", "max_num": "max_num"}


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--style", choices=["caffe", "pytorch"], help="ResNet style (default caffe, as released)")
    parser.add_argument("--num-heads", type=int, help="self-attention heads (default 8; not in the weights)")
    parser.add_argument("--num-cams", type=int, help="cameras (default: read off the weights, num_points=1)")
    parser.add_argument("--max-num", type=int, help="boxes per sample K (default 300)")
    parser.add_argument(
        "--no-box-refine", action="store_true", help="the checkpoint was trained with with_box_refine=False"
    )


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    """1 + the largest integer captured by ``pattern`` over the keys (0 when none match)."""
    found = [int(m.group(1)) for k in state if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Read the architecture off the weight names and shapes (released names)."""
    if not any(k.startswith("img_backbone.layer1.") for k in state):
        kind = "a VoVNet" if any(k.startswith("img_backbone.stem") for k in state) else "not a DETR3D ResNet"
        raise ValueError(f"checkpoint has {kind} backbone; only the ResNet (+DCN) variants are supported")
    try:
        base = state["img_backbone.conv1.weight"].shape[0]
        embed = state["pts_bbox_head.query_embedding.weight"].shape[1] // 2
        num_query = state["pts_bbox_head.query_embedding.weight"].shape[0]
        ffn = state["pts_bbox_head.transformer.decoder.layers.0.ffns.0.layers.0.0.weight"].shape[0]
        attn_out = state["pts_bbox_head.transformer.decoder.layers.0.attentions.1.attention_weights.weight"].shape[0]
    except KeyError as exc:
        raise ValueError(f"not a DETR3D checkpoint: no {exc.args[0]!r}") from None
    bottleneck = "img_backbone.layer1.0.conv3.weight" in state
    blocks = tuple(_count(state, rf"^img_backbone\.layer{i}\.(\d+)\.conv1\.weight$") for i in range(1, 5))
    depth = next(
        (d for d, (kind, n) in RESNET_ARCHS.items() if n == blocks and (kind == "bottleneck") == bottleneck), None
    )
    if depth is None:
        depth = 50 if bottleneck else 18
    dcn = [any(k.startswith(f"img_backbone.layer{i}.") and ".conv_offset." in k for k in state) for i in range(1, 5)]
    groups = 1
    for i in range(4):
        if dcn[i]:
            groups = state[f"img_backbone.layer{i + 1}.0.conv2.conv_offset.weight"].shape[0] // 27
    n_lat = _count(state, r"^img_neck\.lateral_convs\.(\d+)\.conv\.weight$")
    n_fpn = _count(state, r"^img_neck\.fpn_convs\.(\d+)\.conv\.weight$")
    extra: str | bool = False
    if n_fpn > n_lat:
        first = state[f"img_neck.fpn_convs.{n_lat}.conv.weight"]
        extra = "on_input" if first.shape[1] != embed else "on_output"  # on_lateral looks the same: released is on_output
    reg_last = _count(state, r"^pts_bbox_head\.reg_branches\.0\.(\d+)\.weight$") - 1
    cls_last = _count(state, r"^pts_bbox_head\.cls_branches\.0\.(\d+)\.weight$") - 1
    num_levels = n_fpn if extra else 4  # max-pool extra levels leave no weights: assume the released 4
    return {
        "depth": depth,
        "base_channels": int(base),
        "stage_blocks": None if RESNET_ARCHS[depth][1] == blocks else list(blocks),
        "dcn_stages": dcn,
        "dcn_deform_groups": int(groups),
        "fpn_start_level": 4 - n_lat,
        "fpn_add_extra_convs": extra,
        "num_levels": int(num_levels),
        "num_cams": int(attn_out // num_levels),
        "num_points": 1,
        "embed_dims": int(embed),
        "feedforward_channels": int(ffn),
        "num_layers": _count(state, r"^pts_bbox_head\.transformer\.decoder\.layers\.(\d+)\."),
        "num_query": int(num_query),
        "num_classes": int(state[f"pts_bbox_head.cls_branches.0.{cls_last}.weight"].shape[0]),
        "code_size": int(state[f"pts_bbox_head.reg_branches.0.{reg_last}.weight"].shape[0]),
        "num_reg_fcs": reg_last // 2,
    }


def check_state(cfg: Detr3DConfig, state: Mapping[str, torch.Tensor]) -> None:
    """ValueError unless ``state`` has exactly the names and shapes of the architecture of ``cfg``."""
    weights.check_state(lambda: Detr3D(cfg), state, "the inferred DETR3D config")


def convert_detr3d(src: Path, out: Path, args: argparse.Namespace | None = None) -> Path:
    """Released DETR3D ``.pth`` (mmcv checkpoint: ``state_dict``, ``meta``, ``optimizer``) -> model folder.

    Read with ``torch.load(weights_only=True)`` (an arbitrary pickle is refused). Names are kept;
    ``pts_bbox_head.code_weights`` (loss weights) is dropped; the architecture is read off the
    weights, the rest (pc_range, post_center_range, ...) takes the released nuScenes values.
    """
    state = {k.removeprefix("module."): v for k, v in weights.plain_state_dict(torch_load_tensors(Path(src))).items()}
    state = {k: v for k, v in state.items() if k not in TRAINING_ONLY_KEYS}
    config = infer_config(state)
    if args is not None:
        for opt, key in _CONVERT_OPTIONS.items():
            value = getattr(args, opt, None)
            if value is not None:
                config[key] = value
        if getattr(args, "num_cams", None):
            attn_out = state["pts_bbox_head.transformer.decoder.layers.0.attentions.1.attention_weights.weight"].shape[0]
            points, rest = divmod(attn_out, config["num_cams"] * config["num_levels"])
            if rest or points < 1:
                raise ValueError(f"--num-cams {config['num_cams']} does not divide the attention weights ({attn_out})")
            config["num_points"] = points
        if getattr(args, "no_box_refine", False):
            config["with_box_refine"] = False
    if "max_num" not in config:  # the released 300, unless there are fewer scores to rank
        config["max_num"] = min(DEFAULT_CONFIG["max_num"], config["num_query"] * config["num_classes"])
    cfg = Detr3DConfig.from_dict(config)
    check_state(cfg, state)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return write_model_folder(Path(out), cfg.to_json(), state)
