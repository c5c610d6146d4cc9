"""Fixtures of the loader tests."""

from __future__ import annotations

import pytest

from pml_dist.config import load_config
from pml_dist.data_stage import prepare
from pml_dist.layout import RunLayout


@pytest.fixture(scope="session")
def betons(synthetic_root, tmp_path_factory) -> dict:
    """The generated set's three splits as .beton files (48 px images, stored at full size)."""
    run = tmp_path_factory.mktemp("loaders")
    cfg = load_config(None, [f"run.dir={run}", f"data.root={synthetic_root}", "data.max_resolution=48",
                             "data.write_workers=2"])
    prepare(cfg)
    return {split: RunLayout.of(cfg).data.beton(split) for split in ("train", "val", "test")}

