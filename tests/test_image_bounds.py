"""Work per image is bounded by the model input, not by the image's long side squared:
Letterbox shrinks a long image before padding it to a square (a 1x100000 rgb8 image,
300 KB, used to pad to 30 GB). Peak memory is measured in a fresh process."""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from refvlm_core.geometry import CLIP_MEAN_RGB, MAX_PAD_SIDE, Letterbox

PEAK_SCRIPT = """
import resource, sys
import numpy as np
from refvlm_core.geometry import CLIP_MEAN_RGB, Letterbox
h, w = int(sys.argv[1]), int(sys.argv[2])
image = np.full((h, w, 3), 200, np.uint8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = Letterbox.fit(h, w, 128).image_to_model(image, CLIP_MEAN_RGB)
assert out.shape == (128, 128, 3)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def peak_mb(height: int, width: int) -> float:
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(height), str(width)],
                         capture_output=True, text=True, timeout=120, check=True)
    return float(out.stdout.strip())


def test_a_long_thin_image_costs_megabytes_not_gigabytes():
    assert peak_mb(1, 12_000) < 60          # padded first: +411 MB
    assert peak_mb(600, 12_000) < 120       # the 21 MB image itself, not its 432 MB square


def test_a_shrunk_long_image_lands_where_the_letterbox_says():
    h, w, size = 300, 6000, 128
    assert max(h, w) > MAX_PAD_SIDE
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2] = 255                # left half white
    lb = Letterbox.fit(h, w, size)
    out = lb.image_to_model(image, CLIP_MEAN_RGB).astype(int)
    top, bottom = int(np.ceil(lb.pad_y)), int(lb.pad_y + h * lb.scale)
    assert (out[: int(lb.pad_y) - 1] == CLIP_MEAN_RGB).all()          # padding above
    assert (out[top:bottom, : size // 2 - 1] == 255).all()            # white half
    assert (out[top:bottom, size // 2 + 1:] == 0).all()               # black half
    small = Letterbox.fit(h // 10, w // 10, size).image_to_model(image[::10, ::10], CLIP_MEAN_RGB)
    assert np.abs(out - small.astype(int)).mean() < 2.0               # same picture as a small copy
