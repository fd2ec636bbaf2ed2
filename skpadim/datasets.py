"""Anomaly-detection data sets: a synthetic generator and MVTec AD folder I/O.

* :func:`make_textures` builds a small, fully reproducible anomaly-detection set
  from real texture photographs shipped with scikit-image, with synthetic
  defects painted on and exact pixel masks.
* :func:`write_mvtec` writes such a set to disk in the MVTec AD folder layout.
* :func:`load_mvtec` indexes any folder in the MVTec AD layout (MVTec AD itself,
  BTAD, MPDD, converted VisA, or a user's own images) into a data frame, and
  :func:`load_images`, :func:`load_masks` and :func:`load_mvtec_arrays` turn
  that frame into numpy arrays.

The MVTec AD layout is::

    <category>/train/good/000.png
    <category>/test/good/000.png
    <category>/test/<defect>/000.png
    <category>/ground_truth/<defect>/000_mask.png
"""

import functools
import numbers
import os
import re
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.utils import Bunch, check_random_state

__all__ = [
    "make_textures",
    "write_mvtec",
    "load_mvtec",
    "load_images",
    "load_masks",
    "load_mvtec_arrays",
]

TEXTURES = ("brick", "grass", "gravel")
DEFECTS = ("scratch", "stain", "hole", "patch")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_DESCR = """\
Synthetic texture anomaly-detection data set
--------------------------------------------

Tiles of {size}x{size} pixels cut at random positions (with random horizontal
and vertical flips) from the '{texture}' photograph shipped with scikit-image
(``skimage.data.{texture}()``, 512x512 greyscale). Training tiles are all
defect-free; {n_defective} of the {n_test} test tiles carry one synthetic
defect each:

- scratch: a thin, slightly curved groove (a 2-3 px stroke with a 1 px
  wall of opposite polarity);
- stain: a soft-edged ellipse of shifted intensity and washed-out texture,
  with a drying ring;
- hole: a dark ellipse with a darker rim;
- patch: a region pasted from another of the three textures, with a seam.

``masks_test`` marks the defect pixels exactly; greyscale is replicated to
three channels. Defects used: {defects}.
"""


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------


def _check_int(value, name, low, high=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}.")
    return int(value)


def _check_texture(texture):
    if texture not in TEXTURES:
        raise ValueError(
            f"Unknown texture {texture!r}; valid textures are {', '.join(TEXTURES)}."
        )
    return texture


def _check_defects(defects):
    if isinstance(defects, str):
        defects = (defects,)
    elif isinstance(defects, (set, frozenset)):
        # A set's order changes from one Python process to the next (string
        # hashing is salted): take DEFECTS' order, so random_state reproduces.
        defects = sorted(defects, key=lambda d: (DEFECTS.index(d) if d in DEFECTS else len(DEFECTS), str(d)))
    try:
        defects = tuple(defects)
    except TypeError:
        raise TypeError(
            f"defects must be a sequence of defect names, got {defects!r}."
        ) from None
    if not defects:
        raise ValueError(
            f"defects must name at least one defect among {', '.join(DEFECTS)}."
        )
    unknown = [d for d in defects if d not in DEFECTS]
    if unknown:
        raise ValueError(
            f"Unknown defect(s) {unknown}; valid defects are {', '.join(DEFECTS)}."
        )
    # Keep the caller's order but drop repeats, which would only skew the mix.
    return tuple(dict.fromkeys(defects))


def _check_size(size):
    """None, an int or a (height, width) pair -> None or (height, width)."""
    if size is None:
        return None
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (size, size)
    try:
        h, w = size
    except (TypeError, ValueError):
        raise TypeError(
            f"size must be None, an int or a (height, width) pair, got {size!r}."
        ) from None
    return (_check_int(h, "size[0]", 1), _check_int(w, "size[1]", 1))


def _check_paths(paths, name, missing_allowed=False):
    """``paths`` as a list, every entry a path (or, with ``missing_allowed``, a
    missing value: None, NaN, pandas' NA)."""
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError(
            f"{name} must be a list of paths, got a single path; wrap it in a list."
        )
    try:
        paths = list(paths)
    except TypeError:
        raise TypeError(f"{name} must be a list of paths, got {paths!r}.") from None
    for i, path in enumerate(paths):
        if not isinstance(path, (str, os.PathLike)) and not (missing_allowed and _is_missing(path)):
            kind = "a path (str or path-like) or None" if missing_allowed else "a path (str or path-like)"
            raise TypeError(f"{name}[{i}] must be {kind}, got {path!r}.")
    return paths


# ---------------------------------------------------------------------------
# Synthetic textures
# ---------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _texture_image(texture):
    """The 512x512 source photograph as float32 (read once, then cached)."""
    from skimage import data

    image = getattr(data, texture)().astype(np.float32)
    image.setflags(write=False)  # shared by every call through the cache
    return image


def _random_tile(source, size, rng):
    top = rng.integers(0, source.shape[0] - size + 1)
    left = rng.integers(0, source.shape[1] - size + 1)
    tile = source[top : top + size, left : left + size]
    if rng.random() < 0.5:
        tile = tile[:, ::-1]
    if rng.random() < 0.5:
        tile = tile[::-1, :]
    return np.array(tile)


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _ellipse_radius(size, center, radii, angle):
    """Normalised elliptic radius of every pixel: 1 on the ellipse boundary."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy - center[0], xx - center[1]
    cos, sin = np.cos(angle), np.sin(angle)
    u = (dx * cos + dy * sin) / radii[1]
    v = (-dx * sin + dy * cos) / radii[0]
    return np.sqrt(u * u + v * v)


def _random_center(size, margin, rng):
    margin = min(margin, size / 2 - 1)
    return rng.uniform(margin, size - margin, size=2)


def _contrast_target(mean, delta, rng):
    """+delta or -delta: whichever keeps ``mean`` plus it inside [15, 240]."""
    if mean + delta > 240:
        sign = -1.0
    elif mean - delta < 15:
        sign = 1.0
    else:
        sign = rng.choice([-1.0, 1.0])
    return sign * delta


def _stroke_weight(size, points, width):
    """Anti-aliased coverage of a stroke of ``width`` pixels along ``points``."""
    points = np.rint(points).astype(int)
    inside = ((points >= 0) & (points < size)).all(axis=1)
    on_curve = np.zeros((size, size), dtype=bool)
    on_curve[points[inside, 0], points[inside, 1]] = True
    if not on_curve.any():
        return np.zeros((size, size))
    distance = ndimage.distance_transform_edt(~on_curve)
    # Pixels within width / 2 of the curve are fully covered; the next ring is
    # partly covered.
    return np.clip(width / 2 + 0.5 - distance, 0.0, 1.0)


def _paint_scratch(tile, rng, **_):
    size = tile.shape[0]
    length = rng.uniform(0.3, 0.6) * size
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)])
    normal = np.array([direction[1], -direction[0]])
    center = _random_center(size, length / 2 + 4, rng)
    start = center - direction * length / 2
    end = center + direction * length / 2
    # A quadratic Bezier curve whose control point is pushed sideways, so that
    # strokes range from straight to gently curved.
    control = center + normal * rng.uniform(-0.2, 0.2) * length
    t = np.linspace(0, 1, int(4 * length) + 2)[:, None]
    points = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
    width = rng.uniform(2.0, 3.0)
    groove = _stroke_weight(size, points, width)
    # A groove catches the light on one wall and is shadowed on the other: a
    # one-pixel line of opposite polarity runs along one side. Without it, a
    # lone bright line on grass is just another blade.
    wall = _stroke_weight(size, points + normal * (width / 2 + 1.0), 1.0)
    wall *= 1.0 - groove
    mask = (groove >= 0.5) | (wall >= 0.5)
    # Near white on a dark surface, near black on a bright one.
    if tile[mask].mean() < 128:
        level = rng.uniform(220, 250)
    else:
        level = rng.uniform(5, 35)
    out = tile + groove * (level - tile)
    return out + wall * (0.5 * (255.0 - level + tile) - out), mask


def _paint_stain(tile, rng, **_):
    size = tile.shape[0]
    radii = np.maximum(rng.uniform(0.10, 0.20, size=2) * size, 4.0)
    center = _random_center(size, radii.max() + 1, rng)
    radius = _ellipse_radius(size, center, radii, rng.uniform(0, np.pi))
    # Full strength inside 0.85, fading to zero at 1.15: weight 0.5 on the
    # ellipse, which is the mask.
    weight = _smoothstep((1.15 - radius) / 0.3)
    mask = radius <= 1.0
    mean = float(tile[mask].mean())
    shift = _contrast_target(mean, rng.uniform(45, 75), rng)
    # Stains wash out the texture under them, and drying leaves a darker (or
    # lighter) ring at the edge; without both, a stain on a busy texture such
    # as gravel looks like one more flat stone.
    flatten = rng.uniform(0.5, 0.8)
    ring = np.exp(-0.5 * ((radius - 0.92) / 0.07) ** 2)
    return tile + weight * (shift + flatten * (mean - tile)) + shift * ring, mask


def _paint_hole(tile, rng, **_):
    size = tile.shape[0]
    mean_radius = max(rng.uniform(0.05, 0.10) * size, 3.0)
    radii = mean_radius * np.array([1.0, rng.uniform(0.75, 1.0)])
    center = _random_center(size, radii.max() + 2, rng)
    radius = _ellipse_radius(size, center, radii, rng.uniform(0, np.pi))
    mean = float(tile.mean())
    floor = rng.uniform(25, 45)
    # The floor keeps a faint trace of the texture; the rim is darker still.
    inside = floor + 0.15 * (tile - mean) - 18 * _smoothstep((radius - 0.7) / 0.3)
    edge_width = 1.0 / mean_radius  # about one pixel, for anti-aliasing
    weight = _smoothstep((1.0 + edge_width - radius) / (2 * edge_width))
    mask = radius <= 1.0
    return tile + weight * (inside - tile), mask


def _paint_patch(tile, rng, texture, **_):
    size = tile.shape[0]
    other = rng.choice([t for t in TEXTURES if t != texture])
    source = _random_tile(_texture_image(other), size, rng)
    height, width = np.maximum(rng.uniform(0.22, 0.38, size=2) * size, 6.0)
    center = _random_center(size, max(height, width) / 2 + 1, rng)
    if rng.random() < 0.5:
        yy, xx = np.mgrid[0:size, 0:size]
        mask = (np.abs(yy + 0.5 - center[0]) <= height / 2) & (
            np.abs(xx + 0.5 - center[1]) <= width / 2
        )
    else:
        radius = _ellipse_radius(size, center, (height / 2, width / 2), 0.0)
        mask = radius <= 1.0
    out = np.where(mask, source, tile)
    # The pasted piece is bordered by a seam (a glue line or a gap); between
    # two similar textures, such as grass and gravel, it is the main cue.
    seam = mask & ~ndimage.binary_erosion(mask, iterations=max(1, size // 64))
    shift = -60.0 if out[mask].mean() > 100 else 60.0
    return np.where(seam, out + shift, out), mask


_PAINTERS = {
    "scratch": _paint_scratch,
    "stain": _paint_stain,
    "hole": _paint_hole,
    "patch": _paint_patch,
}


def _to_rgb_uint8(tiles):
    grey = np.clip(np.rint(tiles), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def make_textures(
    texture="brick",
    n_train=40,
    n_test=40,
    defect_ratio=0.5,
    image_size=128,
    defects=DEFECTS,
    random_state=None,
):
    """Generate a texture anomaly-detection set with exact defect masks.

    Tiles are cut at random positions, with random flips, from a real
    512x512 texture photograph shipped with scikit-image, so no download is
    needed. Training tiles are defect-free. A fraction ``defect_ratio`` of the
    test tiles receives one synthetic defect each, the defect types taking
    turns so that every requested type appears as evenly as possible.

    Parameters
    ----------
    texture : {"brick", "grass", "gravel"}, default="brick"
        The photograph to cut tiles from.
    n_train : int, default=40
        Number of defect-free training tiles (>= 1).
    n_test : int, default=40
        Number of test tiles (>= 1).
    defect_ratio : float, default=0.5
        Fraction of test tiles with a defect, in [0, 1]; the number of
        defective tiles is ``round(defect_ratio * n_test)``.
    image_size : int, default=128
        Side of the square tiles, in [32, 512].
    defects : sequence of str, default=("scratch", "stain", "hole", "patch")
        Defect types to paint:

        - ``"scratch"``: a thin groove 30-60 % of the tile long, straight or
          slightly curved: a 2-3 px stroke, near white on dark surfaces
          and near black on bright ones, with a 1 px line of the opposite
          polarity along one side (the lit or shadowed wall);
        - ``"stain"``: a soft-edged ellipse (radii 10-20 % of the tile) of
          shifted intensity (45-75 grey levels) and washed-out texture, with
          a drying ring at its edge; the mask is the ellipse, where the blend
          weight reaches 0.5;
        - ``"hole"``: a dark ellipse with a darker rim, radius 5-10 % of the
          tile;
        - ``"patch"``: a rectangle or ellipse (sides 22-38 % of the tile)
          pasted from one of the other two textures, bordered by a seam.
    random_state : int, RandomState instance or None, default=None
        Controls the tiles and the defects. Pass an int for output that is
        identical across calls. The training tiles, the clean test tiles and
        the defects come from three independent streams, so with a fixed seed
        the clean test tiles do not depend on ``n_train``, ``defect_ratio`` or
        ``defects``.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object with the following attributes.

        X_train : ndarray of shape (n_train, image_size, image_size, 3), uint8
            Defect-free training images (greyscale replicated to RGB).
        X_test : ndarray of shape (n_test, image_size, image_size, 3), uint8
            Test images.
        y_test : ndarray of shape (n_test,), int
            1 for a defective test image, 0 for a good one.
        masks_test : ndarray of shape (n_test, image_size, image_size), bool
            Defect pixels; all False for good images, never empty for
            defective ones.
        defect_types : ndarray of shape (n_test,), str
            ``"good"`` or the name of the defect painted on each test image.
        DESCR : str
            Description of the data set.

    See Also
    --------
    write_mvtec : Write such a set to disk in the MVTec AD layout.

    Examples
    --------
    >>> from skpadim.datasets import make_textures
    >>> data = make_textures("gravel", n_train=4, n_test=8, image_size=64,
    ...                      random_state=0)
    >>> data.X_train.shape, data.X_train.dtype
    ((4, 64, 64, 3), dtype('uint8'))
    >>> data.X_test.shape, data.masks_test.shape
    ((8, 64, 64, 3), (8, 64, 64))
    >>> int(data.y_test.sum())
    4
    >>> sorted(set(data.defect_types.tolist()))
    ['good', 'hole', 'patch', 'scratch', 'stain']
    >>> bool(data.masks_test[data.y_test == 0].any())
    False
    """
    texture = _check_texture(texture)
    n_train = _check_int(n_train, "n_train", 1)
    n_test = _check_int(n_test, "n_test", 1)
    image_size = _check_int(image_size, "image_size", 32, 512)
    if (
        isinstance(defect_ratio, bool)
        or not isinstance(defect_ratio, numbers.Real)
        or not 0.0 <= defect_ratio <= 1.0
    ):
        raise ValueError(f"defect_ratio must be a number in [0, 1], got {defect_ratio!r}.")
    defects = _check_defects(defects)

    seeds = check_random_state(random_state).randint(np.iinfo(np.int32).max, size=3)
    train_rng, test_rng, defect_rng = (np.random.default_rng(s) for s in seeds)

    source = _texture_image(texture)
    train = np.stack([_random_tile(source, image_size, train_rng) for _ in range(n_train)])
    test = np.stack([_random_tile(source, image_size, test_rng) for _ in range(n_test)])

    n_defective = int(round(defect_ratio * n_test))
    defective = defect_rng.permutation(n_test)[:n_defective]
    order = defect_rng.permutation(len(defects))
    defect_types = np.full(n_test, "good", dtype=f"<U{max(map(len, defects + ('good',)))}")
    masks = np.zeros((n_test, image_size, image_size), dtype=bool)
    for k, index in enumerate(defective):
        name = defects[order[k % len(defects)]]
        test[index], masks[index] = _PAINTERS[name](
            test[index], defect_rng, texture=texture
        )
        defect_types[index] = name

    return Bunch(
        X_train=_to_rgb_uint8(train),
        X_test=_to_rgb_uint8(test),
        y_test=(defect_types != "good").astype(np.int64),
        masks_test=masks,
        defect_types=defect_types,
        DESCR=_DESCR.format(
            size=image_size,
            texture=texture,
            n_defective=n_defective,
            n_test=n_test,
            defects=", ".join(defects),
        ),
    )


# ---------------------------------------------------------------------------
# Writing the MVTec AD layout
# ---------------------------------------------------------------------------

_MVTEC_SUBFOLDERS = ("train", "test", "ground_truth")


def _prepare_category_dir(path, overwrite):
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{str(path)!r} exists and is not a folder.")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"Folder {str(path)!r} already exists and is not empty; pass "
                "overwrite=True to replace its train, test and ground_truth folders."
            )
        for name in _MVTEC_SUBFOLDERS:
            sub = path / name
            if sub.is_dir() and not sub.is_symlink():
                shutil.rmtree(sub)
            elif sub.exists() or sub.is_symlink():
                sub.unlink()
    path.mkdir(parents=True, exist_ok=True)


def _save_png(array, path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def write_mvtec(
    root,
    category="brick",
    *,
    texture=None,
    n_train=40,
    n_test=40,
    defect_ratio=0.5,
    image_size=128,
    defects=DEFECTS,
    random_state=None,
    overwrite=False,
):
    """Generate a texture set with :func:`make_textures` and write it as MVTec AD.

    The files are laid out and named exactly as in MVTec AD::

        <root>/<category>/train/good/000.png
        <root>/<category>/test/good/000.png
        <root>/<category>/test/<defect>/000.png
        <root>/<category>/ground_truth/<defect>/000_mask.png

    Images are RGB PNG files; masks are single-channel PNG files holding 0 and
    255, of the same size as their image. Numbering starts at 000 in every
    folder (more digits are used past 999 images).

    Parameters
    ----------
    root : str or path-like
        Folder holding the categories; created if needed.
    category : str, default="brick"
        Name of the category folder to write.
    texture : {"brick", "grass", "gravel"} or None, default=None
        Texture to cut tiles from; None uses ``category``, which must then be
        one of the texture names.
    n_train, n_test, defect_ratio, image_size, defects, random_state
        Passed to :func:`make_textures`.
    overwrite : bool, default=False
        If the category folder already exists and is not empty, raise
        :class:`FileExistsError` (the default) or, when True, delete its
        ``train``, ``test`` and ``ground_truth`` folders before writing. Other
        files in the category folder are left alone.

    Returns
    -------
    path : pathlib.Path
        The category folder, ``Path(root) / category``, ready for
        :func:`load_mvtec` with ``category=None``.

    See Also
    --------
    load_mvtec : Index a folder in the MVTec AD layout.

    Examples
    --------
    >>> import tempfile
    >>> from skpadim.datasets import load_mvtec, write_mvtec
    >>> with tempfile.TemporaryDirectory() as root:
    ...     path = write_mvtec(root, "grass", n_train=3, n_test=4,
    ...                        image_size=64, random_state=0)
    ...     print(path.name, sorted(p.name for p in path.iterdir()))
    ...     print(sorted(p.name for p in (path / "train" / "good").iterdir()))
    ...     print(len(load_mvtec(path)))
    grass ['ground_truth', 'test', 'train']
    ['000.png', '001.png', '002.png']
    7
    """
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a folder path (str or path-like), got {root!r}.")
    if Path(root).exists() and not Path(root).is_dir():
        raise NotADirectoryError(f"root {str(root)!r} is a file, not a folder.")
    if (not isinstance(category, str) or category in ("", ".", "..")
            or category != Path(category).name):
        raise ValueError(f"category must be a plain folder name, got {category!r}.")
    if not isinstance(overwrite, (bool, np.bool_)):
        # Checked before anything is made: any truthy value (the string "no")
        # would otherwise delete the folder's contents.
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}.")
    if texture is None:
        if category not in TEXTURES:
            raise ValueError(
                f"category {category!r} is not a texture name; pass texture= one "
                f"of {', '.join(TEXTURES)}."
            )
        texture = category
    data = make_textures(
        texture,
        n_train=n_train,
        n_test=n_test,
        defect_ratio=defect_ratio,
        image_size=image_size,
        defects=defects,
        random_state=random_state,
    )

    path = Path(root) / category
    _prepare_category_dir(path, overwrite)
    digits = max(3, len(str(max(n_train, n_test) - 1)))
    for i, image in enumerate(data.X_train):
        _save_png(image, path / "train" / "good" / f"{i:0{digits}d}.png")
    counters = {}
    for image, mask, name in zip(data.X_test, data.masks_test, data.defect_types):
        number = counters[name] = counters.get(name, -1) + 1
        stem = f"{number:0{digits}d}"
        _save_png(image, path / "test" / name / f"{stem}.png")
        if name != "good":
            _save_png(
                mask.astype(np.uint8) * 255,
                path / "ground_truth" / name / f"{stem}_mask.png",
            )
    return path


# ---------------------------------------------------------------------------
# Reading the MVTec AD layout
# ---------------------------------------------------------------------------


def _natural_key(name):
    """Sort key putting "2.png" before "10.png"."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _visible_subdirs(folder):
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _image_files(folder):
    files = (
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    return sorted(files, key=lambda p: _natural_key(p.name))


def _categories_under(root):
    """Names of the sub-folders of root that look like MVTec categories."""
    if not root.is_dir():
        return []
    return [p.name for p in _visible_subdirs(root) if (p / "train" / "good").is_dir()]


def _resolve_category_dir(root, category):
    if category is not None and not isinstance(category, (str, os.PathLike)):
        raise TypeError(f"category must be a folder name (str) or None, got {category!r}.")
    if not root.exists():
        raise FileNotFoundError(f"Data folder {str(root)!r} does not exist.")
    if not root.is_dir():
        raise NotADirectoryError(f"{str(root)!r} is a file, not a data folder.")
    folder = root if category is None else root / category
    found = _categories_under(root)
    if not folder.is_dir():
        hint = f" Categories found there: {', '.join(found)}." if found else ""
        raise FileNotFoundError(
            f"Category folder {str(folder)!r} does not exist.{hint}"
        )
    if not (folder / "train" / "good").is_dir():
        if category is None and found:
            raise FileNotFoundError(
                f"{str(root)!r} has no train/good folder but holds categories "
                f"({', '.join(found)}); pass category= one of them."
            )
        raise FileNotFoundError(
            f"{str(folder)!r} is not in the MVTec AD layout: missing the "
            f"folder {str(folder / 'train' / 'good')!r}."
        )
    return folder


def _mask_candidates(stem):
    """Mask file names to try, in order of preference, all lower-case."""
    stem = stem.lower()
    names = [f"{stem}_mask.png", f"{stem}.png"]
    for ext in IMAGE_EXTENSIONS:
        names += [f"{stem}_mask{ext}", f"{stem}{ext}"]
    return list(dict.fromkeys(names))


def _find_masks(images, mask_dir):
    """Map each defective image to its mask, or raise naming the missing one."""
    index = {}
    if mask_dir.is_dir():
        for p in sorted(mask_dir.iterdir()):
            index.setdefault(p.name.lower(), p)
    masks = []
    for image in images:
        match = next(
            (index[n] for n in _mask_candidates(image.stem) if n in index), None
        )
        if match is None:
            raise FileNotFoundError(
                f"No mask for defective image {str(image)!r}: expected "
                f"{str(mask_dir / (image.stem + '_mask.png'))!r} (or "
                f"{image.stem + '.png'!r} in that folder)."
            )
        masks.append(str(match))
    return masks


def load_mvtec(root, category=None):
    """Index a folder in the MVTec AD layout into a data frame.

    Works with MVTec AD and with any set using its layout (BTAD, MPDD, VisA
    after conversion, a user's own images)::

        <category>/train/good/<name>.<ext>
        <category>/test/good/<name>.<ext>
        <category>/test/<defect>/<name>.<ext>
        <category>/ground_truth/<defect>/<name>_mask.png   (or <name>.png)

    Image extensions .png, .jpg, .jpeg, .bmp, .tif and .tiff are accepted in
    any letter case; hidden files and other files are ignored. Only the
    images are listed, nothing is decoded.

    Parameters
    ----------
    root : str or path-like
        The category folder itself when ``category`` is None, else the folder
        holding the categories.
    category : str or None, default=None
        Name of the category folder under ``root``.

    Returns
    -------
    frame : pandas.DataFrame
        One row per image, training images first, then test images; within a
        split sorted by defect type, then by file name (numbers in names
        compare as numbers). Columns:

        path : str
            Image file.
        split : {"train", "test"}
            The split the image belongs to.
        label : int
            0 for a good image, 1 for a defective one.
        defect_type : str
            ``"good"`` or the name of the defect folder.
        mask_path : str or None
            Mask file of a defective image; None for good images.

    Raises
    ------
    FileNotFoundError
        If ``root``, the category, ``train/good`` or ``test`` is missing, or a
        defective image has no mask.
    NotADirectoryError
        If ``root`` is a file.
    ValueError
        If ``train/good`` or ``test`` holds no image.

    See Also
    --------
    load_mvtec_arrays : Read the images and masks of a split into arrays.

    Examples
    --------
    >>> import tempfile
    >>> from skpadim.datasets import load_mvtec, write_mvtec
    >>> with tempfile.TemporaryDirectory() as root:
    ...     _ = write_mvtec(root, "brick", n_train=3, n_test=4, image_size=64,
    ...                     random_state=0)
    ...     frame = load_mvtec(root, category="brick")
    >>> frame.columns.tolist()
    ['path', 'split', 'label', 'defect_type', 'mask_path']
    >>> frame.groupby("split", sort=False).size().to_dict()
    {'train': 3, 'test': 4}
    >>> bool(frame.loc[frame.label == 1, "mask_path"].str.endswith("_mask.png").all())
    True
    """
    import pandas as pd

    folder = _resolve_category_dir(Path(root), category)
    train = _image_files(folder / "train" / "good")
    if not train:
        raise ValueError(
            f"No images ({', '.join(IMAGE_EXTENSIONS)}) in "
            f"{str(folder / 'train' / 'good')!r}."
        )
    rows = [(str(p), "train", 0, "good", None) for p in train]

    test_dir = folder / "test"
    if not test_dir.is_dir():
        raise FileNotFoundError(
            f"{str(folder)!r} is not in the MVTec AD layout: missing the folder "
            f"{str(test_dir)!r}."
        )
    n_test = 0
    for defect_dir in _visible_subdirs(test_dir):
        images = _image_files(defect_dir)
        n_test += len(images)
        name = defect_dir.name
        if name == "good":
            rows += [(str(p), "test", 0, name, None) for p in images]
        else:
            masks = _find_masks(images, folder / "ground_truth" / name)
            rows += [(str(p), "test", 1, name, m) for p, m in zip(images, masks)]
    if n_test == 0:
        raise ValueError(
            f"No images in the sub-folders of {str(test_dir)!r}; expected "
            "test/good and test/<defect> folders."
        )

    frame = pd.DataFrame(
        rows, columns=["path", "split", "label", "defect_type", "mask_path"]
    )
    frame["label"] = frame["label"].astype(np.int64)
    return frame


# ---------------------------------------------------------------------------
# Frame -> arrays
# ---------------------------------------------------------------------------


def _open_image(path, what, levels=None):
    """Decode an image file fully, naming the file in any error; ``levels``
    (default ``_to_8bit``) brings high-bit-depth files to 8 bits."""
    import zlib

    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist or is not a file.")
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so that a truncated file fails here
            return (levels or _to_8bit)(img)
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as exc:
        raise ValueError(f"Cannot read {what} file {str(path)!r}: {exc}") from exc


def _to_8bit(img, labels=False):
    """Bring 16-bit and float images to 8 bits by scaling, not by clipping.

    Decoded by the rule the detector's inputs follow (16-bit modes scaled by
    65535, see ``skpadim._images``), so that a file reads the same here and there.
    With ``labels`` (masks), 16-bit values that all lie in 0..255 are kept:
    labels such as 0/1, divided by 257, would round to 0 and the defect vanish.
    """
    from PIL import Image

    from ._images import _pil_to_array

    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return img
    values = _pil_to_array(img).astype(np.float64)
    if img.mode == "F":
        # Float files hold [0, 1]; some hold 8-bit levels, kept as they are.
        values = values * 255.0 if values.max(initial=0.0) <= 1.0 else values
    elif values.max(initial=0.0) > 255.0 or (img.mode.startswith("I;16") and not labels):
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def _pil_size(size):
    """(height, width) -> PIL's (width, height)."""
    return (size[1], size[0])


def load_images(paths, size=None):
    """Read image files as RGB uint8 arrays.

    Parameters
    ----------
    paths : sequence of str or path-like
        Image files, e.g. ``frame["path"]`` from :func:`load_mvtec`.
    size : int, (height, width) or None, default=None
        None keeps each image at its own size; otherwise every image is
        resized (PIL bilinear) to ``(size, size)`` or ``(height, width)``.

    Returns
    -------
    images : list of ndarray of shape (H, W, 3), or ndarray of shape (n, height, width, 3)
        uint8 RGB images; greyscale files are replicated to three channels. A
        list when ``size`` is None, one stacked array otherwise.

    Raises
    ------
    FileNotFoundError
        If a file does not exist.
    ValueError
        If a file cannot be decoded (not an image, truncated); the message
        names the file.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from PIL import Image
    >>> from skpadim.datasets import load_images
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = Path(tmp) / "grey.png"
    ...     Image.fromarray(np.zeros((30, 40), dtype=np.uint8)).save(path)
    ...     print(load_images([path])[0].shape, load_images([path], size=16).shape)
    (30, 40, 3) (1, 16, 16, 3)
    """
    from PIL import Image

    paths = _check_paths(paths, "paths")
    size = _check_size(size)
    images = []
    for path in paths:
        img = _open_image(path, "image").convert("RGB")
        if size is not None:
            img = img.resize(_pil_size(size), Image.BILINEAR)
        images.append(np.asarray(img, dtype=np.uint8))
    if size is None:
        return images
    if not images:
        return np.empty((0, *size, 3), dtype=np.uint8)
    return np.stack(images)


# PIL modes of one grey channel (bilevel, 8-bit, 32-bit int, float, 16-bit).
_GREY_MODES = ("1", "L", "I", "F", "I;16", "I;16B", "I;16L", "I;16N")


def _is_missing(path):
    """None, NaN or pandas' NA: a frame's empty mask_path cell."""
    if path is None or (isinstance(path, float) and np.isnan(path)):
        return True
    import pandas as pd

    return path is pd.NA


def _check_shape(shape, name):
    """``(H, W)`` (or a longer shape, of which the first two) as ints >= 1."""
    try:
        h, w = (int(v) for v in tuple(shape)[:2])
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an image shape (height, width), got {shape!r}.") from None
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be an image shape (height, width), got {shape!r}.")
    return h, w


def _binarize(mask):
    # Masks are stored as 0/255 by MVTec and most sets, but some converted
    # sets store 0/1; thresholding the latter at 127 would erase them.
    if mask.max(initial=0) <= 1:
        return mask > 0
    return mask > 127


def _resize_mask(mask, size):
    """A boolean mask resized to ``size`` (height, width) without losing a defect.

    Along a side that shrinks, each output pixel covers a run of input pixels
    (the runs partition the side) and is a defect if any of them is: nearest
    neighbour sampling would drop defects narrower than the step, and their
    image would then count as good. Along a side that grows, pixels are
    repeated (nearest neighbour).
    """
    for axis, target in enumerate(size):
        n = mask.shape[axis]
        if target < n:
            starts = (np.arange(target) * n) // target
            mask = np.logical_or.reduceat(mask, starts, axis=axis)
        elif target > n:
            mask = np.take(mask, ((np.arange(target) + 0.5) * n / target).astype(np.intp), axis=axis)
    return mask


def load_masks(mask_paths, shapes=None, size=None):
    """Read defect masks as boolean arrays, with all-False masks for None entries.

    Parameters
    ----------
    mask_paths : sequence of (str, path-like or None)
        Mask files, e.g. ``frame["mask_path"]`` from :func:`load_mvtec`; None
        (or NaN, ``pd.NA``) stands for a good image without a mask.
    shapes : sequence of (int, int) or None, default=None
        ``(H, W)`` of each image, needed for None entries when ``size`` is
        None; masks read from files are checked against it.
    size : int, (height, width) or None, default=None
        None keeps each mask at its own size; otherwise every mask is resized
        to ``(size, size)`` or ``(height, width)``: where it shrinks, a pixel
        is a defect if any pixel it covers is, so that no defect vanishes
        (nearest neighbour sampling would drop those narrower than its step);
        where it grows, pixels are repeated.

    Returns
    -------
    masks : list of ndarray of shape (H, W), or ndarray of shape (n, height, width)
        Boolean masks, True on defect pixels (grey level above 127, or above
        0 for masks stored as 0/1, in 8 or 16 bits; 16-bit masks with values
        above 255 are read on 8-bit levels; for colour masks, the brightest
        channel's level). A list when ``size`` is None, one stacked array otherwise.

    Examples
    --------
    >>> from skpadim.datasets import load_masks
    >>> masks = load_masks([None, None], shapes=[(2, 3), (4, 5)])
    >>> [m.shape for m in masks], masks[0].dtype
    ([(2, 3), (4, 5)], dtype('bool'))
    >>> load_masks([None], size=8).shape
    (1, 8, 8)
    """
    mask_paths = _check_paths(mask_paths, "mask_paths", missing_allowed=True)
    size = _check_size(size)
    if shapes is not None:
        shapes = [_check_shape(s, f"shapes[{i}]") for i, s in enumerate(shapes)]
        if len(shapes) != len(mask_paths):
            raise ValueError(
                f"shapes has {len(shapes)} entries but mask_paths has {len(mask_paths)}."
            )
    masks = []
    for i, path in enumerate(mask_paths):
        if _is_missing(path):
            if size is not None:
                masks.append(np.zeros(size, dtype=bool))
            elif shapes is not None:
                masks.append(np.zeros(shapes[i], dtype=bool))
            else:
                raise ValueError(
                    f"mask_paths[{i}] is None and neither shapes nor size is given, "
                    "so the size of its empty mask is unknown."
                )
            continue
        img = _open_image(path, "mask", levels=functools.partial(_to_8bit, labels=True))
        # A mask drawn in colour (a red or blue overlay, a palette) marks its
        # defects bright in one channel only: read the brightest channel, not a
        # grey level that could fall below the threshold (pure red is 76 in grey).
        colour = img.mode not in _GREY_MODES
        values = np.asarray(img.convert("RGB" if colour else "L"))
        mask = _binarize(values.max(axis=2) if colour else values)
        if size is not None:
            mask = _resize_mask(mask, size)
        if size is None and shapes is not None and mask.shape != shapes[i]:
            raise ValueError(
                f"Mask {str(path)!r} has shape {mask.shape} but its image has "
                f"shape {shapes[i]}."
            )
        masks.append(mask)
    if size is None:
        return masks
    if not masks:
        return np.empty((0, *size), dtype=bool)
    return np.stack(masks)


def load_mvtec_arrays(frame_or_root, category=None, split="test", size=None):
    """Read the images, labels and masks of one split of an MVTec AD folder.

    Parameters
    ----------
    frame_or_root : pandas.DataFrame, str or path-like
        A frame from :func:`load_mvtec`, or a folder passed to it together
        with ``category``.
    category : str or None, default=None
        See :func:`load_mvtec`; must be None when a frame is given.
    split : {"train", "test"}, default="test"
        Which images to read.
    size : int, (height, width) or None, default=None
        None keeps every image at its own size; otherwise images and masks
        are resized to ``(size, size)`` or ``(height, width)``.

    Returns
    -------
    X : list of ndarray of shape (H, W, 3), or ndarray of shape (n, height, width, 3)
        uint8 RGB images, as returned by :func:`load_images`.
    y : ndarray of shape (n,), int
        0 for good images, 1 for defective ones.
    masks : list of ndarray of shape (H, W), or ndarray of shape (n, height, width)
        Boolean defect masks, all False for good images, as returned by
        :func:`load_masks`.

    Examples
    --------
    >>> import tempfile
    >>> from skpadim.datasets import load_mvtec_arrays, write_mvtec
    >>> with tempfile.TemporaryDirectory() as root:
    ...     path = write_mvtec(root, "gravel", n_train=2, n_test=4,
    ...                        image_size=48, random_state=0)
    ...     X, y, masks = load_mvtec_arrays(path, split="test", size=32)
    >>> X.shape, int(y.sum()), masks.shape
    ((4, 32, 32, 3), 2, (4, 32, 32))
    """
    import pandas as pd

    if isinstance(frame_or_root, pd.DataFrame):
        if category is not None:
            raise ValueError("category must be None when a data frame is given.")
        frame = frame_or_root
    else:
        frame = load_mvtec(frame_or_root, category=category)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    missing = [c for c in ("path", "split", "label", "mask_path") if c not in frame.columns]
    if missing:
        raise ValueError(
            f"The data frame lacks the column(s) {missing}; pass one as load_mvtec returns it."
        )
    rows = frame[frame["split"] == split]
    if not len(rows):
        raise ValueError(f"The data frame has no {split!r} rows.")
    labels = rows["label"].to_numpy()
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"The label column must hold 0 (good) or 1 (defective); got "
                         f"{sorted(set(labels[~np.isin(labels, (0, 1))].tolist()), key=str)[:5]}.")
    # An edited frame could pair a defective image with no mask (read as all
    # good pixels, and as a good image where masks serve as y) or the reverse.
    has_mask = ~rows["mask_path"].map(_is_missing).to_numpy(dtype=bool)
    mismatches = [((labels == 1) & ~has_mask, "is defective (label 1) but has no mask_path"),
                  ((labels == 0) & has_mask, "is good (label 0) but has a mask_path")]
    for wrong, what in mismatches:
        if wrong.any():
            path = rows["path"].iloc[int(np.flatnonzero(wrong)[0])]
            raise ValueError(f"{int(wrong.sum())} image(s) such as {str(path)!r} {what}.")
    X = load_images(rows["path"], size=size)
    y = labels.astype(np.int64)
    shapes = None if size is not None else [x.shape[:2] for x in X]
    masks = load_masks(rows["mask_path"].tolist(), shapes=shapes, size=size)
    return X, y, masks
