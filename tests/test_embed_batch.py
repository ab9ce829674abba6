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


def _files(folder, sizes):
    """JPEGs of the given (width, height) and one file that is not an image, in name order."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = folder / f"{i:02d}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    broken = folder / "99-broken.jpg"
    broken.write_bytes(b"not a jpeg")
    return paths[:3] + [broken] + paths[3:]


def test_decode_batches_stack_by_shape_and_keep_failures_in_place(tmp_path):
    from simsearch.pipeline.embed import ImageFileDataset, _decoded_batches
    from simsearch.spec import Preprocess

    paths = _files(tmp_path / "img", [(640, 480), (480, 640), (640, 480), (300, 300), (639, 480)])
    pre = Preprocess()
    for workers in (0, 1):  # threads in this process, and a DataLoader process
        batches = list(_decoded_batches(ImageFileDataset(paths, pre), 4, workers, pin_memory=False))
        assert [[d.index for d in b.decoded] for b in batches] == [[0, 1, 2, 3], [4, 5]]
        first = batches[0]
        assert [d.index for d in first.good] == [0, 1, 2] and first.decoded[3].error
        # 640x480 and 639x480 share an input shape; 480x640 is the other way round
        assert [(members, tuple(t.shape)) for members, t in first.groups] == [
            ([0, 2], (2, 3, 192, 256)), ([1], (1, 3, 256, 192))]
        assert all(d.tensor is None for d in first.decoded)  # the pixels travel once, stacked
        alone = ImageFileDataset(paths, pre)[2].tensor
        assert torch.equal(first.groups[0][1][1], alone)


def test_threaded_and_process_decoding_embed_the_same(tmp_path):
    from simsearch.pipeline.embed import EmbedConfig, Embedder, ImageFileDataset, iter_file_batches, load_backbone

    paths = _files(tmp_path / "img", [(640, 480), (480, 640), (500, 375), (300, 300), (640, 480)])
    embedder = Embedder(load_backbone("efficientnet-lite0", "random"), "cpu", "fp32", "torch")
    runs = []
    for workers in (0, 1):
        config = EmbedConfig(model="efficientnet-lite0", weights="random", batch_size=3, workers=workers, quiet=True)
        batches = list(iter_file_batches(paths, embedder, config))
        indices = [i for b in batches for i in b.indices]
        vectors = np.concatenate([b.embedded.vectors for b in batches if b.embedded is not None])
        runs.append((sorted(indices), [f for b in batches for f in b.failures], vectors[np.argsort(indices)]))
    (indices, failures, vectors), (indices_1, failures_1, vectors_1) = runs
    assert indices == indices_1 == [0, 1, 2, 4, 5] and [i for i, _ in failures] == [i for i, _ in failures_1] == [3]
    assert np.allclose(vectors, vectors_1, atol=1e-6)
    for row, i in enumerate(indices):  # regrouped by shape across decoded batches: each still its own file's
        single = embedder.embed_batch([ImageFileDataset([paths[i]], embedder.spec.preprocess)[0].tensor]).vectors[0]
        assert np.allclose(vectors[row], single, atol=1e-5)


def test_decoding_defaults_to_threads_on_a_cpu_and_processes_beside_a_gpu():
    from simsearch.pipeline.embed import decode_workers, default_workers

    assert decode_workers(-1, torch.device("cpu")) == 0
    assert decode_workers(-1, torch.device("cuda")) == default_workers() >= 1
    assert decode_workers(3, torch.device("cpu")) == 3


def test_an_empty_batch_runs_no_forward_pass():
    from simsearch.pipeline.embed import Embedder, load_backbone

    embedder = Embedder(load_backbone("efficientnet-lite0", "random"), "cpu", "fp32", "torch")
    embedder.runner = lambda x: pytest.fail("the model ran on an empty batch")
    for empty in (torch.empty(0, 3, 224, 224, dtype=torch.uint8), []):
        out = embedder.embed_batch(empty)
        assert out.vectors.shape == (0, 1280) and out.maps.shape == (0, 1280, 7, 7)


def _decoded_batch(start: int, shapes: list[tuple[int, int]], bad: frozenset[int] = frozenset()):
    """A DecodedBatch as the decoders hand it over; each image's pixels all equal its file index (mod 256)."""
    from simsearch.pipeline.embed import Decoded, DecodedBatch

    decoded = [Decoded(start + k, None, 10, 10, error="unreadable" if start + k in bad else None)
               for k in range(len(shapes))]
    good = [(d, shape) for d, shape in zip(decoded, shapes) if d.error is None]
    by_shape: dict[tuple[int, int], list[int]] = {}
    for position, (_, shape) in enumerate(good):
        by_shape.setdefault(shape, []).append(position)
    groups = [(members, torch.stack([torch.full((3, *shape), good[m][0].index % 256, dtype=torch.uint8)
                                     for m in members])) for shape, members in by_shape.items()]
    return DecodedBatch(decoded, groups)


def test_shape_bins_hand_on_full_batches_of_one_shape_each_image_once():
    from simsearch.pipeline.shape_bins import ShapeBins

    rng = np.random.default_rng(0)
    shapes = [(64, 48), (48, 64), (64, 64), (32, 96)]
    weights = [0.7, 0.15, 0.1, 0.05]  # one common shape, a rare one that may never fill
    bins, out, held = ShapeBins(8, max_held=20), [], []
    for start in range(0, 200, 8):
        batch = _decoded_batch(start, [shapes[i] for i in rng.choice(4, 8, p=weights)], bad={13, 77})
        out += [(files, stacked, False) for files, stacked in bins.add(batch)]
        held.append(bins.held)
    out += [(files, stacked, True) for files, stacked in bins.drain()]

    seen = [d.index for files, _, _ in out for d in files]
    assert sorted(seen) == [i for i in range(200) if i not in (13, 77)]  # every good image once, the bad never
    assert max(held) <= 20 and bins.held == 0  # memory stays bounded; nothing left behind
    for files, stacked, tail in out:
        assert stacked.shape[0] == len(files) <= 8
        assert len({tuple(stacked.shape[1:])}) == 1
        for row, d in enumerate(files):  # each row is that file's own pixels
            assert int(stacked[row].min()) == int(stacked[row].max()) == d.index % 256
    full = [stacked for files, stacked, tail in out if not tail]
    assert sum(len(s) == 8 for s in full) >= len(full) - 3  # nearly every pass before the end is a full one
    tails = [tuple(stacked.shape[2:]) for _, stacked, tail in out if tail]
    assert len(tails) == len(set(tails))  # at the end, at most one tail a shape


def test_shape_bins_slice_a_stack_that_fills_a_batch_without_copying():
    from simsearch.pipeline.shape_bins import ShapeBins

    batch = _decoded_batch(0, [(64, 48)] * 8)
    (files, stacked), = list(ShapeBins(8).add(batch, torch.device("cpu")))  # on a GPU it holds them there
    assert [d.index for d in files] == list(range(8))
    assert stacked.data_ptr() == batch.groups[0][1].data_ptr()  # the decoders' stack itself


def test_shape_bins_keep_full_batches_with_many_shapes_and_handle_edges():
    """A mixed library has 10-20 input shapes: the default holding still waits for full batches."""
    from simsearch.pipeline.shape_bins import ShapeBins

    rng = np.random.default_rng(1)
    shapes = [(32 * (2 + k % 8), 32 * (2 + k // 8)) for k in range(16)]
    bins, sizes = ShapeBins(8), []
    for start in range(0, 3000, 8):
        sizes += [len(files) for files, _ in bins.add(_decoded_batch(start, [shapes[i] for i in rng.integers(0, 16, 8)]))]
    tails = [len(files) for files, _ in bins.drain()]
    assert sum(sizes) + sum(tails) == 3000 and len(tails) <= 16
    assert all(n == 8 for n in sizes)  # 16 shapes, 16 batches held: no pass before the end is part-full

    one, out = ShapeBins(1), []
    for start in range(0, 6, 3):
        out += [files for files, _ in one.add(_decoded_batch(start, [(64, 48), (48, 64), (64, 48)], bad={4}))]
    assert [[d.index for d in f] for f in out] == [[0], [2], [1], [3], [5]] and list(one.drain()) == []
    empty = ShapeBins(8)
    assert list(empty.add(_decoded_batch(0, [(64, 48)] * 3, bad={0, 1, 2}))) == [] and list(empty.drain()) == []


def test_the_progress_bar_counts_files_done_not_decoded(tmp_path, monkeypatch):
    """Images wait in the shape bins after decoding: the bar must not reach the end before they are embedded."""
    import tqdm

    from simsearch.pipeline.embed import EmbedConfig, Embedder, iter_file_batches, load_backbone

    bars = []

    class Bar:
        def __init__(self, total, **_):
            self.total, self.n = total, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            self.n += n

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    paths = _files(tmp_path / "img", [(640, 480), (480, 640), (640, 480), (300, 300), (640, 480), (480, 640)])
    embedder = Embedder(load_backbone("efficientnet-lite0", "random"), "cpu", "fp32", "torch")
    done = 0
    for batch in iter_file_batches(paths, embedder, EmbedConfig(batch_size=4, workers=0)):
        assert bars[0].n == done  # updated after the caller has the batch, not before
        done += len(batch.indices) + len(batch.failures)
    assert bars[0].n == done == len(paths) == bars[0].total
