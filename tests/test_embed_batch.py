"""The batch path's shortcuts give what the plain torch calls give."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from simsearch.pipeline.embed import _resampled, _stacked


@pytest.mark.parametrize("h,w", [(6, 8), (7, 7), (14, 14), (5, 12), (1, 1), (10, 7)])
def test_resampled_maps_equal_adaptive_average_pooling(h: int, w: int):
    fmap = torch.randn(3, 16, h, w)
    expected = torch.nn.functional.adaptive_avg_pool2d(fmap, (7, 7))
    assert torch.allclose(_resampled(fmap, 7, 7), expected, atol=1e-5)


def test_stacking_keeps_pixels_whatever_the_memory_order():
    pixels = [torch.randint(0, 255, (20, 30, 3), dtype=torch.uint8) for _ in range(4)]
    channels_last = [p.permute(2, 0, 1) for p in pixels]  # as `preprocess` gives them
    contiguous = [c.contiguous() for c in channels_last]  # as the decode workers hand them over
    expected = torch.stack(contiguous)
    for images in (channels_last, contiguous):
        assert torch.equal(_stacked(images), expected)


def test_images_without_boxes_never_import_torchvision_ops():
    code = ("import sys, numpy as np; from simsearch.pipeline.box_vectors import pool_boxes; "
            "out = pool_boxes(np.zeros((2, 8, 7, 7), np.float16), [np.zeros((0, 4))] * 2); "
            "assert [o.shape for o in out] == [(0, 8)] * 2; print('torchvision.ops' in sys.modules)")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "False"
    vectors = __import__("simsearch.pipeline.box_vectors", fromlist=["pool_boxes"]).pool_boxes(
        np.random.rand(1, 8, 7, 7).astype(np.float32), [np.array([[0.0, 0.0, 1.0, 1.0]])])
    assert vectors[0].shape == (1, 8) and np.isclose(np.linalg.norm(vectors[0]), 1.0)
