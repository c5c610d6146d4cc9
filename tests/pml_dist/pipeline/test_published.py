"""report.published: the published test mAPs of the chosen data set beside the measured rows, and the
best known result on its own line."""

from __future__ import annotations

from pml_dist.config import PUBLISHED_DATA_SETS, load_config
from pml_dist.pipeline.names import PUBLISHED, published_record
from pml_dist.pipeline.report import markdown


def test_every_published_data_set_has_its_numbers():
    assert set(PUBLISHED) == set(PUBLISHED_DATA_SETS)
    # what the report printed for COCO before the table had other data sets
    assert {k: PUBLISHED["coco"][k] for k in ("bce", "an", "em", "em_apl")} == {
        "bce": 76.78, "an": 64.92, "em": 70.70, "em_apl": 70.87}
    assert published_record("") is None
    assert published_record(load_config(None, ["report.published=voc"]).report.published) == {
        "data_set": "voc", "mAP": {"bce": 89.42, "an": 85.89, "em": 89.09, "em_apl": 89.19, "ll_r": 89.2},
        "best_known": {"name": "AEVLP (ICCV 2025)", "mAP": 90.46}}


def _report(published: dict | None) -> dict:
    row = {"id": "teacher", "chain": "an", "round": 1, "kind": "teacher", "name": "AN teacher", "loss": "an",
           "test_map": 60.0, "val_map": 61.0, "positives": None, "train_seconds": 10.0}
    ref = {**row, "id": "references/ll_ct", "kind": "reference", "name": "reference LL-Ct", "loss": "ll_ct"}
    return {"data_root": "/data", "seeds": [0], "observed_seed": 1200, "git": "abc", "rows": [row, ref],
            "true_labels_per_image": None, "classes_left_out": {}, "findings": [], "model_selection": [],
            "stages": {}, "published": published}


def test_the_report_prints_them_beside_the_rows_and_the_best_known_apart():
    md = markdown(_report(published_record("coco")))
    assert "| AN teacher | 60.00 (published 64.92) |" in md
    assert "| reference LL-Ct | 60.00 |" in md  # no published number for that loss
    assert ("Published COCO test mAP (Zhou et al. 2022; LL-R: Kim et al. 2022): full BCE 76.78, AN 64.92, "
            "EM 70.7, EM+APL 70.87, LL-R 71.0\n\nbest known: AEVLP (ICCV 2025) 73.54\n") in md
    assert "published" not in markdown(_report(None)).lower()
