"""COCO-format data -> FFCV .beton files with the single-positive protocol, and their loaders."""
