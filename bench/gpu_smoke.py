"""After an offline install (bench/gpu.sh step 1): FFCV imports, a .beton is written and decoded
back with the project's own writer and loader, on whatever the installed environment is.

    python bench/gpu_smoke.py SCRATCH_DIR
"""

import sys
from pathlib import Path

import ffcv  # noqa: F401  (the import is the first check: its C extension and bundled libraries)
import numpy as np
from PIL import Image

from ffcv_data.beton import write_beton
from ffcv_data.loaders import eval_loader
from ffcv_data.prepared import labels_beside, write_split_labels
from ffcv_data.sparse import LabelRows

scratch = Path(sys.argv[1])
scratch.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
files = []
for i in range(4):
    path = scratch / f"image-{i}.jpg"
    Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8)).save(path, quality=95)
    files.append(path)
labels = np.eye(4, dtype=np.uint8)
beton = write_beton(scratch / "smoke.beton", files, max_resolution=64, jpeg_quality=95, workers=1)
write_split_labels(labels_beside(beton), np.arange(4), LabelRows.from_dense(labels), np.arange(4),
                   [f.name for f in files])
batch = next(iter(eval_loader(beton, 4, 32, workers=1, jit=False)))
assert tuple(batch["image"].shape) == (4, 3, 32, 32), batch["image"].shape
assert np.array_equal(batch["labels"].numpy(), labels)
print(f"ffcv {ffcv.__file__}: wrote and decoded {beton} ({beton.stat().st_size} bytes), "
      f"images {tuple(batch['image'].shape)}")
