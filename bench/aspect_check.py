"""A red circle in a non-square scene recoloured by the shipped model: the blue circle's bounding-box aspect ratio,
edited at the aspect-ratio bucket (the engine) and stretched to a square and back (the engine before schema 4).

    python bench/aspect_check.py
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

import diffedit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_fidelity import _bbox_aspect, _circle  # noqa: E402

SOURCE, TARGET, BLUE = "a red circle on a beige background", "a blue circle on a beige background", (35, 75, 220)


def main() -> None:
    editor = diffedit.load(device="cpu")
    for w, h in [(128, 64), (64, 128)]:
        image, bucket, stretched = _circle(w, h, 14), [], []
        for seed in range(3):
            r = editor.edit([image], SOURCE, TARGET, seed=seed)[0]
            bucket.append(round(_bbox_aspect(np.asarray(r.image), BLUE), 3))
            square = editor.edit([image.resize((64, 64), Image.Resampling.BICUBIC)], SOURCE, TARGET, seed=seed)[0]
            back = square.image.resize((w, h), Image.Resampling.BICUBIC)
            stretched.append(round(_bbox_aspect(np.asarray(back), BLUE), 3))
        print(f"{w}x{h}: bucket {bucket}, stretched {stretched}")


if __name__ == "__main__":
    main()
