"""`pml-dist prepare`: the experiment's `data.*` keys onto the data package's `prepare`, with the
built-in data set generated first when `data.root` does not exist and is meant to be generated
(`data.synthetic`, or the built-in root)."""

from __future__ import annotations

import logging
from pathlib import Path

from pml_dist.config import Config, DataSection
from pml_dist.errors import ConfigError
from pml_dist.layout import RunLayout
from pml_dist.lock import Lock

log = logging.getLogger(__name__)


def prepare(cfg: Config) -> dict:
    """Write `<run>/data/` (or run.data_dir); returns its stats.json."""
    d = cfg.data
    generate = not Path(d.root).exists()
    if generate and not (d.synthetic or Path(d.root) == Path(DataSection().root).resolve()):
        raise ConfigError(f"data.root {d.root} does not exist (to generate the built-in data set "
                          "there, set data.synthetic=true)")
    out = RunLayout.of(cfg)
    # One process prepares a data folder (sub-runs and runs naming one run.data_dir share it)
    with Lock(out.data_lock, f"data folder {out.data.folder}"):  # pml_dist/lock.py
        if generate and not Path(d.root).exists():
            _generate(cfg)
        return _prepare(cfg, out)


def _prepare(cfg: Config, out: RunLayout) -> dict:
    from ffcv_data.prepare import PrepareSpec
    from ffcv_data.prepare import prepare as prepare_data

    d = cfg.data
    spec = PrepareSpec(root=Path(d.root), train_split=d.train_split, test_split=d.test_split,
                       observed_seed=d.observed_seed, val_fraction=d.val_fraction, val_seed=d.val_seed,
                       max_resolution=d.max_resolution, jpeg_quality=d.jpeg_quality,
                       observed_protocol=d.observed_protocol,
                       keep_original_jpegs=d.keep_original_jpegs, write_workers=d.write_workers,
                       format=d.format, images=Path(d.images) if d.images else None,
                       val_split=d.val_split, classes=Path(d.classes) if d.classes else None)
    return prepare_data(spec, out.data)


def _generate(cfg: Config) -> None:
    from ffcv_data.synthetic import make_synthetic

    d = cfg.data
    log.info("data.root %s does not exist: generating the built-in data set there", d.root)
    make_synthetic(d.root, seed=d.synthetic_seed, n_train=d.synthetic_train, n_test=d.synthetic_test,
                   image_size=d.max_resolution, train_split=d.train_split, test_split=d.test_split,
                   num_classes=d.synthetic_classes, layout="csv" if d.format == "csv" else "coco",
                   val_split=d.val_split or "val")
