"""Decode + preprocess, one image at a time in one process: the decoder variants side by side.

  pillow-resize   Pillow draft decode (DCT-domain 1/2-1/8 scaling), Pillow bicubic resize,
                  float normalise per image: the decoder before issue 16
  torch-uint8     Pillow draft decode, torch's uint8 antialiased bicubic resize, normalised
                  per batch (`simsearch.pipeline.decode`): what build-index runs now
  simplejpeg      libjpeg-turbo through simplejpeg, DCT-scaled to the smallest size covering the
                  input, then the same uint8 resize (EXIF orientation not applied: speed only)

The variants take turns over the same JPEGs for a few rounds (median). `pixel_diff` is the
mean absolute difference of the resized uint8 input to the first variant's, in grey levels.

    python benchmarks/bench_decode.py --quick
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

from common import NOISE_NOTE, print_table, progress, replicated_jpegs, write_result


def pillow_resize(path, pre):
    """The preprocessing before issue 16, kept here to measure against."""
    import numpy as np
    import torch
    from PIL import Image

    from simsearch.pipeline.read import open_image

    im = open_image(path, draft=pre.input_size)
    im = im.resize(pre.input_size(*im.size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    x = (x - torch.tensor(pre.mean).view(3, 1, 1)) / torch.tensor(pre.std).view(3, 1, 1)
    return x, np.asarray(im)


def torch_uint8(path, pre):
    from simsearch.pipeline.decode import normalize, preprocess
    from simsearch.pipeline.read import open_image

    x = preprocess(open_image(path, draft=pre.input_size), pre)
    return normalize(x[None], pre), x.permute(1, 2, 0).numpy()


def simplejpeg_decode(path, pre):
    import numpy as np
    import simplejpeg
    import torch

    from simsearch.pipeline.decode import normalize

    data = path.read_bytes()
    width, height, _, _ = simplejpeg.decode_jpeg_header(data)
    tw, th = pre.input_size(width, height)
    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=tw, min_height=th)
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0)
    x = torch.nn.functional.interpolate(x, size=(th, tw), mode="bicubic", antialias=True)
    return normalize(x, pre), x[0].permute(1, 2, 0).numpy()


VARIANTS = {"pillow-resize": pillow_resize, "torch-uint8": torch_uint8, "simplejpeg": simplejpeg_decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images")
    parser.add_argument("--images", type=int, help="JPEGs (default 150 quick, 600 full)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import numpy as np
    import torch

    from simsearch.spec import Preprocess

    torch.set_num_threads(1)  # as in a DataLoader worker
    n = args.images or (150 if args.quick else 600)
    paths = sorted(replicated_jpegs(max(n, 300)).glob("*.jpg"))[:n]
    pre = Preprocess(mean=(0.498,) * 3, std=(0.502,) * 3)  # EfficientNet-Lite0's
    variants = {k: f for k, f in VARIANTS.items() if k != "simplejpeg" or importlib.util.find_spec("simplejpeg")}
    baseline = [pillow_resize(p, pre)[1].astype(np.float32) for p in paths]
    rows = {k: {"variant": k, "rates": []} for k in VARIANTS}
    if "simplejpeg" not in variants:
        rows["simplejpeg"]["status"] = "skipped: pip install simplejpeg"
    for r in range(args.rounds):
        progress(f"round {r + 1}/{args.rounds}")
        for name, fn in variants.items():
            started = time.perf_counter()
            diffs = []
            for path, base in zip(paths, baseline):
                _, pixels = fn(path, pre)
                if r == 0:
                    diffs.append(np.abs(pixels.astype(np.float32) - base).mean() if pixels.shape == base.shape else np.nan)
            rows[name]["rates"].append(len(paths) / (time.perf_counter() - started))
            if r == 0:
                rows[name]["pixel_diff"] = float(np.nanmean(diffs))
    base_rate = statistics.median(rows["pillow-resize"]["rates"])
    for row in rows.values():
        if row["rates"]:
            row["img_s"] = statistics.median(row["rates"])
            row["vs_before"] = row["img_s"] / base_rate
        del row["rates"]
    notes = [NOISE_NOTE, f"{len(paths)} real JPEGs, one process, one torch thread; median of {args.rounds} rounds"]
    print_table("decode + preprocess: images/s per core", list(rows.values()),
                ["variant", "img_s", "vs_before", "pixel_diff", "status"], notes)
    write_result("decode", {"quick": args.quick, "images": len(paths), "rows": list(rows.values())})


if __name__ == "__main__":
    main()
