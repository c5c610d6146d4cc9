"""predict's decode + resize on large JPEGs: at full size (as before) against the evaluation loader's
reduced scale (PIL's Image.draft, pml_dist/use/images.py), and both against the FFCV loader's pixels.

Photo-like JPEGs (quality 90, 4:2:0) of 4000 x 3000 and 1600 x 1200 are generated; per image size
(448, 224) each image is decoded and resized with Classifier.resize both ways, alternating, on one
torch thread (the per-image CPU cost; predict runs one such load per core). The same files are
written into a .beton as they are (max_resolution 4000) and read by ffcv_data.loaders.eval_loader
(transform resize); a randomly initialised small_resnet (seed 0) scores both paths. With --coco, the
images of a folder (coco-mini's val2017) are compared at 224 px too.

    .venv/bin/python bench/bench_predict_decode.py [--repeat 3] [--per-size 3] [--coco DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ffcv_data.synthetic import photo_like

SIZES = ((4000, 3000), (1600, 1200))


def loader_pixels(files: list[Path], size: int, tmp: Path) -> torch.Tensor:
    """The evaluation loader's normalised float32 batch of `files`, stored as they are."""
    import ffcv_data.beton as beton
    from ffcv_data.loaders import eval_loader

    beton.PAGE_SIZE = 1 << 24  # a 4000 x 3000 JPEG is larger than the default 2 MiB page
    path = beton.write_beton(tmp / f"b{size}-{len(files)}.beton", files, max_resolution=4000,
                             jpeg_quality=90, workers=2)
    return torch.cat([b["image"].clone() for b in eval_loader(path, 16, size, transform="resize", jit=False,
                                                              label_fields=())])


def compare(files: list[Path], size: int, net, tmp: Path) -> dict[str, tuple[float, float, float]]:
    """max |dp|, mean |dp| and mean |pixel| difference (levels of 255) against the loader, per way."""
    from ffcv_data.transforms import MEAN, STD
    from pml_dist.use.classifier import Classifier
    from pml_dist.use.images import decode

    classifier = Classifier(net, size).eval()
    x = loader_pixels(files, size, tmp)
    with torch.no_grad():
        theirs = torch.sigmoid(net(x))
        levels = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
        out = {}
        for way, cover in (("full size (before)", 0), ("loader scale (after)", size)):
            pixels = torch.stack([classifier.resize(decode(f, cover)[None])[0] for f in files])
            dp = (classifier(pixels) - theirs).abs()
            out[way] = (dp.max().item(), dp.mean().item(), (pixels * 255 - levels).abs().mean().item())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--per-size", type=int, default=3, help="generated images per size")
    parser.add_argument("--coco", type=Path, default=None, help="a folder of real JPEGs (coco-mini/val2017)")
    args = parser.parse_args()

    from PIL import Image

    from ffcv_data.decode_scale import scale_denominator
    from pml_dist.training.models import build_model
    from pml_dist.use.classifier import Classifier, plain_head
    from pml_dist.use.images import decode

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = plain_head(build_model("small_resnet", 20)).eval()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        groups: dict[tuple[int, int], list[Path]] = {}
        for w, h in SIZES:
            groups[(w, h)] = []
            for k in range(args.per_size):
                path = tmp / f"{w}x{h}-{k}.jpg"
                Image.fromarray(photo_like(w, h, seed=k)).save(path, quality=90)
                groups[(w, h)].append(path)
        print(f"{args.per_size} photo-like JPEGs per size, quality 90; torch threads 1; "
              f"median of {args.repeat} passes, per image")
        for size in (448, 224):
            resize = Classifier(net, size).resize
            for (w, h), files in groups.items():
                d = scale_denominator(h, w, size, size, 8)
                times: dict[str, list[float]] = {"before": [], "after": []}
                for _ in range(args.repeat):
                    for way, cover in (("before", 0), ("after", size)):  # alternating, one pass each
                        start = time.perf_counter()
                        for f in files:
                            resize(decode(f, cover)[None])
                        times[way].append((time.perf_counter() - start) / len(files))
                before, after = statistics.median(times["before"]), statistics.median(times["after"])
                ratios = [b / a for b, a in zip(times["before"], times["after"], strict=True)]
                print(f"{w}x{h} -> {size}: 1/{d}; decode+resize {before * 1e3:7.1f} ms -> "
                      f"{after * 1e3:6.1f} ms"
                      f"  ({statistics.median(ratios):.1f}x, passes {min(ratios):.1f}-{max(ratios):.1f}x)")
        print("against the FFCV loader (random small_resnet, 20 classes): max |dp|, mean |dp|, "
              "mean |pixel| /255")
        for size in (448, 224):
            files = [f for group in groups.values() for f in group]
            for way, (mx, mean, pix) in compare(files, size, net, tmp).items():
                print(f"  generated, {size} px, {way:20s}: {mx:.5f}  {mean:.6f}  {pix:.3f}")
        if args.coco is not None:
            files = sorted(args.coco.glob("*.jpg"))
            ds = [scale_denominator(*Image.open(f).size[::-1], 224, 224, 8) for f in files]
            print(f"  {args.coco} ({len(files)} images, {ds.count(2)} at 1/2, {ds.count(1)} at full size), "
                  "224 px:")
            for way, (mx, mean, pix) in compare(files, 224, net, tmp).items():
                print(f"    {way:20s}: {mx:.5f}  {mean:.6f}  {pix:.3f}")


if __name__ == "__main__":
    main()
