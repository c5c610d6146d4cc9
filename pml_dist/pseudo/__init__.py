"""Teacher probabilities -> pseudo multi-labels: sharded inference (infer.py, shards.py), the verified
merge (merge.py), the targets (labels.py) and the `pml-dist merge` stage (make.py)."""
