"""Loader throughput: the training pipeline read from a `.beton` by `ffcv_data.loaders.train_loader`,
against torchvision's DataLoader over the same JPEG files, and against the limit.

Per data set (coco-mini repeated to about --samples training images; the generated set) and per
preset (the COCO preset's and the demo's data.train_transform, data.image_size and data.jit, read
from configs/*.yaml), all batch 64, normalised float32 NCHW output, --workers threads or processes:

    ffcv         train_loader over the train .beton that `pml-dist prepare` wrote (the preset's jit)
    ffcv jit on  the same with numba compilation, where the preset has it off (without it FFCV
                 decodes a batch's images one after another on one thread)
    pil          torch DataLoader, PIL decode + torchvision.transforms.v2 (Resize, flip, ToDtype,
                 Normalize), --workers worker processes
    decode_jpeg  the same with torchvision.io.decode_jpeg instead of PIL
    limit        the same JPEG bytes, already in memory, through the same decode (libjpeg-turbo, at the
                 same reduced scale) and resize (OpenCV INTER_AREA) in a tight numba loop on
                 --workers threads: nothing else (no flip, no float conversion, no other fields)
    limit+float  the limit, then the loader's normalisation to float32 NCHW: at 448 px writing the
                 float output costs more than decoding a small image

Each variant is warmed up (numba compilation, worker start), then timed --repeats times, the
variants alternated A/B/C/D/E, A/B/C/D/E in this one process. Goals (issue 16): ffcv >= 3x pil and
ffcv >= 80% of the limit; printed with PASS / BELOW, not asserted.

    .venv/bin/python bench/bench_loader.py [--samples 640] [--repeats 3] [--workers 0] [--image-size 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

# FFCV's writer draws progress bars on stderr; tqdm reads this when it is first imported.
os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/bench_loader.py` puts bench/ first, not the repository
    sys.path.insert(0, str(REPO))

from ffcv_data.cores import usable_cores  # noqa: E402
from ffcv_data.loaders import MEAN, STD  # noqa: E402

SHARED = Path(os.environ.get("PML_DIST_SHARED", REPO.parent / "shared"))
COCO_MINI = SHARED / "data" / "coco-mini"
PRESETS = {"coco": REPO / "configs" / "coco2014_r50.yaml", "demo": REPO / "configs" / "demo.yaml"}
BATCH = 64
GOAL_PIL, GOAL_LIMIT = 3.0, 0.80


@dataclass(frozen=True)
class Pipeline:
    """The training image pipeline of one preset (its data.* keys, image size possibly overridden)."""

    preset: str
    transform: str  # data.train_transform
    image_size: int
    jit: bool

    @property
    def flip(self) -> bool:
        return self.transform == "resize_flip"

    def describe(self) -> str:
        return f"{self.preset}: {self.transform} {self.image_size} px, jit {'on' if self.jit else 'off'}"


def pipelines(names: list[str], image_size: int, jit: str) -> list[Pipeline]:
    from pml_dist.config import load_config

    out = []
    for name in names:
        d = load_config(PRESETS[name], ["train.device=cpu"]).data
        if d.train_transform not in ("resize", "resize_flip"):
            raise SystemExit(f"bench_loader: preset {name}: data.train_transform={d.train_transform} has no "
                             "torchvision counterpart here (resize and resize_flip do)")
        out.append(Pipeline(name, d.train_transform, image_size or d.image_size,
                            d.jit if jit == "preset" else jit == "on"))
    return out


# ------------------------------------------------------------------------------------------ data sets
@dataclass
class DataSet:
    name: str
    beton: Path  # the train split's .beton
    files: list[Path]  # the JPEG files of its records, in record order
    distinct: int  # distinct images among them
    beton_bytes: int  # all three .beton files
    jpeg_bytes: int  # all the JPEG files they were prepared from (train and test splits)


def _prepare(preset: str, run_dir: Path, overrides: list[str]) -> Path:
    """What `pml-dist prepare --config <preset> run.dir=<run_dir> <overrides>` does; returns the
    prepared data folder."""
    from pml_dist.config import load_config
    from pml_dist.data_stage import prepare
    from pml_dist.layout import RunLayout

    cfg = load_config(PRESETS[preset], ["train.device=cpu", f"run.dir={run_dir}", *overrides])
    prepare(cfg)
    return RunLayout.of(cfg).data.folder


def _dataset(name: str, root: Path, data: Path, train_split: str, test_split: str) -> DataSet:
    from ffcv_data.coco import read_split
    from ffcv_data.prepared import PreparedData

    prepared = PreparedData(data)
    train = read_split(root, train_split)
    test = read_split(root, test_split)
    file_of = dict(zip(train.keys.tolist(), train.files, strict=True))
    files = [file_of[i] for i in prepared.labels("train").keys.tolist()]
    distinct = len({os.path.realpath(f) for f in files})
    betons = sum(prepared.beton(s).stat().st_size for s in ("train", "val", "test"))
    jpegs = sum(f.stat().st_size for f in [*train.files, *test.files])
    return DataSet(name, prepared.beton("train"), files, distinct, betons, jpegs)


def repeated_coco_root(src: Path, dst: Path, split: str, copies: int) -> None:
    """A COCO root whose `split` lists every image of `src` `copies` times (symbolic links to the
    same files, new image and annotation ids); the other splits are linked as they are."""
    ann = json.loads((src / "annotations" / f"instances_{split}.json").read_text())
    (dst / "annotations").mkdir(parents=True)
    (dst / split).mkdir()
    step = max(img["id"] for img in ann["images"]) + 1
    ann_step = max((a["id"] for a in ann["annotations"]), default=0) + 1
    images, annotations = [], []
    for c in range(copies):
        for img in ann["images"]:
            name = f"r{c:03d}_{img['file_name']}"
            (dst / split / name).symlink_to(src / split / img["file_name"])
            images.append({**img, "id": img["id"] + c * step, "file_name": name})
        annotations += [{**a, "id": a["id"] + c * ann_step, "image_id": a["image_id"] + c * step}
                        for a in ann["annotations"]]
    (dst / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({**ann, "images": images, "annotations": annotations}))
    for other in sorted((src / "annotations").glob("instances_*.json")):
        other_split = other.stem.removeprefix("instances_")
        if other_split != split:
            (dst / "annotations" / other.name).symlink_to(other)
            (dst / other_split).symlink_to(src / other_split)


def coco_mini(root: Path, tmp: Path, samples: int, workers: int) -> DataSet:
    from pml_dist.config import load_config

    root = root.resolve()  # the links point here
    d = load_config(PRESETS["coco"], ["train.device=cpu"]).data
    n = len(json.loads((root / "annotations" / "instances_train2017.json").read_text())["images"])
    copies = max(1, math.ceil(samples / (n * (1 - d.val_fraction))))
    repeated = tmp / "coco-mini-repeated"
    repeated_coco_root(root, repeated, "train2017", copies)
    data = _prepare("coco", tmp / "run-coco-mini", [
        f"data.root={repeated}", "data.train_split=train2017", "data.test_split=val2017",
        f"data.write_workers={workers}"])
    return _dataset("coco-mini", repeated, data, "train2017", "val2017")


def synthetic(tmp: Path, samples: int, workers: int) -> DataSet:
    from ffcv_data.synthetic import make_synthetic
    from pml_dist.config import load_config

    d = load_config(PRESETS["demo"], ["train.device=cpu"]).data
    root = tmp / "synthetic"
    make_synthetic(root, seed=d.synthetic_seed, n_train=math.ceil(samples / (1 - d.val_fraction)),
                   n_test=BATCH, image_size=d.max_resolution, train_split=d.train_split,
                   test_split=d.test_split)
    data = _prepare("demo", tmp / "run-synthetic", [f"data.root={root}", f"data.write_workers={workers}"])
    return _dataset("generated", root, data, d.train_split, d.test_split)


# ------------------------------------------------------------------------------------------- variants
class FilesDataset:
    """torch Dataset over JPEG files: (normalised float32 CHW image, index)."""

    def __init__(self, files: list[Path], pipe: Pipeline, decoder: str):
        import torch
        from torchvision.transforms import v2

        self.files = [str(f) for f in files]
        self.decoder = decoder
        size = (pipe.image_size, pipe.image_size)
        flip = [v2.RandomHorizontalFlip(0.5)] if pipe.flip else []
        tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize([m / 255 for m in MEAN],
                                                                    [s / 255 for s in STD])]
        if decoder == "pil":  # resize and flip the PIL image (uint8), then to a tensor
            self.transform = v2.Compose([v2.Resize(size, antialias=True), *flip, v2.ToImage(), *tail])
        else:
            self.transform = v2.Compose([v2.Resize(size, antialias=True), *flip, *tail])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        if self.decoder == "pil":
            from PIL import Image

            with Image.open(self.files[i]) as img:
                image = img.convert("RGB")
        else:
            from torchvision.io import ImageReadMode, decode_jpeg, read_file

            image = decode_jpeg(read_file(self.files[i]), mode=ImageReadMode.RGB)
        return self.transform(image), i


class Runner:
    """One variant: `run(n)` produces about n samples, returns how many it produced."""

    def __init__(self, name: str):
        self.name = name

    def run(self, n: int) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


class FfcvRunner(Runner):
    def __init__(self, data: DataSet, pipe: Pipeline, workers: int, name: str = "ffcv"):
        from ffcv_data.loaders import train_loader

        super().__init__(name)
        self.loader = train_loader(data.beton, BATCH, pipe.image_size, transform=pipe.transform,
                                   workers=workers, jit=pipe.jit, drop_last=False)
        self.jit = pipe.jit
        self.epoch = 0

    def run(self, n: int) -> int:
        from ffcv.pipeline.compiler import Compiler

        Compiler.set_enabled(self.jit)  # a class-wide switch another loader of this process may have set
        done = 0
        while done < n:  # whole epochs (a repetition is one): no half-drained loader
            self.loader.set_epoch(self.epoch)
            self.epoch += 1
            for batch in self.loader:
                done += batch["image"].shape[0]
        return done


class TorchRunner(Runner):
    def __init__(self, data: DataSet, pipe: Pipeline, workers: int, decoder: str):
        import torch

        super().__init__(decoder)
        self.dataset = FilesDataset(data.files, pipe, decoder)
        # forkserver: workers forked from this process would share its FFCV buffers copy-on-write, and
        # the next FFCV pass would fault on every page of them (it ran at a fifth of its rate)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=BATCH, shuffle=True, num_workers=workers, persistent_workers=True,
            drop_last=False, multiprocessing_context="forkserver" if workers else None)

    def run(self, n: int) -> int:
        done = 0
        while done < n:
            for images, _ in self.loader:
                done += images.shape[0]
        return done

    def close(self) -> None:
        del self.loader  # stops the persistent workers


def _limit_kernel():
    from ffcv.libffcv import imdecode, resize_crop
    from numba import njit, prange

    from ffcv_data.whole_image import MAX_DENOMINATOR, scale_denominator

    imdecode_c, resize_c = njit(imdecode, nogil=True), njit(resize_crop, nogil=True)

    @njit(nogil=True, parallel=True)
    def decode_resize(data, offsets, heights, widths, order, temp, out, table, normalised):
        """The loader's decode (at the same reduced scale) and resize, on bytes in memory, batch by
        batch, through FFCV's own ctypes wrappers of libffcv; with normalised of shape (batch, 3, size,
        size) also the loader's normalisation into it (a table lookup, whole_image.py's)."""
        batch, size = out.shape[0], out.shape[1]
        for start in range(0, len(order), batch):
            count = min(batch, len(order) - start)
            for k in prange(count):
                i = order[start + k]
                h, w = heights[i], widths[i]
                d = scale_denominator(h, w, size, size, MAX_DENOMINATOR)
                sh, sw = (h + d - 1) // d, (w + d - 1) // d
                buf = temp[k][: 3 * sh * sw].reshape(sh, sw, 3)
                imdecode_c(data[offsets[i]:offsets[i + 1]], buf, h, w, h, w, 0, 0, 1, d, False, False)
                resize_c(buf, 0, sh, 0, sw, out[k])
                if normalised.shape[0]:  # in the loader kernel's loop order (row by row)
                    for y in range(size):
                        row = out[k, y]
                        for c in range(3):
                            lookup, dst = table[c], normalised[k, c, y]
                            for x in range(size):
                                dst[x] = lookup[row[x, c]]
        return len(order)

    return decode_resize


class LimitRunner(Runner):
    def __init__(self, data: DataSet, pipe: Pipeline, workers: int, kernel, normalise: bool = False):
        from PIL import Image

        from ffcv_data.whole_image import normalisation_table

        super().__init__("limit+float" if normalise else "limit")
        unique = sorted({os.path.realpath(f) for f in data.files})
        slot = {f: k for k, f in enumerate(unique)}
        blobs = [np.fromfile(f, dtype=np.uint8) for f in unique]
        self.data = np.concatenate(blobs)
        self.offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        sizes = []
        for f in unique:
            with Image.open(f) as img:
                sizes.append(img.size)
        self.widths = np.array([s[0] for s in sizes], dtype=np.int64)
        self.heights = np.array([s[1] for s in sizes], dtype=np.int64)
        self.records = np.array([slot[os.path.realpath(f)] for f in data.files], dtype=np.int64)
        self.temp = np.empty((BATCH, int((self.heights * self.widths).max()) * 3), dtype=np.uint8)
        self.out = np.empty((BATCH, pipe.image_size, pipe.image_size, 3), dtype=np.uint8)
        self.table = normalisation_table(MEAN, STD)
        self.normalised = np.empty((BATCH if normalise else 0, 3, pipe.image_size, pipe.image_size),
                                   dtype=np.float32)
        self.workers, self.kernel = workers, kernel
        self.rng = np.random.default_rng(0)

    def run(self, n: int) -> int:
        import numba

        numba.set_num_threads(self.workers)
        done = 0
        while done < n:
            order = self.records[self.rng.permutation(len(self.records))]
            done += self.kernel(self.data, self.offsets, self.heights, self.widths, order, self.temp,
                                self.out, self.table, self.normalised)
        return done


# ------------------------------------------------------------------------------------------- measuring
def measure(runners: list[Runner], samples: int, repeats: int) -> dict[str, list[float]]:
    """samples/s of every runner, `repeats` times, alternated, after one untimed pass each (numba
    compilation, worker start; whole passes, so no loader is left half-drained)."""
    for r in runners:
        t0 = time.perf_counter()
        r.run(samples)
        print(f"    warm-up {r.name:<12} {time.perf_counter() - t0:6.1f} s", flush=True)
    rates: dict[str, list[float]] = {r.name: [] for r in runners}
    for _ in range(repeats):
        for r in runners:
            t0 = time.perf_counter()
            done = r.run(samples)
            rates[r.name].append(done / (time.perf_counter() - t0))
    return rates


def mark(ok: bool) -> str:
    return "PASS" if ok else "BELOW"


def report(data: DataSet, pipe: Pipeline, rates: dict[str, list[float]], workers: int) -> None:
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n{data.name}  [{pipe.describe()}]  batch {BATCH}, {workers} workers, "
          f"{len(data.files)} samples per repetition ({data.distinct} distinct images), "
          f"{len(next(iter(rates.values())))} repetitions")
    print(f"  {'variant':<12} {'samples/s':>10} {'min':>8} {'max':>8} {'spread':>7}")
    for name, values in rates.items():
        spread = (max(values) - min(values)) / med[name] if med[name] else 0.0
        print(f"  {name:<12} {med[name]:10.0f} {min(values):8.0f} {max(values):8.0f} {spread:6.0%}")
    print("  (limit: decode + resize of the same JPEG bytes from memory, uint8, nothing else;\n"
          "   limit+float: the same, then normalised into float32 NCHW as the loader does)")
    pil, dj, lim = med["ffcv"] / med["pil"], med["ffcv"] / med["decode_jpeg"], med["ffcv"] / med["limit"]
    where = f"[{data.name}, {pipe.describe()}]"
    print(f"ffcv vs pil {pil:.1f}x  {mark(pil >= GOAL_PIL)} (goal >= {GOAL_PIL:.0f}x)  {where}")
    print(f"ffcv vs decode_jpeg {dj:.1f}x  {where}")
    print(f"ffcv / limit {lim:.0%}  {mark(lim >= GOAL_LIMIT)} (goal >= {GOAL_LIMIT:.0%})  {where}")
    # what bounds the two ratios above: the limit's own lead over PIL, and the float output's cost
    print(f"limit vs pil {med['limit'] / med['pil']:.1f}x, ffcv / limit+float "
          f"{med['ffcv'] / med['limit+float']:.0%}  {where}", flush=True)


def _quiet_numba_finalizers(hook=sys.unraisablehook) -> None:
    """numba's dispatcher finalizers raise KeyError at exit after FFCV switched its compiler on and
    off (harmless; setup.cfg filters the same in pytest): keep them off the output."""
    import traceback

    def unraisable(info):
        frames = traceback.extract_tb(info.exc_traceback) if info.exc_traceback else []
        if not (isinstance(info.exc_value, KeyError) and any("numba" in f.filename for f in frames)):
            hook(info)

    sys.unraisablehook = unraisable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=640,
                        help="training samples per repetition (coco-mini is repeated to about this many)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per variant")
    parser.add_argument("--workers", type=int, default=0, help="threads / worker processes; 0 = usable cores")
    parser.add_argument("--image-size", type=int, default=0, help="output side for every preset; 0 = each "
                        "preset's data.image_size")
    parser.add_argument("--presets", default="coco,demo", help="comma-separated: coco, demo")
    parser.add_argument("--datasets", default="coco-mini,generated", help="comma-separated: coco-mini, "
                        "generated")
    parser.add_argument("--coco-root", type=Path, default=COCO_MINI)
    parser.add_argument("--jit", choices=("preset", "on", "off"), default="preset",
                        help="FFCV's numba compilation: as the preset says, or forced")
    args = parser.parse_args(argv)
    _quiet_numba_finalizers()
    workers = args.workers or usable_cores()
    t_start = time.perf_counter()
    pipes = pipelines([p for p in args.presets.split(",") if p], args.image_size, args.jit)
    import torch  # noqa: F401  (imported before the data sets are built: its import time is not theirs)

    kernel = None
    print(f"bench_loader: {workers} workers on {usable_cores()} usable cores, batch {BATCH}, "
          f"{args.repeats} repetitions of about {args.samples} samples, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_loader-") as tmp_name:
        tmp = Path(tmp_name)
        for name in [n for n in args.datasets.split(",") if n]:
            t0 = time.perf_counter()
            if name == "coco-mini":
                if not (args.coco_root / "annotations" / "instances_train2017.json").is_file():
                    print(f"\ncoco-mini: skipped, no COCO files at {args.coco_root} "
                          "(annotations/instances_train2017.json not found)")
                    continue
                data = coco_mini(args.coco_root, tmp, args.samples, workers)
            elif name == "generated":
                data = synthetic(tmp, args.samples, workers)
            else:
                raise SystemExit(f"bench_loader: unknown data set {name!r} (coco-mini, generated)")
            print(f"\n{data.name}: prepared in {time.perf_counter() - t0:.1f} s; .beton files "
                  f"{data.beton_bytes / 2**20:.1f} MiB vs the JPEG files {data.jpeg_bytes / 2**20:.1f} MiB: "
                  f".beton / JPEG {data.beton_bytes / data.jpeg_bytes:.2f}x", flush=True)
            if data.beton_bytes > 1.5 * data.jpeg_bytes:
                print("  (a small set: the writer's 2 MiB pages, per worker and file, dominate its size)")
            for pipe in pipes:
                kernel = kernel or _limit_kernel()
                runners = [FfcvRunner(data, pipe, workers), TorchRunner(data, pipe, workers, "pil"),
                           TorchRunner(data, pipe, workers, "decode_jpeg"),
                           LimitRunner(data, pipe, workers, kernel),
                           LimitRunner(data, pipe, workers, kernel, normalise=True)]
                if not pipe.jit and args.jit == "preset":  # what the preset's jit: false costs
                    runners.insert(1, FfcvRunner(data, replace(pipe, jit=True), workers, "ffcv jit on"))
                try:
                    rates = measure(runners, len(data.files), args.repeats)
                finally:
                    for r in runners:
                        r.close()
                report(data, pipe, rates, workers)
    print(f"\nbench_loader: done in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
