"""How the report and the figures name losses, and the published COCO numbers they print beside
the measured ones."""

# Test mAP on COCO 2014 (val2014) with ResNet-50 at 448 px: Cole et al. 2021 (full BCE, AN),
# Zhou et al. 2022 (EM, EM+APL). Printed beside measured values when report.published_coco is set.
PUBLISHED_COCO = {"bce": 76.78, "an": 64.92, "em": 70.70, "em_apl": 70.87}
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
