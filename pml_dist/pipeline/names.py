"""How the report and the figures name losses and data sets, and the published numbers they print
beside the measured ones."""

# Published test mAP (%) of this project's losses in the single-positive setting, by data set
# (report.published, config.PUBLISHED_DATA_SETS: VOC 2012, COCO 2014, NUS-WIDE, CUB-200-2011), printed
# beside the measured values of the teacher and reference rows training that loss.
#   bce, an       Zhou et al. 2022 (ECCV, "Acknowledging the Unknown for Multi-label Learning with
#                 Single Positive Labels"; ResNet-50 at 448 px): their own runs of full-label BCE and
#                 of Cole et al. 2021's AN (Cole et al.'s own table has AN 64.1 and full 78.0 on COCO:
#                 docs/protocol.md)
#   em, em_apl    Zhou et al. 2022, the same table
#   ll_r          Kim et al. 2022 (CVPR, "Large Loss Matters in Weakly Supervised Multi-Label
#                 Classification"), single positive labels
PUBLISHED = {
    "voc": {"bce": 89.42, "an": 85.89, "em": 89.09, "em_apl": 89.19, "ll_r": 89.2},
    "coco": {"bce": 76.78, "an": 64.92, "em": 70.70, "em_apl": 70.87, "ll_r": 71.0},
    "nuswide": {"bce": 52.08, "an": 42.27, "em": 47.15, "em_apl": 47.59, "ll_r": 47.4},
    "cub": {"bce": 30.90, "an": 18.31, "em": 20.85, "em_apl": 21.84, "ll_r": 19.5},
}
# The best known single-positive result per data set: a method, not a loss of this project, so it is
# printed on its own line ("best known: ...") and never beside a measured row.
BEST_KNOWN_NAME = "AEVLP (ICCV 2025)"
BEST_KNOWN = {"voc": 90.46, "coco": 73.54, "nuswide": 50.70, "cub": 24.89}
DATA_SET_LABELS = {"voc": "VOC", "coco": "COCO", "nuswide": "NUS-WIDE", "cub": "CUB"}
LOSS_LABELS = {
    "an": "AN",
    "bce": "full BCE",
    "em": "EM",
    "an_ls": "AN-LS",
    "wan": "WAN",
    "epr": "EPR",
    "role": "ROLE",
    "em_apl": "EM+APL",
    "ll_r": "LL-R",
    "ll_ct": "LL-Ct",
}


def loss_label(loss: str) -> str:
    return LOSS_LABELS.get(loss, loss)


def published_record(data_set: str) -> dict | None:
    """The report's `published` record for report.published ("" = None): the data set, the published
    mAP per loss and the best known result."""
    if not data_set:
        return None
    return {"data_set": data_set, "mAP": dict(PUBLISHED[data_set]),
            "best_known": {"name": BEST_KNOWN_NAME, "mAP": BEST_KNOWN[data_set]}}
