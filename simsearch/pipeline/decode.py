"""Decode: a decoded image becomes the backbone's input, resized in uint8, normalised per batch.

Resizing is done by torch's uint8 antialiased bicubic kernel (the same a=-0.5 filter as
Pillow's bicubic, outputs within 0.005 grey levels of it on average) because it ran ~3x
faster than Pillow's resize, which was the largest share of decoding (benchmarks/
bench_decode.py). Images leave the decode workers as uint8, a quarter of the bytes of
floats to pass between processes, and become floats once per batch on the model's device
(`normalize`), where the conversion is one vectorised pass.
"""
from __future__ import annotations

import numpy as np
import torch

from simsearch.spec import Preprocess


def preprocess(image, pre: Preprocess) -> torch.Tensor:
    """PIL RGB image -> uint8 CHW tensor at the size `pre.input_size` gives (see `normalize`)."""
    width, height = pre.input_size(*image.size)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # H, W, 3
    x = pixels.permute(2, 0, 1).unsqueeze(0)  # channels_last strides: the fast uint8 kernel's layout
    if (height, width) != tuple(x.shape[2:]):
        x = torch.nn.functional.interpolate(x, size=(height, width), mode=pre.interpolation, antialias=True)
    return x[0]


def pixel_mean_std(pre: Preprocess) -> tuple[list[float], list[float]]:
    """The backbone's per-channel mean and std in 0-255 pixel units: input = (pixel - mean) / std.

    One place for torch's `normalize` and OpenVINO's model, which applies it inside (backends).
    """
    return [m * 255.0 for m in pre.mean], [s * 255.0 for s in pre.std]


def normalize(batch: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> the float input the backbone was trained on; floats pass through."""
    if batch.dtype != torch.uint8:
        return batch
    mean, std = pixel_mean_std(pre)
    scale = torch.tensor(std, device=batch.device).reciprocal_().view(1, 3, 1, 1)
    shift = torch.tensor(mean, device=batch.device).view(1, 3, 1, 1)
    return batch.float().sub_(shift).mul_(scale)
