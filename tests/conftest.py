"""Shared fixtures. Real files only: the generated data set and ../shared/data/coco-mini."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# CI and developers have ../shared beside the checkout; users of the project do not.
SHARED = Path(os.environ.get("PML_DIST_SHARED", REPO.parent / "shared"))
COCO_MINI = SHARED / "data" / "coco-mini"


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    if not (COCO_MINI / "annotations" / "instances_train2017.json").is_file():
        pytest.skip(f"real COCO files not found at {COCO_MINI} (../shared is only on CI and dev machines)")
    return COCO_MINI


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small generated COCO-format data set, shared by the tests that only read it."""
    from ffcv_data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synthetic") / "coco"
    make_synthetic(root, seed=0, n_train=150, n_test=50, image_size=48)
    return root


@pytest.fixture
def coco_mini_overrides(coco_mini, tmp_path) -> list[str]:
    """Overrides that point the demo preset at coco-mini, with a fresh run directory."""
    return [
        f"run.dir={tmp_path / 'run'}",
        f"data.root={coco_mini}",
        "data.train_split=train2017",
        "data.test_split=val2017",
        "data.max_resolution=96",
        "data.write_workers=2",
    ]


@pytest.fixture
def synthetic_overrides(synthetic_root, tmp_path) -> list[str]:
    return [f"run.dir={tmp_path / 'run'}", f"data.root={synthetic_root}", "data.max_resolution=48",
            "data.image_size=48", "data.write_workers=2"]
