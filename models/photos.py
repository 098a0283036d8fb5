"""Real photographs that ship inside scikit-image and scikit-learn, by name.

They install with the packages (no download), so exports and tests can use them offline:
`export.py --quantize int8` calibrates on some of them, `tests/python/reference.py` writes the
test photos and the accuracy set (tests/data/accuracy.json) from them.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _motorcycle() -> np.ndarray:
    import skimage.data

    return skimage.data.stereo_motorcycle()[0]  # the left view of the stereo pair


def _sklearn(index: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_images

        return load_sample_images().images[index]

    return load


# name -> loader returning a uint8 array, HxWx3 (RGB) or HxW (grayscale).
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "chelsea": _skimage("chelsea"),  # a tabby cat
    "coffee": _skimage("coffee"),  # a cup of espresso
    "astronaut": _skimage("astronaut"),
    "rocket": _skimage("rocket"),  # a launch vehicle on its pad
    "motorcycle": _motorcycle,
    "camera": _skimage("camera"),  # grayscale: a cameraman and tripod
    "coins": _skimage("coins"),  # grayscale
    "brick": _skimage("brick"),  # grayscale texture
    "grass": _skimage("grass"),  # grayscale texture
    "gravel": _skimage("gravel"),  # grayscale texture
    "moon": _skimage("moon"),  # grayscale
    "page": _skimage("page"),  # grayscale, non-square
    "hubble": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "retina": _skimage("retina"),
    "cell": _skimage("cell"),  # grayscale microscopy
    "colorwheel": _skimage("colorwheel"),
    "china": _sklearn(0),  # the Summer Palace, Beijing
    "flower": _sklearn(1),  # a dahlia
}

# Photos whose subject is an ImageNet class: the accuracy set (tests/data/accuracy.json says
# which classes each one may be). Calibration for int8 uses only photos outside this set.
ACCURACY_SET = ("chelsea", "coffee", "rocket", "motorcycle", "china", "camera")

CALIBRATION_SET = (
    "astronaut", "flower", "coins", "brick", "grass", "gravel", "moon", "hubble",
    "retina", "immunohistochemistry", "cell", "colorwheel",
)


def load(name: str) -> np.ndarray:
    return PHOTOS[name]()
