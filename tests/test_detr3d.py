"""DETR3D: geometry by construction, box coding, DCN, FPN, converter, and the servable model.

No public DETR3D fixture exists (mmcv/mmdet cannot run here), so the numerics are checked against
hand-built cases whose answer is known: a 3D point that projects onto a known pixel must sample
that pixel's feature; points behind a camera or outside its image must contribute nothing; the
decoder must invert the encoder; DCNv2 with known offsets must equal a shifted plain convolution.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import InputError, load_model
from models.convert import main as convert_main
from models.detr3d import (
    DEFAULT_CONFIG,
    FPN,
    Detr3D,
    Detr3DConfig,
    Detr3DCrossAtten,
    ModulatedDeformConv2dPack,
    convert_detr3d,
    decode_predictions,
    feature_sampling,
    infer_config,
    inverse_sigmoid,
    modulated_deform_conv2d,
    normalize_bbox,
    random_detr3d_folder,
    ring_lidar2img,
)
from models.weights import build_on_meta

torch.set_num_threads(1)

PC_RANGE = [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0]


# ---------------------------------------------------------------------------------------------
# Hand-made cameras
# ---------------------------------------------------------------------------------------------
def camera(yaw: float, f: float, cx: float, cy: float, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 lidar2img of a pinhole camera at ``origin`` looking along ``yaw`` (OpenCV axes)."""
    fwd = np.array([math.cos(yaw), math.sin(yaw), 0.0])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    down = np.array([0.0, 0.0, -1.0])
    rot = np.stack([right, down, fwd])
    ext = np.eye(4)
    ext[:3, :3] = rot
    ext[:3, 3] = -rot @ np.asarray(origin)
    intr = np.array([[f, 0, cx, 0], [0, f, cy, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    return intr @ ext


def point_at_pixel(l2i: np.ndarray, u: float, v: float, depth: float) -> np.ndarray:
    """The LiDAR point that ``l2i`` projects onto pixel (u, v) at ``depth`` (solve the 4x4 system)."""
    return np.linalg.solve(l2i, np.array([u * depth, v * depth, depth, 1.0]))[:3]


def normalised(p: np.ndarray) -> np.ndarray:
    lo, hi = np.array(PC_RANGE[:3]), np.array(PC_RANGE[3:])
    return (p - lo) / (hi - lo)


def test_projected_point_samples_exactly_its_pixel():
    h_img, w_img = 64, 96
    cams = np.stack([camera(0.0, 50.0, 48.0, 32.0), camera(math.pi, 50.0, 48.0, 32.0, origin=(0.5, 0, 0))])
    l2i = torch.tensor(cams)[None]  # [1,2,4,4] float64
    # Two levels (strides 4 and 8), every pixel of every camera/channel distinct.
    feats = [
        torch.arange(2 * 3 * (h_img // s) * (w_img // s), dtype=torch.float64).view(1, 2, 3, h_img // s, w_img // s)
        for s in (4, 8)
    ]
    # Level-0 cell (row 5, col 17) of camera 0 = image pixel centre ((17 + .5) * 4, (5 + .5) * 4); on
    # level 1 (stride 8) the same point sits between cells: bilinear of the 2x2 neighbourhood.
    u, v = (17 + 0.5) * 4, (5 + 0.5) * 4
    p0 = point_at_pixel(cams[0], u, v, depth=20.0)
    # Level-1 cell (row 2, col 9) of camera 1, exactly at that cell's centre.
    p1 = point_at_pixel(cams[1], (9 + 0.5) * 8, (2 + 0.5) * 8, depth=12.0)
    ref = torch.tensor(np.stack([normalised(p0), normalised(p1)]))[None]  # [1,2,3]
    ref_out, sampled, mask = feature_sampling(feats, ref, PC_RANGE, l2i, (h_img, w_img))
    assert sampled.shape == (1, 3, 2, 2, 1, 2) and mask.shape == (1, 1, 2, 2, 1, 1)
    assert torch.equal(ref_out, ref)
    # Query 0 in camera 0, level 0: exactly feats[0][0, 0, :, 5, 17].
    torch.testing.assert_close(sampled[0, :, 0, 0, 0, 0], feats[0][0, 0, :, 5, 17], rtol=0, atol=1e-9)
    # Level 1 (stride 8): pixel (u, v) is at cell coordinate (u/8 - .5, v/8 - .5) = (8.25, 2.25).
    f1 = feats[1][0, 0]
    expect = 0.75 * 0.75 * f1[:, 2, 8] + 0.75 * 0.25 * f1[:, 2, 9] + 0.25 * 0.75 * f1[:, 3, 8] + 0.25 * 0.25 * f1[:, 3, 9]
    torch.testing.assert_close(sampled[0, :, 0, 0, 0, 1], expect, rtol=0, atol=1e-9)
    # Query 1 in camera 1, level 1: exactly feats[1][0, 1, :, 2, 9].
    torch.testing.assert_close(sampled[0, :, 1, 1, 0, 1], feats[1][0, 1, :, 2, 9], rtol=0, atol=1e-9)
    # Each point is in front of its own camera and behind the other (they look opposite ways).
    assert mask[0, 0, :, :, 0, 0].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_behind_or_outside_contributes_nothing():
    torch.manual_seed(0)
    h_img, w_img = 32, 48
    cams = np.stack([camera(0.0, 30.0, 24.0, 16.0), camera(math.pi / 2, 30.0, 24.0, 16.0)])
    l2i = torch.tensor(cams, dtype=torch.float32)[None]
    points = [
        point_at_pixel(cams[0], 10.0, 12.0, 8.0),  # 0: in camera 0, far outside camera 1's image
        point_at_pixel(cams[1], w_img + 0.5, 12.0, 8.0),  # 1: half a pixel right of camera 1's image
        point_at_pixel(cams[1], 20.0, 10.0, 8.0),  # 2: inside camera 1
        point_at_pixel(cams[1], 20.0, 10.0, -8.0),  # 3: mirrored behind camera 1
    ]
    ref = torch.tensor(np.stack([normalised(p) for p in points]), dtype=torch.float32)[None]
    feats = [torch.randn(1, 2, 16, h_img // s, w_img // s) for s in (4, 8)]
    _, sampled, mask = feature_sampling(feats, ref, PC_RANGE, l2i, (h_img, w_img))
    m = mask[0, 0, :, :, 0, 0]
    assert m[:, 1].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert m[0, 0] == 1.0
    # Just outside the image, bilinear sampling with zero padding still reads half the edge pixel:
    # only the mask keeps it out.
    assert sampled[0, :, 1, 1].abs().sum() > 0

    attn = Detr3DCrossAtten(16, num_levels=2, num_points=1, num_cams=2, pc_range=PC_RANGE).eval()
    with torch.no_grad():
        attn.attention_weights.weight.normal_()  # released init is 0: make the weights differ
    query, pos = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    with torch.no_grad():
        base = attn(query, pos, feats, ref, l2i, (h_img, w_img))
        changed = [f.clone() for f in feats]
        for f in changed:
            f[:, 1] = torch.randn_like(f[:, 1]) * 10  # camera 1 only
        after = attn(query, pos, changed, ref, l2i, (h_img, w_img))
    assert torch.equal(after[0, [0, 1, 3]], base[0, [0, 1, 3]])  # not seen by camera 1: identical
    assert not torch.allclose(after[0, 2], base[0, 2])  # seen by camera 1: changes


def _reference_feature_sampling(mlvl_feats, reference_points, pc_range, lidar2img, img_hw):
    """A literal transcription of the release's loop layout (repeat + per-query 4x4 @ 4x1)."""
    rp = reference_points.clone()
    for i in range(3):
        rp[..., i : i + 1] = rp[..., i : i + 1] * (pc_range[i + 3] - pc_range[i]) + pc_range[i]
    rp = torch.cat((rp, torch.ones_like(rp[..., :1])), -1)
    b, q = rp.shape[:2]
    n = lidar2img.shape[1]
    rp = rp.view(b, 1, q, 4).repeat(1, n, 1, 1).unsqueeze(-1)
    l2i = lidar2img.view(b, n, 1, 4, 4).repeat(1, 1, q, 1, 1)
    cam = torch.matmul(l2i, rp).squeeze(-1)
    mask = cam[..., 2:3] > 1e-5
    cam = cam[..., 0:2] / torch.maximum(cam[..., 2:3], torch.ones_like(cam[..., 2:3]) * 1e-5)
    cam[..., 0] /= img_hw[1]
    cam[..., 1] /= img_hw[0]
    cam = (cam - 0.5) * 2
    mask = mask & (cam[..., 0:1] > -1) & (cam[..., 0:1] < 1) & (cam[..., 1:2] > -1) & (cam[..., 1:2] < 1)
    mask = mask.view(b, n, 1, q, 1, 1).permute(0, 2, 3, 1, 4, 5)
    out = []
    for feat in mlvl_feats:
        _, _, c, h, w = feat.size()
        s = F.grid_sample(feat.view(b * n, c, h, w), cam.view(b * n, q, 1, 2), align_corners=False)
        out.append(s.view(b, n, c, q, 1).permute(0, 2, 3, 1, 4))
    return torch.stack(out, -1).view(b, c, q, n, 1, len(mlvl_feats)), mask


def test_feature_sampling_matches_release_layout():
    torch.manual_seed(1)
    l2i = torch.tensor(np.stack([ring_lidar2img(3, 40, 56)] * 2))  # [2,3,4,4]
    ref = torch.rand(2, 50, 3)
    feats = [torch.randn(2, 3, 5, 10, 14), torch.randn(2, 3, 5, 5, 7)]
    _, got, mask = feature_sampling(feats, ref, PC_RANGE, l2i, (40, 56))
    want, want_mask = _reference_feature_sampling(feats, ref, PC_RANGE, l2i, (40, 56))
    assert 0 < want_mask.sum() < want_mask.numel()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(mask.bool(), want_mask)


def test_depth_mask_alone_excludes_a_point_behind_the_camera():
    """A (degenerate) camera that puts every point at pixel (20, 10) but at depth -3: the division by
    max(depth, eps) lands inside the image, so only the depth test keeps the sample out."""
    eps = 1e-5
    behind = np.zeros((4, 4))
    behind[:, 3] = [20.0 * eps, 10.0 * eps, -3.0, 1.0]
    front = camera(0.0, 30.0, 24.0, 16.0)
    l2i = torch.tensor(np.stack([front, behind]), dtype=torch.float32)[None]
    ref = torch.tensor(normalised(point_at_pixel(front, 12.0, 9.0, 6.0))[None, None], dtype=torch.float32)
    torch.manual_seed(6)
    feats = [torch.randn(1, 2, 8, 8, 12), torch.randn(1, 2, 8, 4, 6)]
    _, sampled, mask = feature_sampling(feats, ref, [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0], l2i, (32, 48))
    assert mask[0, 0, 0, :, 0, 0].tolist() == [1.0, 0.0]
    assert sampled[0, :, 0, 1].abs().sum() > 0  # the sample exists; the mask must drop it
    attn = Detr3DCrossAtten(8, num_levels=2, num_points=1, num_cams=2, pc_range=PC_RANGE).eval()
    with torch.no_grad():
        attn.attention_weights.weight.normal_()
        query, pos = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
        base = attn(query, pos, feats, ref, l2i, (32, 48))
        feats[0][:, 1] += 5.0
        feats[1][:, 1] -= 5.0
        assert torch.equal(attn(query, pos, feats, ref, l2i, (32, 48)), base)


def _reference_cross_atten(attn, query, query_pos, feats, ref, l2i, hw):
    """The release's Detr3DCrossAtten.forward, sequence-first: query [Q,B,C] -> [Q,B,C]."""
    inp_residual = query
    query = (query + query_pos).permute(1, 0, 2)
    bs, nq, _ = query.size()
    weights = attn.attention_weights(query).view(bs, 1, nq, attn.num_cams, attn.num_points, attn.num_levels)
    output, mask = _reference_feature_sampling(feats, ref, attn.pc_range, l2i, hw)
    output = torch.nan_to_num(output)
    weights = weights.sigmoid() * mask
    output = (output * weights).sum(-1).sum(-1).sum(-1).permute(2, 0, 1)
    output = attn.output_proj(output)
    pos_feat = attn.position_encoder(inverse_sigmoid(ref)).permute(1, 0, 2)
    return output + inp_residual + pos_feat


def test_cross_attention_matches_release_layout():
    torch.manual_seed(7)
    attn = Detr3DCrossAtten(16, num_levels=2, num_points=2, num_cams=3, pc_range=PC_RANGE).eval()
    with torch.no_grad():
        attn.attention_weights.weight.normal_()
        l2i = torch.tensor(np.stack([ring_lidar2img(3, 40, 56)] * 2))
        ref = torch.rand(2, 30, 3)
        feats = [torch.randn(2, 3, 16, 10, 14), torch.randn(2, 3, 16, 5, 7)]
        query, pos = torch.randn(2, 30, 16), torch.randn(2, 30, 16)
        got = attn(query, pos, feats, ref, l2i, (40, 56))
        want = _reference_cross_atten(attn, query.transpose(0, 1), pos.transpose(0, 1), feats, ref, l2i, (40, 56))
    torch.testing.assert_close(got, want.transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_decoder_layer_operation_order():
    """self_attn (q = k = query + pos, v = query), norm, cross_attn, norm, ffn, norm: mmcv's
    sequence-first layer, written out with F.multi_head_attention_forward."""
    from models.detr3d import DecoderLayer

    torch.manual_seed(8)
    layer = DecoderLayer(16, 4, 24, num_levels=1, num_points=1, num_cams=2, pc_range=PC_RANGE).eval()
    with torch.no_grad():
        for norm in layer.norms:
            norm.weight.normal_()
            norm.bias.normal_()
        query, pos = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
        feats = [torch.randn(2, 2, 16, 6, 8)]
        l2i = torch.tensor(np.stack([ring_lidar2img(2, 24, 32)] * 2))
        ref = torch.rand(2, 7, 3)
        got = layer(query, pos, feats, ref, l2i, (24, 32))
        mha = layer.attentions[0].attn
        q = (query + pos).transpose(0, 1)
        sa, _ = F.multi_head_attention_forward(
            q, q, query.transpose(0, 1), 16, 4, mha.in_proj_weight, mha.in_proj_bias, None, None, False, 0.0,
            mha.out_proj.weight, mha.out_proj.bias, training=False, need_weights=False,
        )
        x = layer.norms[0](query + sa.transpose(0, 1))
        x = layer.norms[1](layer.attentions[1](x, pos, feats, ref, l2i, (24, 32)))
        ffn = layer.ffns[0].layers
        want = layer.norms[2](x + ffn[1](F.relu(ffn[0][0](x))))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Box coding
# ---------------------------------------------------------------------------------------------
def test_decode_inverts_encode_and_pads():
    # Boxes in the contract's convention: z is the bottom.
    boxes = torch.tensor(
        [
            [10.0, -5.0, -1.8, 1.9, 4.5, 1.6, 0.3, 2.0, -0.5],
            [-20.0, 30.0, -2.0, 0.7, 0.8, 1.8, -2.5, 0.0, 0.1],
            [3.0, 3.0, -1.0, 2.5, 10.0, 3.5, 3.0, -1.0, 1.0],
            [70.0, 0.0, -1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0],  # centre outside post_center_range
        ]
    )
    centre = boxes.clone()
    centre[:, 2] += centre[:, 5] / 2  # the head predicts the gravity centre
    code = normalize_bbox(centre)  # [4,10]
    assert code.shape == (4, 10)
    torch.testing.assert_close(code[:, 2], boxes[:, 3].log())
    num_classes = 3
    logits = torch.full((1, 4, num_classes), -8.0)
    wanted = {0: (2, 0.9), 1: (0, 0.7), 2: (1, 0.4), 3: (2, 0.95)}  # query -> (label, score)
    logits[0, 3] = -20.0  # query 3's other classes never reach the top 6
    for qi, (label, score) in wanted.items():
        logits[0, qi, label] = math.log(score / (1 - score))
    out_boxes, scores, labels = decode_predictions(logits, code[None], 6, DEFAULT_CONFIG["post_center_range"], None)
    assert out_boxes.shape == (1, 6, 9) and scores.shape == (1, 6) and labels.dtype == torch.int64
    # Query 3 (score .95) is filtered by the centre range; the others stay in score order.
    torch.testing.assert_close(scores[0, :3], torch.tensor([0.9, 0.7, 0.4]))
    assert labels[0, :3].tolist() == [2, 0, 1]
    torch.testing.assert_close(out_boxes[0, :3], boxes[[0, 1, 2]], rtol=0, atol=1e-5)
    # Top-6 = query 3 (dropped), the three above, two sigmoid(-8) entries (kept: no threshold);
    # the dropped one leaves one padding row at the end.
    assert (labels[0, 3:5] >= 0).all() and (scores[0, 3:5] > 0).all()
    assert labels[0, 5] == -1 and scores[0, 5] == 0 and out_boxes[0, 5].eq(0).all()
    # With a threshold, everything below it is padding: score 0, label -1, box 0.
    out_boxes, scores, labels = decode_predictions(logits, code[None], 6, DEFAULT_CONFIG["post_center_range"], 0.5)
    assert labels[0].tolist() == [2, 0, -1, -1, -1, -1]
    assert scores[0, 2:].eq(0).all() and out_boxes[0, 2:].eq(0).all()
    torch.testing.assert_close(out_boxes[0, :2], boxes[[0, 1]], rtol=0, atol=1e-5)


def test_decode_index_is_query_times_classes_plus_label():
    logits = torch.full((2, 5, 4), -5.0)
    logits[0, 3, 1] = 5.0
    logits[1, 0, 3] = 5.0
    code = torch.zeros(2, 5, 10)
    code[..., 7] = 1.0  # cos = 1: yaw 0
    code[:, :, 0] = torch.arange(5.0)  # cx = query index
    boxes, scores, labels = decode_predictions(logits, code, 1, None, None)
    assert labels[:, 0].tolist() == [1, 3]
    assert boxes[:, 0, 0].tolist() == [3.0, 0.0]
    # z bottom = cz - h/2, h = exp(0) = 1.
    assert boxes[0, 0, 2].item() == -0.5


# ---------------------------------------------------------------------------------------------
# Backbone and neck pieces
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stride", [1, 2])
def test_dcn_zero_and_integer_offsets_equal_plain_convs(stride):
    torch.manual_seed(2)
    x = torch.randn(2, 6, 9, 11)
    dcn = ModulatedDeformConv2dPack(6, 5, 3, stride, 1, 1, deform_groups=1).eval()
    with torch.no_grad():
        # Released init: conv_offset all zero -> offsets 0, mask sigmoid(0) = 0.5.
        torch.testing.assert_close(dcn(x), 0.5 * F.conv2d(x, dcn.weight, None, stride, 1), rtol=1e-5, atol=1e-5)
        # Mask logits high (channels 18..26), dx = +1 for every tap (channels 2k+1 of the first 18).
        dcn.conv_offset.bias[18:] = 30.0
        dcn.conv_offset.bias[1:18:2] = 1.0
        shifted = F.conv2d(F.pad(x, (0, 2, 1, 1)), dcn.weight, None, stride)
        torch.testing.assert_close(dcn(x), shifted, rtol=1e-5, atol=1e-5)
        # dy = +1 instead: a vertical shift.
        dcn.conv_offset.bias[:18] = 0.0
        dcn.conv_offset.bias[0:18:2] = 1.0
        shifted = F.conv2d(F.pad(x, (1, 1, 0, 2)), dcn.weight, None, stride)
        torch.testing.assert_close(dcn(x), shifted, rtol=1e-5, atol=1e-5)
    # Half a pixel in x: bilinear = the mean of the 0 and +1 shifts (the conv is linear).
    w = torch.randn(4, 6, 3, 3)
    off = torch.zeros(2, 18, 9, 11)
    off[:, 1::2] = 0.5
    half = modulated_deform_conv2d(x, off, torch.ones(2, 9, 9, 11), w, None, 1, 1, 1, 1)
    want = 0.5 * (F.conv2d(x, w, None, 1, 1) + F.conv2d(F.pad(x, (0, 2, 1, 1)), w))
    torch.testing.assert_close(half, want, rtol=1e-5, atol=1e-5)


def test_dcn_deform_groups_split_channels():
    """deform_groups=2: channels [0,C/2) follow offsets/masks of group 0, the rest those of group 1."""
    torch.manual_seed(9)
    x, w = torch.randn(2, 8, 7, 9), torch.randn(5, 8, 3, 3)
    off, mask = torch.randn(2, 36, 7, 9), torch.rand(2, 18, 7, 9)
    full = modulated_deform_conv2d(x, off, mask, w, None, 1, 1, 1, 2)
    g0 = modulated_deform_conv2d(x[:, :4], off[:, :18], mask[:, :9], w[:, :4], None, 1, 1, 1, 1)
    g1 = modulated_deform_conv2d(x[:, 4:], off[:, 18:], mask[:, 9:], w[:, 4:], None, 1, 1, 1, 1)
    torch.testing.assert_close(full, g0 + g1, rtol=1e-5, atol=1e-5)


def test_fpn_extra_levels_relu_only_before_the_second():
    torch.manual_seed(3)
    fpn = FPN([4, 8, 16, 32], 8, num_outs=5, start_level=1, add_extra_convs="on_output", relu_before_extra_convs=True)
    with torch.no_grad():
        for i in (3, 4):  # extra convs = identity taps at stride 2
            conv = fpn.fpn_convs[i].conv
            conv.weight.zero_()
            conv.bias.zero_()
            for c in range(8):
                conv.weight[c, c, 1, 1] = 1.0
        ins = [torch.randn(1, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate([4, 8, 16, 32])]
        outs = fpn(ins)
    assert [o.shape[-1] for o in outs] == [16, 8, 4, 2, 1]
    assert (outs[2] < 0).any()
    torch.testing.assert_close(outs[3], outs[2][..., ::2, ::2])  # first extra: no ReLU
    torch.testing.assert_close(outs[4], F.relu(outs[3])[..., ::2, ::2])  # later ones: after a ReLU


def test_released_parameter_names_and_shapes():
    cfg = Detr3DConfig.from_dict({})
    state = build_on_meta(lambda: Detr3D(cfg)).state_dict()
    expected = {
        "img_backbone.conv1.weight": (64, 3, 7, 7),
        "img_backbone.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "img_backbone.layer2.0.conv1.weight": (128, 256, 1, 1),
        "img_backbone.layer3.0.conv2.weight": (256, 256, 3, 3),
        "img_backbone.layer3.0.conv2.conv_offset.weight": (27, 256, 3, 3),
        "img_backbone.layer3.22.bn3.running_var": (1024,),
        "img_backbone.layer4.2.conv2.conv_offset.bias": (27,),
        "img_neck.lateral_convs.0.conv.weight": (256, 512, 1, 1),
        "img_neck.fpn_convs.3.conv.weight": (256, 256, 3, 3),
        "pts_bbox_head.query_embedding.weight": (900, 512),
        "pts_bbox_head.transformer.reference_points.weight": (3, 256),
        "pts_bbox_head.transformer.decoder.layers.5.attentions.0.attn.in_proj_weight": (768, 256),
        "pts_bbox_head.transformer.decoder.layers.5.attentions.0.attn.out_proj.bias": (256,),
        "pts_bbox_head.transformer.decoder.layers.0.attentions.1.attention_weights.weight": (24, 256),
        "pts_bbox_head.transformer.decoder.layers.0.attentions.1.output_proj.weight": (256, 256),
        "pts_bbox_head.transformer.decoder.layers.0.attentions.1.position_encoder.0.weight": (256, 3),
        "pts_bbox_head.transformer.decoder.layers.0.attentions.1.position_encoder.4.bias": (256,),
        "pts_bbox_head.transformer.decoder.layers.0.ffns.0.layers.0.0.weight": (512, 256),
        "pts_bbox_head.transformer.decoder.layers.0.ffns.0.layers.1.weight": (256, 512),
        "pts_bbox_head.transformer.decoder.layers.0.norms.2.weight": (256,),
        "pts_bbox_head.cls_branches.5.6.weight": (10, 256),
        "pts_bbox_head.cls_branches.5.4.weight": (256,),  # LayerNorm
        "pts_bbox_head.reg_branches.5.4.weight": (10, 256),
    }
    for name, shape in expected.items():
        assert tuple(state[name].shape) == shape, name
    assert "img_backbone.layer2.0.conv2.conv_offset.weight" not in state  # DCN only in stages 3-4
    assert "img_neck.fpn_convs.4.conv.weight" not in state and "img_neck.lateral_convs.3.conv.weight" not in state
    assert not any(k.startswith("pts_bbox_head.transformer.decoder.layers.6.") for k in state)
    # Caffe style: the stride is in the 1x1 conv1, not in the 3x3 conv2.
    backbone = build_on_meta(lambda: Detr3D(cfg)).img_backbone
    assert backbone.layer2[0].conv1.stride == (2, 2) and backbone.layer2[0].conv2.stride == (1, 1)
    assert backbone.layer3[0].conv1.stride == (2, 2) and backbone.layer3[0].conv2.stride == 1  # a DCN
    # The converter reads the released architecture back off these weights.
    inferred = Detr3DConfig.from_dict(infer_config(state))
    assert inferred == cfg
    assert Detr3DConfig.from_dict(cfg.to_json()) == cfg and cfg.to_json() == DEFAULT_CONFIG
    with pytest.raises(ValueError, match="unknown keys"):
        Detr3DConfig.from_dict({"num_querys": 10})


def test_decoder_refines_reference_points():
    """Layer l+1 is given sigmoid(reg_l[0:2] + logit(ref_l[0:2]), reg_l[4:5] + logit(ref_l[2])); the
    boxes use the last layer's reg output on the reference that layer was given."""
    cfg = Detr3DConfig.from_dict(
        {"depth": 18, "base_channels": 4, "dcn_stages": [False] * 4, "embed_dims": 16, "num_heads": 2,
         "feedforward_channels": 16, "num_layers": 3, "num_query": 5, "num_classes": 2, "num_cams": 2, "max_num": 4}
    )
    torch.manual_seed(4)
    model = Detr3D(cfg).eval()
    head = model.pts_bbox_head
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [
        layer.register_forward_hook(lambda mod, args, out: seen.append((args[3], out)))
        for layer in head.transformer.decoder.layers
    ]
    images = torch.randn(1, 2, 3, 64, 64)
    l2i = torch.tensor(ring_lidar2img(2, 64, 64))[None]
    with torch.no_grad():
        logits, code = model(images, l2i)
        for hook in hooks:
            hook.remove()
        query_pos = head.query_embedding.weight[:, :16]
        torch.testing.assert_close(seen[0][0][0], head.transformer.reference_points(query_pos).sigmoid())
        for lid in range(2):
            ref, out = seen[lid]
            tmp = head.reg_branches[lid](out)
            want = torch.cat((tmp[..., 0:2] + inverse_sigmoid(ref[..., 0:2]), tmp[..., 4:5] + inverse_sigmoid(ref[..., 2:3])), -1)
            torch.testing.assert_close(seen[lid + 1][0], want.sigmoid())
        ref, out = seen[2]
        tmp = head.reg_branches[2](out)
        xy = (tmp[..., 0:2] + inverse_sigmoid(ref[..., 0:2])).sigmoid() * 102.4 - 51.2
        z = (tmp[..., 4:5] + inverse_sigmoid(ref[..., 2:3])).sigmoid() * 8.0 - 5.0
        torch.testing.assert_close(code[..., 0:2], xy)
        torch.testing.assert_close(code[..., 4:5], z)
        torch.testing.assert_close(code[..., [2, 3, 5, 6, 7, 8, 9]], tmp[..., [2, 3, 5, 6, 7, 8, 9]])
        torch.testing.assert_close(logits, head.cls_branches[2](out))
    assert not torch.allclose(seen[1][0], seen[0][0])


# ---------------------------------------------------------------------------------------------
# Servable model, converter
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return random_detr3d_folder(tmp_path_factory.mktemp("detr3d") / "tiny")


def _inputs(model, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, w = model.config["image_size"]
    images = rng.standard_normal((batch, model.num_cams, 3, h, w), dtype=np.float32)
    l2i = np.stack([ring_lidar2img(model.num_cams, h, w, focal=w / (2 + i)) for i in range(batch)])
    return {"images": images, "lidar2img": l2i}


def test_tiny_model_contract_shapes_and_camera_dependence(tiny):
    model = load_model(tiny)
    assert json.loads((tiny / "config.json").read_text())["model_type"] == "detr3d"
    assert [s.name for s in model.outputs] == ["boxes", "scores", "labels"]
    inputs = _inputs(model, 2)
    out = model.forward(model.prepare(inputs, {}), {})
    assert out["boxes"].shape == (2, 20, 9) and out["boxes"].dtype == torch.float32
    assert out["scores"].shape == (2, 20) and out["scores"].dtype == torch.float32
    assert out["labels"].shape == (2, 20) and out["labels"].dtype == torch.int64
    assert (out["scores"][:, :-1] >= out["scores"][:, 1:]).all()
    assert ((out["labels"] >= 0) & (out["labels"] < 3)).all()
    sizes = out["boxes"][..., 3:6]
    assert (sizes > 0).all()
    # The images and the cameras matter.
    other = dict(inputs, images=inputs["images"] + 1.0)
    assert not torch.allclose(model.forward(model.prepare(other, {}), {})["scores"], out["scores"])
    other = dict(inputs, lidar2img=inputs["lidar2img"][:, ::-1].copy())
    assert not torch.allclose(model.forward(model.prepare(other, {}), {})["scores"], out["scores"])
    # Warm-up path.
    model.warmup()


def test_padding_with_score_threshold(tiny, tmp_path):
    scores = load_model(tiny).forward(load_model(tiny).prepare(_inputs(load_model(tiny), 1), {}), {})["scores"][0]
    threshold = float((scores[7] + scores[8]) / 2)
    folder = random_detr3d_folder(tmp_path / "thr", {"score_threshold": threshold})
    model = load_model(folder)
    out = model.forward(model.prepare(_inputs(model, 1), {}), {})
    assert (out["scores"][0, :8] > threshold).all()
    torch.testing.assert_close(out["scores"][0, :8], scores[:8])
    assert out["labels"][0, 8:].eq(-1).all() and out["scores"][0, 8:].eq(0).all() and out["boxes"][0, 8:].eq(0).all()


def test_batch_of_two_equals_two_of_one(tiny):
    model = load_model(tiny)
    inputs = _inputs(model, 2, seed=5)
    both = model.forward(model.prepare(inputs, {}), {})
    for i in range(2):
        one = model.forward(model.prepare({k: v[i : i + 1] for k, v in inputs.items()}, {}), {})
        torch.testing.assert_close(one["scores"], both["scores"][i : i + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(one["boxes"], both["boxes"][i : i + 1], rtol=1e-4, atol=1e-4)
        assert torch.equal(one["labels"], both["labels"][i : i + 1])


def test_bad_inputs_raise_input_error(tiny):
    model = load_model(tiny)
    good = _inputs(model, 1)
    bad_cases = {
        "cameras": dict(good, images=np.zeros((1, 3, 3, 64, 96), np.float32)),
        "lidar2img shape": dict(good, lidar2img=np.zeros((1, 2, 3, 4), np.float32)),
        "lidar2img cams": dict(good, lidar2img=np.zeros((1, 3, 4, 4), np.float32)),
        "dtype": dict(good, images=good["images"].astype(np.float64)),
        "lidar2img dtype": dict(good, lidar2img=good["lidar2img"].astype(np.float16)),
        "batch mismatch": dict(good, lidar2img=np.concatenate([good["lidar2img"]] * 2)),
        "missing": {"images": good["images"]},
        "unknown": dict(good, extra=np.zeros(1, np.float32)),
        "rank": dict(good, images=good["images"][0]),
        "too small": dict(good, images=np.zeros((1, 2, 3, 16, 16), np.float32)),
        "nan": dict(good, lidar2img=np.full((1, 2, 4, 4), np.nan, np.float32)),
    }
    for name, inputs in bad_cases.items():
        with pytest.raises(InputError):
            model.prepare(inputs, {})
            pytest.fail(f"{name}: accepted")


def test_converter_round_trip(tiny, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(tiny / "model.safetensors"))
    ckpt = {
        "meta": {"mmcv_version": "1.3.8", "epoch": 24, "CLASSES": ("car", "pedestrian", "barrier")},
        "state_dict": {**state, "pts_bbox_head.code_weights": torch.tensor([1.0] * 8 + [0.2] * 2)},
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 2e-4}]},
    }
    src = tmp_path / "detr3d_tiny.pth"
    torch.save(ckpt, src)
    out = tmp_path / "converted"
    # num_heads is not in the weights; num_cams is read off them (num_points = 1) and checked.
    assert convert_main(["detr3d", str(src), str(out), "--num-heads", "4", "--num-cams", "2", "--max-num", "20"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    want = json.loads((tiny / "config.json").read_text())
    informational = ("image_size", "class_names")
    assert {k: v for k, v in cfg.items() if k not in informational} == {
        k: v for k, v in want.items() if k not in informational
    }
    assert "pts_bbox_head.code_weights" not in load_file(str(out / "model.safetensors"))
    original, converted = load_model(tiny), load_model(out)
    # image_size is not in the weights (informational); serve the same inputs to both.
    inputs = _inputs(original, 1)
    a = original.forward(original.prepare(inputs, {}), {})
    b = converted.forward(converted.prepare(inputs, {}), {})
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # A pickle holding arbitrary objects is refused, never unpickled.
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": state, "hook": Path("/")}, evil)
    with pytest.raises(ValueError, match="refused"):
        convert_detr3d(evil, tmp_path / "evil_out")
    # Weights of another architecture are an error, not a partial load.
    broken = tmp_path / "broken.pth"
    torch.save({"state_dict": {k: v for k, v in state.items() if "ffns.0.layers.1" not in k}}, broken)
    with pytest.raises(ValueError, match="does not match"):
        convert_detr3d(broken, tmp_path / "broken_out")
