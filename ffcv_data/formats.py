"""`data.format` -> the reader of that layout: one module per format, each with
`read_split(root, split, images=None) -> SourceSplit` (source.py); csv's also takes `classes` (its
class list: csv_lists.py). Another format is one new module and one line here."""

from __future__ import annotations

import importlib
from pathlib import Path

from ffcv_data.source import SourceSplit

# format -> (module, what data.root holds), for the reader and for error messages
FORMATS = {
    "coco": ("ffcv_data.coco", "annotations/instances_<split>.json and <split>/*.jpg"),
    "voc": ("ffcv_data.voc", "VOCdevkit/VOC2012/ (ImageSets/Main/<class>_<split>.txt, JPEGImages/)"),
    "cub": ("ffcv_data.cub", "attributes.txt and CUB_200_2011/ (images.txt, train_test_split.txt, "
                             "attributes/image_attribute_labels.txt, images/)"),
    "cole": ("ffcv_data.cole", "formatted_<split>_images.npy and formatted_<split>_labels.npy"),
    "openimages": ("ffcv_data.openimages", "*<split>-annotations-human-imagelabels.csv, *class-descriptions"
                                           ".csv [, *classes-trainable.txt] and <split>/*.jpg"),
    "csv": ("ffcv_data.csv_lists", "<split>.csv (file,label or file,labels) and the images it names"),
}


def read_split(fmt: str, root: str | Path, split: str, images: str | Path | None = None,
               classes=None) -> SourceSplit:
    """`classes` (csv only): a class-list file or the training split's class names."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r} (known: {', '.join(FORMATS)})")
    reader = importlib.import_module(FORMATS[fmt][0])
    images = Path(images) if images else None
    if classes is None:
        return reader.read_split(Path(root), split, images)
    if fmt != "csv":
        raise ValueError(f"a class list is read for data.format csv only, not {fmt!r}")
    return reader.read_split(Path(root), split, images, classes=classes)
