"""The data package: COCO-format data (real or generated) -> FFCV .beton files with the
single-positive protocol, and their loaders. Imports nothing of pml_dist (docs/architecture.md)."""
