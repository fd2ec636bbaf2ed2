"""End to end on real photographs: the default detector finds painted defects.

Real texture photographs (scikit-image) with synthetic defects and exact masks,
the default detector (EfficientNet-Lite0 ImageNet weights from pip, Ledoit-Wolf),
fitted on good tiles only.
"""

import numpy as np
import pytest

from skpadim import PatchGaussianDetector
from skpadim.datasets import make_textures
from skpadim.metrics import aupro, image_auroc, pixel_auroc


@pytest.fixture(scope="module")
def texture_results():
    results = {}
    for k, texture in enumerate(("brick", "grass", "gravel")):
        data = make_textures(texture, n_train=60, n_test=40, image_size=224, random_state=k)
        det = PatchGaussianDetector(random_state=0).fit(data.X_train)
        maps = det.anomaly_maps(data.X_test)
        scores = -det.score_samples(data.X_test)
        results[texture] = {
            "image_auroc": image_auroc(data.y_test, scores),
            "pixel_auroc": pixel_auroc(data.masks_test, maps),
            "aupro": aupro(data.masks_test, maps),
        }
    print(results)
    return results


def test_default_detector_on_real_textures(texture_results):
    image = np.mean([r["image_auroc"] for r in texture_results.values()])
    pixel = np.mean([r["pixel_auroc"] for r in texture_results.values()])
    assert image >= 0.95, texture_results
    assert pixel >= 0.95, texture_results
    for texture, r in texture_results.items():
        # No texture is left behind either.
        assert r["image_auroc"] >= 0.88, (texture, r)
        assert r["pixel_auroc"] >= 0.95, (texture, r)
        assert r["aupro"] >= 0.75, (texture, r)
