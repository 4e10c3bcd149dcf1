"""FourCastNet's AFNONet (Adaptive Fourier Neural Operator backbone), servable as ``model_type: afno``.

Re-implemented in plain torch from the description of NVlabs/FourCastNet ``networks/afnonet.py``
(commit 93360c1); parameter names equal that module's ``state_dict`` names so a released
``backbone.ckpt`` converts by stripping the DDP ``module.`` prefix only.

The reference has quirks that change the numbers; they are kept on purpose (a "fixed" version would
not reproduce released FourCastNet forecasts):

* the spectral window is computed from the token-grid HEIGHT only (``total_modes = h // 2 + 1``) and
  the same ``kept`` count also limits the rFFT columns, whatever the width;
* the window rows are in unshifted FFT order (``total_modes - kept : total_modes + kept``), so with
  ``hard_thresholding_fraction < 1`` the zero vertical frequency (row 0) is not processed;
* coefficients outside the window are zeroed (not passed through);
* the filter adds its own input back (``x + bias``) and the block adds the residual again
  ("double skip");
* ``norm.*`` weights exist but ``forward`` never applies the final LayerNorm;
* the head output is rearranged ``b h w (p1 p2 c) -> b c (h p1) (w p2)`` (channels innermost);
* LayerNorm eps is 1e-6 and GELU is the exact erf form.

Request: ``fields`` FP32 [N, in_chans, H, W] with (H, W) = ``img_size`` exactly. Response:
``forecast`` FP32 [N, out_chans, H, W]. The optional request parameter ``steps`` (int, 1..64) rolls
the model out autoregressively (forecast fed back as the next input; needs in_chans == out_chans)
and then returns ``forecast`` as [N, steps, out_chans, H, W].
"""

from __future__ import annotations

import argparse
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.base import InputError, Model, RequestTensor, TensorSpec
from models.weights import build_on_meta, load_into, read_state_dict, torch_load_tensors, write_model_folder

MAX_STEPS = 64  # upper bound of the ``steps`` request parameter (each step is a full forward)


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AFNOConfig:
    """Hyper-parameters of AFNONet; defaults are those of the released FourCastNet backbone (AFNO.yaml)."""

    img_size: tuple[int, int] = (720, 1440)
    patch_size: tuple[int, int] = (8, 8)
    in_chans: int = 20
    out_chans: int = 20
    embed_dim: int = 768
    depth: int = 12
    mlp_ratio: float = 4.0
    num_blocks: int = 8
    sparsity_threshold: float = 0.01
    hard_thresholding_fraction: float = 1.0

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (h, w) = img_size // patch_size."""
        return self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1]

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> AFNOConfig:
        """Validate a config.json dict (unknown keys such as ``model_type`` are ignored)."""
        d = {f: config[f] for f in cls.__dataclass_fields__ if f in config}

        def pair(name: str) -> tuple[int, int]:
            v = d.get(name, getattr(cls, name))
            if isinstance(v, int) and not isinstance(v, bool):
                v = [v, v]
            if (
                not isinstance(v, (list, tuple))
                or len(v) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)
            ):
                raise ValueError(f"afno config: {name} must be two positive integers, got {v!r}")
            return int(v[0]), int(v[1])

        def pos_int(name: str) -> int:
            v = d.get(name, getattr(cls, name))
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"afno config: {name} must be a positive integer, got {v!r}")
            return v

        def num(name: str) -> float:
            v = d.get(name, getattr(cls, name))
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                raise ValueError(f"afno config: {name} must be a number, got {v!r}")
            return float(v)

        cfg = cls(
            img_size=pair("img_size"),
            patch_size=pair("patch_size"),
            in_chans=pos_int("in_chans"),
            out_chans=pos_int("out_chans"),
            embed_dim=pos_int("embed_dim"),
            depth=pos_int("depth"),
            mlp_ratio=num("mlp_ratio"),
            num_blocks=pos_int("num_blocks"),
            sparsity_threshold=num("sparsity_threshold"),
            hard_thresholding_fraction=num("hard_thresholding_fraction"),
        )
        if any(s % p for s, p in zip(cfg.img_size, cfg.patch_size, strict=True)):
            raise ValueError(
                f"afno config: img_size {list(cfg.img_size)} is not a multiple of patch_size {list(cfg.patch_size)}"
            )
        if cfg.embed_dim % cfg.num_blocks:
            raise ValueError(f"afno config: embed_dim {cfg.embed_dim} is not divisible by num_blocks {cfg.num_blocks}")
        if int(cfg.embed_dim * cfg.mlp_ratio) < 1:
            raise ValueError(f"afno config: mlp_ratio {cfg.mlp_ratio} gives an empty MLP")
        if not 0.0 < cfg.hard_thresholding_fraction <= 1.0:
            raise ValueError("afno config: hard_thresholding_fraction must be in (0, 1]")
        if cfg.sparsity_threshold < 0:
            raise ValueError("afno config: sparsity_threshold must be >= 0")
        return cfg

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["img_size"], d["patch_size"] = list(self.img_size), list(self.patch_size)
        return {"model_type": "afno", **d}


# ------------------------------------------------------------------------------------------------
# Modules (names = FourCastNet's)
# ------------------------------------------------------------------------------------------------
class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2; dropout of the reference is inference-time identity."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()  # approximate='none': the reference uses nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AFNO2D(nn.Module):
    """Token mixing in Fourier space: a block-diagonal complex 2-layer MLP on a window of modes.

    ``w1``/``w2`` [2, num_blocks, bs, bs] and ``b1``/``b2`` [2, num_blocks, bs] hold the real (index 0)
    and imaginary (index 1) parts (hidden_size_factor = 1, as FourCastNet uses it).
    """

    def __init__(
        self, hidden_size: int, num_blocks: int, sparsity_threshold: float, hard_thresholding_fraction: float
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_blocks = num_blocks
        self.block_size = hidden_size // num_blocks
        self.sparsity_threshold = sparsity_threshold
        self.hard_thresholding_fraction = hard_thresholding_fraction
        bs = self.block_size
        self.w1 = nn.Parameter(torch.empty(2, num_blocks, bs, bs))
        self.b1 = nn.Parameter(torch.empty(2, num_blocks, bs))
        self.w2 = nn.Parameter(torch.empty(2, num_blocks, bs, bs))
        self.b2 = nn.Parameter(torch.empty(2, num_blocks, bs))

    def window(self, h: int) -> tuple[slice, slice]:
        """(rows, cols) of the rfft2 output that are processed; everything else becomes zero.

        Both come from the grid HEIGHT (reference quirk); rows are unshifted FFT order, so the slice
        ``total - kept : total + kept`` is centred on the highest vertical frequencies.
        """
        total_modes = h // 2 + 1
        kept = int(total_modes * self.hard_thresholding_fraction)
        return slice(total_modes - kept, total_modes + kept), slice(0, kept)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = x
        dtype = x.dtype
        x = x.float()
        B, H, W, C = x.shape  # [B, h, w, C] token grid
        wf = W // 2 + 1
        x = torch.fft.rfft2(x, dim=(1, 2), norm="ortho")  # [B, h, w//2+1, C] complex
        x = x.reshape(B, H, wf, self.num_blocks, self.block_size)

        rows, cols = self.window(H)
        xw = x[:, rows, cols]  # [B, hr, wc, nb, bs]
        xr, xi = xw.real, xw.imag
        w1, b1, w2, b2 = self.w1, self.b1, self.w2, self.b2
        # Complex multiply written as in the reference (same einsum order, same rounding).
        o1_real = F.relu(
            torch.einsum("...bi,bio->...bo", xr, w1[0]) - torch.einsum("...bi,bio->...bo", xi, w1[1]) + b1[0]
        )
        o1_imag = F.relu(
            torch.einsum("...bi,bio->...bo", xi, w1[0]) + torch.einsum("...bi,bio->...bo", xr, w1[1]) + b1[1]
        )
        o2_real = (
            torch.einsum("...bi,bio->...bo", o1_real, w2[0]) - torch.einsum("...bi,bio->...bo", o1_imag, w2[1]) + b2[0]
        )
        o2_imag = (
            torch.einsum("...bi,bio->...bo", o1_imag, w2[0]) + torch.einsum("...bi,bio->...bo", o1_real, w2[1]) + b2[1]
        )
        # softshrink(0) = 0, so shrinking only the window equals shrinking the zero-filled whole.
        o2_real = F.softshrink(o2_real, lambd=self.sparsity_threshold)
        o2_imag = F.softshrink(o2_imag, lambd=self.sparsity_threshold)

        out = torch.zeros(B, H, wf, self.num_blocks, self.block_size, dtype=x.dtype, device=x.device)
        out[:, rows, cols] = torch.complex(o2_real, o2_imag)
        out = out.reshape(B, H, wf, C)
        x = torch.fft.irfft2(out, s=(H, W), dim=(1, 2), norm="ortho")  # [B, h, w, C] real
        return x.type(dtype) + bias  # the filter's own skip (first of the "double skip")


class Block(nn.Module):
    """LayerNorm -> AFNO2D -> + residual (double skip) -> LayerNorm -> Mlp -> + residual."""

    def __init__(self, cfg: AFNOConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.filter = AFNO2D(dim, cfg.num_blocks, cfg.sparsity_threshold, cfg.hard_thresholding_fraction)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.filter(self.norm1(x)) + x
        return self.mlp(self.norm2(x)) + x


class PatchEmbed(nn.Module):
    """Non-overlapping patches: Conv2d(kernel = stride = patch) -> tokens [B, h*w, C]."""

    def __init__(self, cfg: AFNOConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C]


class AFNONet(nn.Module):
    """FourCastNet's backbone: [B, in_chans, H, W] -> [B, out_chans, H, W]."""

    def __init__(self, cfg: AFNOConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.h, self.w = cfg.grid
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.empty(1, self.h * self.w, cfg.embed_dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        # Present in every checkpoint but never applied by the reference forward (kept for loading).
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        p1, p2 = cfg.patch_size
        self.head = nn.Linear(cfg.embed_dim, p1 * p2 * cfg.out_chans, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        x = self.patch_embed(x) + self.pos_embed  # [B, h*w, C]
        x = x.reshape(B, self.h, self.w, self.cfg.embed_dim)  # [B, h, w, C]
        for blk in self.blocks:
            x = blk(x)
        x = self.head(x)  # [B, h, w, p1*p2*out]; no final norm (reference quirk)
        p1, p2 = self.cfg.patch_size
        c = self.cfg.out_chans
        # 'b h w (p1 p2 c) -> b c (h p1) (w p2)'
        x = x.reshape(B, self.h, self.w, p1, p2, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, c, self.h * p1, self.w * p2)


# ------------------------------------------------------------------------------------------------
# Servable model
# ------------------------------------------------------------------------------------------------
def parse_steps(parameters: Mapping[str, Any]) -> int | None:
    """The ``steps`` request parameter: None when absent, else an int in 1..MAX_STEPS (InputError otherwise)."""
    if parameters is None or "steps" not in parameters:
        return None
    steps = parameters["steps"]
    if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)):
        raise InputError(f"parameter 'steps' must be an integer, got {steps!r}")
    steps = int(steps)
    if not 1 <= steps <= MAX_STEPS:
        raise InputError(f"parameter 'steps' must be between 1 and {MAX_STEPS}, got {steps}")
    return steps


class AFNOModel(Model):
    """AFNONet served as ``fields`` -> ``forecast`` with an optional autoregressive ``steps`` rollout."""

    model_type = "afno"

    @classmethod
    def convert(cls, src: Path, out: Path, args: argparse.Namespace) -> Path:
        return convert_afno(src, out, args)

    @classmethod
    def add_convert_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_arguments(parser)

    def __init__(
        self, folder: Path, config: dict[str, Any], device: torch.device, cfg: AFNOConfig, net: AFNONet
    ) -> None:
        super().__init__(folder, config, device)
        self.cfg = cfg
        self.net = net
        H, W = cfg.img_size
        self.inputs = (TensorSpec("fields", "FP32", (-1, cfg.in_chans, H, W)),)
        self.outputs = (TensorSpec("forecast", "FP32", (-1, cfg.out_chans, H, W)),)

    @classmethod
    def build(cls, folder: Path, config: dict[str, Any], device: torch.device) -> AFNOModel:
        cfg = AFNOConfig.from_dict(config)
        net = build_on_meta(lambda: AFNONet(cfg))
        load_into(net, read_state_dict(folder), device)
        return cls(Path(folder), config, device, cfg, net)

    def _check_steps(self, parameters: Mapping[str, Any]) -> int | None:
        steps = parse_steps(parameters)
        if steps is not None and self.cfg.in_chans != self.cfg.out_chans:
            raise InputError(
                f"parameter 'steps' needs in_chans == out_chans to feed the forecast back "
                f"(this model: {self.cfg.in_chans} -> {self.cfg.out_chans})"
            )
        return steps

    def prepare(self, inputs: Mapping[str, RequestTensor], parameters: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        self.check_inputs(inputs)  # name, FP32, [N, in_chans, H, W] with H, W = img_size exactly
        self._check_steps(parameters)
        fields = inputs["fields"]
        if not (fields.flags.c_contiguous and fields.flags.writeable):  # e.g. np.frombuffer of a request body
            fields = np.array(fields, order="C", copy=True)
        return {"fields": torch.from_numpy(fields)}

    def batch_key(self, prepared: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]) -> Any:
        # ``steps`` changes the output shape (and the work), so it is part of the key.
        return (super().batch_key(prepared, parameters), parse_steps(parameters))

    def forward(self, batch: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        steps = self._check_steps(parameters)
        with torch.inference_mode():
            x = batch["fields"].to(self.device, torch.float32)
            if steps is None:
                return {"forecast": self.net(x).float().cpu()}
            frames = []
            for _ in range(steps):
                x = self.net(x)
                frames.append(x)
            return {"forecast": torch.stack(frames, dim=1).float().cpu()}  # [N, steps, C, H, W]

    def example_inputs(self, batch_size: int = 1) -> dict[str, RequestTensor]:
        rng = np.random.default_rng(0)
        H, W = self.cfg.img_size
        return {"fields": rng.standard_normal((batch_size, self.cfg.in_chans, H, W), dtype=np.float32)}


# ------------------------------------------------------------------------------------------------
# Random model folder (tests, demo)
# ------------------------------------------------------------------------------------------------
SMALL_CONFIG: dict[str, Any] = {
    "model_type": "afno",
    "img_size": [16, 32],
    "patch_size": [4, 4],
    "in_chans": 3,
    "out_chans": 3,
    "embed_dim": 32,
    "depth": 2,
    "mlp_ratio": 2.0,
    "num_blocks": 4,
    "sparsity_threshold": 0.01,
    "hard_thresholding_fraction": 1.0,
}


def random_afno_folder(out: Path, config: dict | None = None, seed: int = 0) -> Path:
    """Write a deterministic random AFNO model folder; ``config`` overrides keys of a tiny default.

    Spectral weights get a larger scale than FourCastNet's 0.02 init so the filter is not all
    soft-shrunk to zero and the forward exercises every path.
    """
    cfg = AFNOConfig.from_dict({**SMALL_CONFIG, **(config or {})})
    net = build_on_meta(lambda: AFNONet(cfg))
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, p in sorted(net.state_dict(keep_vars=True).items()):
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        elif ".filter." in name:
            t = 0.3 * torch.randn(p.shape, generator=gen)
        elif name.endswith("bias"):
            t = 0.02 * torch.randn(p.shape, generator=gen)
        elif name == "pos_embed":
            t = 0.02 * torch.randn(p.shape, generator=gen)
        else:  # conv / linear weights: unit-variance outputs
            fan_in = int(np.prod(p.shape[1:]))
            t = torch.randn(p.shape, generator=gen) / fan_in**0.5
        state[name] = t.float()
    return write_model_folder(out, cfg.to_json(), state)


# ------------------------------------------------------------------------------------------------
# Converter: FourCastNet training checkpoint -> model folder
# ------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI options; each one left out is inferred from the tensor shapes or takes FourCastNet's default."""
    g = parser.add_argument_group(
        "afno",
        "embed_dim, depth, in/out chans, patch size, num_blocks and mlp_ratio are read from the tensor "
        "shapes. The image size is not: give --img-size unless it is FourCastNet's 720 1440. "
        "sparsity_threshold (0.01) and hard_thresholding_fraction (1.0) are not stored in the checkpoint.",
    )
    g.add_argument(
        "--img-size", type=int, nargs=2, metavar=("H", "W"), help="input height and width (default 720 1440)"
    )
    g.add_argument("--patch-size", type=int, nargs="+", metavar="P", help="patch size, one (square) or two ints")
    g.add_argument("--in-chans", type=int)
    g.add_argument("--out-chans", type=int)
    g.add_argument("--embed-dim", type=int)
    g.add_argument("--depth", type=int)
    g.add_argument("--num-blocks", type=int)
    g.add_argument("--mlp-ratio", type=float)
    g.add_argument("--sparsity-threshold", type=float, help="softshrink lambda (default 0.01)")
    g.add_argument("--hard-thresholding-fraction", type=float, help="spectral window fraction (default 1.0)")


def _extract_state(ckpt: Any) -> dict[str, torch.Tensor]:
    """``model_state`` of a FourCastNet training checkpoint (or a bare state dict), without ``module.``."""
    if isinstance(ckpt, dict) and "model_state" in ckpt:
        ckpt = ckpt["model_state"]
    if not isinstance(ckpt, dict) or not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError("not a FourCastNet checkpoint: expected a dict with 'model_state' (a state dict of tensors)")
    # FourCastNet's inference.py strips the DDP prefix with key[7:].
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in ckpt.items()}


def infer_config(state: Mapping[str, torch.Tensor], args: argparse.Namespace | None = None) -> AFNOConfig:
    """Config from the tensor shapes, checked against (and completed by) the CLI options in ``args``."""
    opt = (lambda name: getattr(args, name, None)) if args is not None else (lambda name: None)

    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"not an AFNONet state dict: no {key!r}")
        return state[key]

    proj = need("patch_embed.proj.weight")  # [embed_dim, in_chans, p1, p2]
    embed_dim, in_chans, p1, p2 = (int(s) for s in proj.shape)
    w1 = need("blocks.0.filter.w1")  # [2, num_blocks, bs, bs]
    num_blocks = int(w1.shape[1])
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    hidden = int(need("blocks.0.mlp.fc1.weight").shape[0])
    head = int(need("head.weight").shape[0])  # p1*p2*out_chans
    if head % (p1 * p2):
        raise ValueError(f"head.weight rows {head} are not a multiple of the patch area {p1 * p2}")
    inferred: dict[str, Any] = {
        "patch_size": [p1, p2],
        "in_chans": in_chans,
        "out_chans": head // (p1 * p2),
        "embed_dim": embed_dim,
        "depth": depth,
        "num_blocks": num_blocks,
        "mlp_ratio": hidden / embed_dim,
    }
    given: dict[str, Any] = {
        "patch_size": opt("patch_size"),
        "in_chans": opt("in_chans"),
        "out_chans": opt("out_chans"),
        "embed_dim": opt("embed_dim"),
        "depth": opt("depth"),
        "num_blocks": opt("num_blocks"),
        "mlp_ratio": opt("mlp_ratio"),
    }
    if given["patch_size"] is not None and len(given["patch_size"]) == 1:
        given["patch_size"] = given["patch_size"] * 2
    for key, value in given.items():
        if value is None:
            continue
        if key == "patch_size":
            value = list(value)
        if key == "mlp_ratio":
            if int(embed_dim * value) != hidden:
                raise ValueError(
                    f"--mlp-ratio {value} gives {int(embed_dim * value)} hidden units; the checkpoint has {hidden}"
                )
            inferred[key] = float(value)
        elif value != inferred[key]:
            raise ValueError(f"--{key.replace('_', '-')} {value} contradicts the checkpoint, which has {inferred[key]}")

    num_patches = int(need("pos_embed").shape[1])  # [1, h*w, C]
    img_size = opt("img_size")
    if img_size is None:
        img_size = list(AFNOConfig.img_size)
        if (img_size[0] // p1) * (img_size[1] // p2) != num_patches:
            raise ValueError(
                f"pos_embed holds {num_patches} patches, which does not fit the default img_size {img_size} "
                f"with patch {p1}x{p2}: give --img-size H W"
            )
    img_size = list(img_size)
    if (img_size[0] // p1) * (img_size[1] // p2) != num_patches:
        raise ValueError(
            f"--img-size {img_size} gives {(img_size[0] // p1) * (img_size[1] // p2)} patches; pos_embed has {num_patches}"
        )
    config = {"img_size": img_size, **inferred}
    for key in ("sparsity_threshold", "hard_thresholding_fraction"):
        if opt(key) is not None:
            config[key] = opt(key)
    return AFNOConfig.from_dict(config)


def convert_afno(src: Path, out: Path, args: argparse.Namespace) -> Path:
    """FourCastNet ``backbone.ckpt`` (``model_state`` with DDP ``module.`` keys) -> model folder."""
    ckpt = torch_load_tensors(Path(src))  # weights_only=True: refuses arbitrary pickled objects
    state = _extract_state(ckpt)
    cfg = infer_config(state, args)
    net = build_on_meta(lambda: AFNONet(cfg))
    load_into(net, dict(state), torch.device("cpu"))  # names and shapes must match exactly
    return write_model_folder(out, cfg.to_json(), state)
