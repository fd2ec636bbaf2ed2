"""skpadim: PaDiM patch-distribution anomaly detection as scikit-learn estimators."""

from .covariance import PatchCovariance
from .detector import PatchGaussianDetector
from .feature_extraction import PatchEmbeddings, TorchvisionExtractor
from .persistence import load, save
from .tiling import TiledDetector

__version__ = "0.1.0"

__all__ = [
    "PatchCovariance",
    "PatchEmbeddings",
    "PatchGaussianDetector",
    "TiledDetector",
    "TorchvisionExtractor",
    "__version__",
    "load",
    "save",
]
