"""Using a trained stage outside the pipeline: `pml-dist predict` (score image files) and
`pml-dist export` (a self-contained folder: the scripted classifier, its classes and thresholds)."""
