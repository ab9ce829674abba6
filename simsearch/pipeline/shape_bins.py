"""Shape bins: decoded images regrouped into full batches of one input shape before the model.

Used by the local engine (`embed.iter_file_batches`); the Ray engine's actors embed the
blocks Ray Data hands them as they come.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from simsearch.pipeline.embed import Decoded, DecodedBatch

# Images held, in batches: a photo library's aspect ratios give a handful of input shapes, but
# sides run in steps of 32 up to twice the input size, so a mixed one can have 10-20; below this
# many shapes every bin can wait for a full batch.
MAX_HELD_BATCHES = 16


class ShapeBins:
    """Decoded images held by input shape, handed on as full batches of one shape.

    Aspect-kept preprocessing splits each decoded batch into a few shape groups of ragged
    sizes, and every new (N, H, W) costs a backend its kernels: OpenVINO makes them on a
    shape's first pass, cuDNN picks them (about a second a shape on an H200, where a
    2,000-image build spent most of its time there). Re-formed by shape, nearly every
    forward pass is `batch_size` images of one shape, so the shapes a build meets are its
    few input shapes, each with one tail. On 2 AMX cores it is neutral: builds of 1,000
    photos, OpenVINO bf16, ran 1.01x (Lite0) and 1.00x (ResNet50) the code before it
    (`bench_embed.py --rounds 3 --baseline`), the model alone on ResNet50's re-formed
    batches 1.07x. It is for the GPU, where the per-shape cost is large; there it is not
    measured yet (`benchmarks/bench_gpu.py`).

    At most `max_held` images wait (MAX_HELD_BATCHES batches by default): past that the
    fullest bin is handed on part-full, and shapes that never fill wait for `drain`. Memory
    stays bounded (on a GPU the held stacks live there: 16 batches of 256 are ~0.6 GB), and a
    kill loses the held images besides the batch in flight; the next run embeds them again.
    """

    def __init__(self, batch_size: int, max_held: int | None = None):
        self.batch_size = batch_size
        self.max_held = max(batch_size, max_held or MAX_HELD_BATCHES * batch_size)
        self._bins: dict[tuple[int, ...], list[tuple[Decoded, torch.Tensor, int]]] = {}
        self.held = 0

    def add(self, batch: DecodedBatch, device: torch.device | None = None) -> Iterator[tuple[list[Decoded], torch.Tensor]]:
        """Take a decoded batch in; yield every batch of one shape that is now ready: (its files, (B, 3, H, W))."""
        good = batch.good
        for members, stacked in batch.groups:
            if device is not None:
                stacked = stacked.to(device, non_blocking=True)  # from pinned memory, asynchronously
            pieces = self._bins.setdefault(tuple(stacked.shape[1:]), [])
            pieces += [(good[m], stacked, row) for row, m in enumerate(members)]
            self.held += len(members)
            while len(pieces) >= self.batch_size:
                yield self._take(pieces, self.batch_size)
        while self.held > self.max_held:
            yield self._take(max(self._bins.values(), key=len), self.batch_size)

    def drain(self) -> Iterator[tuple[list[Decoded], torch.Tensor]]:
        """What is still held, each shape's tail, the fullest first (call once the decoded batches are all in)."""
        for pieces in sorted(self._bins.values(), key=len, reverse=True):
            while pieces:
                yield self._take(pieces, self.batch_size)

    def _take(self, pieces: list[tuple[Decoded, torch.Tensor, int]], n: int) -> tuple[list[Decoded], torch.Tensor]:
        taken, pieces[:] = pieces[:n], pieces[n:]
        self.held -= len(taken)
        # Runs of consecutive rows of one decoded stack are sliced, not copied one image at a time.
        runs: list[tuple[torch.Tensor, int, int]] = []
        for _, stacked, row in taken:
            if runs and runs[-1][0] is stacked and runs[-1][2] == row:
                runs[-1] = (stacked, runs[-1][1], row + 1)
            else:
                runs.append((stacked, row, row + 1))
        slices = [stacked[start:end] for stacked, start, end in runs]
        return [d for d, _, _ in taken], slices[0] if len(slices) == 1 else torch.cat(slices)
