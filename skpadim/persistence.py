"""Saving and loading fitted detectors without pickle.

``joblib.dump`` / ``pickle`` work on every estimator here, but loading a pickle can
run arbitrary code: never load a pickle from a source you do not trust.
:func:`save` writes a fitted :class:`~skpadim.PatchGaussianDetector` as a single
``.npz`` archive holding only numeric arrays and a JSON description (a
:class:`~skpadim.TiledDetector` likewise: its detector and its scale and
window), and
:func:`load` reads it back with ``allow_pickle=False``, so a model file cannot
execute anything. The file carries a format version and SHA-256 digests of every
array and of the JSON description, checked on load together with the shapes, so a
truncated or altered file fails with a clear error instead of scoring wrongly.

Only backbones that can be rebuilt from their name (torchvision models and
EfficientNet-Lite) are saved this way; a detector around a custom
``torch.nn.Module`` needs its code, so use joblib for it, with trusted files only.
"""

import hashlib
import json
import os
import stat
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from numpy.lib.npyio import NpzFile
from sklearn.base import clone

from .covariance import PatchCovariance, _pack_lower_float16, _unpack_lower
from .detector import PatchGaussianDetector
from .feature_extraction import TorchvisionExtractor
from .tiling import TiledDetector

__all__ = ["save", "load", "FORMAT_VERSION", "ModelFileError"]

# 2: compact models store their factors' lower triangles in float16
# ("cholesky_lower"). 3: a TiledDetector, its detector as before plus a "tiled"
# section. 4: a detector with a localizer (``localization``): a "localizer"
# section that describes it as version 3 does a TiledDetector, its arrays under
# "localizer/". Other models are still written as version 1. (A release older
# than a detector parameter refuses a file that names it, naming it: parameters
# are added without a new version.)
#: Newest version of the file layout: :func:`~skpadim.save` writes the oldest one
#: that can hold the model, :func:`~skpadim.load` refuses newer ones.
FORMAT_VERSION = 4
_MAGIC = "skpadim-detector"

_DETECTOR_PARAMS = ("n_features", "shrinkage", "pooling", "sigma", "image_score", "size_calibration",
                    "localization", "contamination", "trim", "trim_by", "batch_size", "device", "compact",
                    "random_state")
# Files written before these parameters existed were fitted with the paper's
# recipe, or (trim_by) trimmed whole images, or without a size calibration, or
# with maps from the frame, which is what these values give back.
_DETECTOR_PARAM_FALLBACKS = {"pooling": 1, "image_score": "max", "size_calibration": False,
                             "localization": "frame", "trim": 0.0, "trim_by": "image"}
_LOCALIZER_PREFIX = "localizer/"
_EXTRACTOR_PARAMS = ("backbone", "layers", "weights", "download", "image_size", "crop_size", "mean", "std",
                     "batch_size", "device")
_FITTED_KEYS = ("offset", "n_features_in", "input_shape", "aspect_range", "fitted_on_embeddings",
                "grid_shape", "n_samples_seen", "gaussian_dtype")
_TILED_PARAMS = ("detector", "short_side", "window")
_TILED_FITTED_KEYS = ("scale", "window", "n_windows", "offset")
# "sha256" covers the arrays only, so "sha256_config" also covers the description
# (offset, parameters, ...). Adding it needs no new format version: older releases
# ignore the extra key and still check "sha256", and files written before it
# existed, which lack it, are still read.
_DIGEST_KEYS = ("sha256", "sha256_config")


class ModelFileError(ValueError):
    """A model file is unreadable, altered, truncated, or of an unknown format.

    Examples
    --------
    >>> import os, tempfile
    >>> from skpadim import load
    >>> path = os.path.join(tempfile.mkdtemp(), "not-a-model.npz")
    >>> with open(path, "wb") as f:
    ...     _ = f.write(b"garbage")
    >>> try:
    ...     load(path)
    ... except ModelFileError as exc:
    ...     print(type(exc).__name__)
    ModelFileError
    """


def _jsonable(value, name):
    from torchvision.models import WeightsEnum

    if isinstance(value, WeightsEnum):
        # Written as its name ("IMAGENET1K_V1"), which the extractor reads as the
        # same weights; the file holds the weights themselves anyway.
        return value.name
    if isinstance(value, np.bool_):  # (size_calibration, compact: validation accepts numpy's)
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (tuple, list)):
        return [_jsonable(v, name) for v in value]
    if isinstance(value, (torch.device, os.PathLike)):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"Cannot save parameter {name}={value!r} without pickle; use joblib (trusted files only)."
    )


def _digest(arrays):
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(key.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _config_digest(config, arrays_digest):
    # Canonical JSON (sorted keys), so that the digest depends on the description
    # read back, not on how its text was laid out.
    description = {k: v for k, v in config.items() if k not in _DIGEST_KEYS}
    h = hashlib.sha256(arrays_digest.encode())
    h.update(json.dumps(description, sort_keys=True).encode("utf-8"))
    return h.hexdigest()


def _file_mode(path):
    # mkstemp creates the file with mode 0600: give the model the permissions of
    # the file it replaces, or those of a file created with open().
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        # os.umask can only be read by setting it: put it back at once.
        umask = os.umask(0o077)
        os.umask(umask)
        return 0o666 & ~umask


def save(model, path):
    """Write a fitted detector to ``path`` (a ``.npz`` file) without pickle.

    The file is written to a temporary name beside ``path`` and renamed into
    place, so an interrupted save never leaves a half-written model where the
    previous one was.

    Parameters
    ----------
    model : PatchGaussianDetector or TiledDetector
        A fitted detector whose feature extractor is a
        :class:`~skpadim.TorchvisionExtractor` built from a backbone name, or
        which was fitted on embeddings; or a fitted
        :class:`~skpadim.TiledDetector` around such a detector.
    path : str or path-like
        Destination file.

    Returns
    -------
    path : pathlib.Path
        The file written.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from skpadim import PatchEmbeddings, PatchGaussianDetector, save, load
    >>> emb = PatchEmbeddings(np.random.RandomState(0).rand(20, 6, 4, 4).astype("float32"))
    >>> det = PatchGaussianDetector(n_features=4, random_state=0).fit(emb)
    >>> path = save(det, os.path.join(tempfile.mkdtemp(), "det.npz"))
    >>> bool(np.array_equal(load(path).score_samples(emb), det.score_samples(emb)))
    True
    """
    if not isinstance(model, (PatchGaussianDetector, TiledDetector)):
        raise TypeError(
            f"save expects a PatchGaussianDetector or a TiledDetector, got {type(model).__name__}."
        )
    if not hasattr(model, "offset_"):
        raise ValueError("save expects a fitted detector; call fit first.")
    arrays, config = _description(model)
    config["sha256"] = _digest(arrays)
    config["sha256_config"] = _config_digest(config, config["sha256"])
    arrays["config"] = np.frombuffer(json.dumps(config).encode("utf-8"), dtype=np.uint8)

    path = Path(path)
    # Named here: the temporary file's error would name the temporary file.
    if not path.parent.is_dir():
        raise FileNotFoundError(f"Cannot save to {path}: the folder {path.parent} does not exist.")
    if path.is_dir():
        raise IsADirectoryError(f"Cannot save to {path}: it is a folder; give a file name.")

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())

    _write_atomically(path, write)
    return path


def _description(model):
    """The arrays and the description (without digests) of a fitted detector."""
    _check_exact_type(model)
    if isinstance(model, TiledDetector):
        _check_exact_type(model.detector_)
        arrays, config = _contents(model.detector_)
        config["format_version"] = 3
        config["tiled"] = {
            "params": {"detector": _template(model.detector),
                       "short_side": _jsonable(model.short_side, "short_side"),
                       "window": _jsonable(model.window, "window")},
            "fitted": {"scale": float(model.scale_), "window": list(model.window_),
                       "n_windows": int(model.n_windows_), "offset": _offset_json(model.offset_)},
        }  # fmt: skip
        return arrays, config
    arrays, config = _contents(model)
    if getattr(model, "localizer_", None) is not None:
        local_arrays, config["localizer"] = _description(model.localizer_)
        config["format_version"] = 4
        arrays.update({_LOCALIZER_PREFIX + key: value for key, value in local_arrays.items()})
    return arrays, config


def _write_atomically(path, write, suffix=".tmp"):
    """``write(tmp)`` into a temporary file beside ``path``, then rename it into
    place with the mode ``path`` has (or a new file would get): a failure, or an
    interrupt, leaves whatever ``path`` held untouched."""
    path = Path(path)
    mode = _file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent or ".")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_exact_type(obj):
    """A file rebuilds the library's own classes: a subclass would come back as its
    base class, without the methods it overrides, and score otherwise."""
    base = next(c for c in (PatchGaussianDetector, TiledDetector, TorchvisionExtractor) if isinstance(obj, c))
    if type(obj) is not base:
        raise TypeError(
            f"save rebuilds a {base.__name__} as such; {type(obj).__name__} is a subclass, whose "
            "code a model file cannot hold. Use joblib.dump for this model and load it only "
            "from trusted files."
        )


def _extractor_description(extractor):
    """The parameters of a rebuildable extractor (JSON-ready), or None."""
    if extractor is None:
        return None
    _check_rebuildable(extractor)
    return {k: _jsonable(getattr(extractor, k), k) for k in _EXTRACTOR_PARAMS}


def _check_rebuildable(extractor):
    if isinstance(extractor, TorchvisionExtractor):
        _check_exact_type(extractor)
    if not isinstance(extractor, TorchvisionExtractor) or not isinstance(extractor.backbone, str):
        raise TypeError(
            "save can only rebuild TorchvisionExtractor backbones given by name; a custom "
            "torch.nn.Module needs its code. Use joblib.dump for this model and load it "
            "only from trusted files."
        )


def _template(detector):
    """The description of an unfitted detector (a TiledDetector's ``detector``), or None."""
    if detector is None:
        return None
    _check_exact_type(detector)
    return {"detector": {k: _jsonable(getattr(detector, k), k) for k in _DETECTOR_PARAMS},
            "extractor": _extractor_description(detector.feature_extractor)}  # fmt: skip


def _contents(model):
    """The arrays and the description (without digests) of a fitted PatchGaussianDetector."""
    arrays = {
        "channel_indices": np.asarray(model.channel_indices_, dtype=np.int64),
        "location": model.gaussian_.location_,
        "shrinkage": model.gaussian_.shrinkage_,
        "trimmed_indices": np.asarray(model.trimmed_indices_, dtype=np.int64),
    }
    # What the fit did, which parameters set after it (compact, shrinkage) do not change.
    gaussian = model.gaussian_
    compact = bool(gaussian._fitted_compact())
    if compact:
        # The factors are float16 values already (compact rounds them at fit):
        # their lower triangles in float16 hold them exactly, in a quarter of the space.
        arrays["cholesky_lower"] = _pack_lower_float16(gaussian.cholesky_)
    else:
        arrays["cholesky"] = gaussian.cholesky_
    config = {
        "format": _MAGIC,
        "format_version": 2 if compact else 1,
        "detector": {k: _jsonable(getattr(model, k), k) for k in _DETECTOR_PARAMS},
        "fitted": {
            "offset": _offset_json(model.offset_),
            "n_features_in": int(model.n_features_in_),
            "input_shape": list(model.input_shape_),
            "aspect_range": list(model.aspect_range_),
            "fitted_on_embeddings": bool(model.fitted_on_embeddings_),
            "grid_shape": list(model.gaussian_.grid_shape_),
            "n_samples_seen": int(model.gaussian_.n_samples_seen_),
            "gaussian_dtype": model.gaussian_.dtype,
            "gaussian_shrinkage": _jsonable(gaussian.shrinkage, "shrinkage"),
            "gaussian_compact": compact,
            "level_slopes": [float(v) for v in model.level_slopes_],
            "log_magnification_range": [[float(v) for v in row] for row in model.log_magnification_range_],
        },
        "extractor": None,
        # The feature_extractor parameter as get_params gives it (the fitted one
        # below may differ: parameters set after fit, or a fit on embeddings).
        "extractor_param": _extractor_description(model.feature_extractor),
    }
    extractor = model.feature_extractor_
    if extractor is not None:
        _check_rebuildable(extractor)
        config["extractor"] = {
            "params": {k: _jsonable(getattr(extractor, k), k) for k in _EXTRACTOR_PARAMS},
            "layers": list(extractor.layers_),
            "resize_shape": list(extractor.resize_shape_),
            # The detector built it (feature_extractor=None): given back as None,
            # so that get_params and a refit are as before.
            "default": model.feature_extractor is None,
        }
        for key, tensor in extractor.model_.state_dict().items():
            arrays[f"backbone/{key}"] = tensor.detach().cpu().numpy()
    return arrays, config


def _read(path):
    arrays = None
    try:
        archive = np.load(path, allow_pickle=False)
        # A .npy file loads as a bare array, not as an archive.
        if isinstance(archive, NpzFile):
            with archive:
                arrays = {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ModelFileError(f"{str(path)!r} is not a readable skpadim model file ({exc}).") from exc
    if arrays is None:
        raise ModelFileError(f"{str(path)!r} is not a skpadim model file (a single array, not an archive).")
    if "config" not in arrays:
        raise ModelFileError(f"{str(path)!r} is not a skpadim model file (no config).")
    try:
        config = json.loads(arrays.pop("config").tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{str(path)!r}: the model description is corrupt ({exc}).") from exc
    return config, arrays


def _check(config, arrays, path):
    if not isinstance(config, dict) or config.get("format") != _MAGIC:
        raise ModelFileError(f"{str(path)!r} is not a skpadim detector file.")
    version = config.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ModelFileError(f"{str(path)!r} has no valid format version.")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{str(path)!r} was written in format version {version}, newer than the "
            f"{FORMAT_VERSION} this skpadim reads; upgrade skpadim to load it."
        )
    digest = _digest(arrays)
    if config.get("sha256") != digest:
        raise ModelFileError(
            f"{str(path)!r}: the arrays do not match the digest recorded when the file was "
            "written; the file was altered or damaged."
        )
    if "sha256_config" in config and config["sha256_config"] != _config_digest(config, digest):
        raise ModelFileError(
            f"{str(path)!r}: the model description does not match the digest recorded when "
            "the file was written; the file was altered or damaged."
        )
    _check_model(config, arrays, path, version)


def _check_model(config, arrays, path, version, maps_only=False):
    """A model's description and arrays (of a version-``version`` layout), and
    those of its localizer; ``maps_only``: it is a localizer, whose offsets are null."""
    # A file can match its digests and still lack entries (written by hand or by
    # another tool): say what is missing rather than fail on it later.
    for section in ("detector", "fitted", "extractor"):
        if section not in config:
            raise ModelFileError(f"{str(path)!r}: the model description has no {section!r} section.")
    _require(config["detector"], [k for k in _DETECTOR_PARAMS if k not in _DETECTOR_PARAM_FALLBACKS],
             "detector", path)
    _require(config["fitted"], _FITTED_KEYS, "fitted", path)
    if config["extractor"] is not None:
        _require(config["extractor"], ("params", "layers", "resize_shape"), "extractor", path)
        _require(config["extractor"]["params"], _EXTRACTOR_PARAMS, "extractor params", path)
        _refuse_unknown(config["extractor"]["params"], _EXTRACTOR_PARAMS, "extractor params", path)
    if config.get("extractor_param") is not None:  # (absent from files of older releases)
        _require(config["extractor_param"], _EXTRACTOR_PARAMS, "extractor_param", path)
        _refuse_unknown(config["extractor_param"], _EXTRACTOR_PARAMS, "extractor_param", path)
        try:
            TorchvisionExtractor(**_extractor_params(config["extractor_param"]))._validate_params()
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"{str(path)!r}: invalid extractor_param: {exc}") from exc
    # Version 3 describes a TiledDetector, 4 a detector with a localizer, which
    # is described as version 3 describes a TiledDetector.
    for section, holder in (("tiled", 3), ("localizer", 4)):
        if (config.get(section) is not None) != (version == holder):
            raise ModelFileError(
                f"{str(path)!r}: format version {version} "
                + (f"needs a {section!r} section." if version == holder
                   else f"cannot hold a {section!r} section.")
            )
    if version == 3:
        _check_tiled(config["tiled"], path, maps_only)
    _check_detector_values(config["detector"], path)
    _check_fitted_values(config["fitted"], path, maps_only)
    if "channel_indices" not in arrays:
        raise ModelFileError(f"{str(path)!r}: the array 'channel_indices' is missing.")
    fitted = config["fitted"]
    h, w = fitted["grid_shape"]
    c = len(arrays["channel_indices"])
    factor_key = "cholesky_lower" if "cholesky_lower" in arrays else "cholesky"
    expected = {"location": (h * w, c), "shrinkage": (h * w,),
                factor_key: (h * w, c * (c + 1) // 2) if factor_key == "cholesky_lower" else (h * w, c, c)}
    for key, shape in expected.items():
        if key not in arrays:
            raise ModelFileError(f"{str(path)!r}: the array {key!r} is missing.")
        if arrays[key].shape != shape:
            raise ModelFileError(
                f"{str(path)!r}: {key} has shape {arrays[key].shape}, expected {shape}."
            )
    if factor_key == "cholesky_lower" and arrays[factor_key].dtype != np.float16:
        raise ModelFileError(f"{str(path)!r}: cholesky_lower has dtype {arrays[factor_key].dtype}.")
    for key in ("location", "cholesky", "shrinkage"):
        if key in arrays and arrays[key].dtype not in (np.float32, np.float64):
            raise ModelFileError(f"{str(path)!r}: {key} has dtype {arrays[key].dtype}.")
    for key in ("location", factor_key):
        # min and max propagate NaN and show infinities, without a mask as large as the array.
        if arrays[key].size and not (np.isfinite(arrays[key].min()) and np.isfinite(arrays[key].max())):
            raise ModelFileError(f"{str(path)!r}: {key} holds NaN or infinite values.")
    # Ledoit-Wolf coefficients lie in [0, 1]; a fixed shrinkage records NaN.
    coefficients = arrays["shrinkage"]
    if _fitted_shrinkage(config) == "ledoit-wolf" and coefficients.size and not (
            coefficients.min() >= 0 and coefficients.max() <= 1):  # (False for NaN)
        raise ModelFileError(f"{str(path)!r}: shrinkage holds Ledoit-Wolf coefficients outside [0, 1].")
    idx = arrays["channel_indices"]
    if idx.dtype.kind not in "iu":
        raise ModelFileError(f"{str(path)!r}: channel_indices has dtype {idx.dtype}, not integers.")
    if idx.size and (idx.min() < 0 or idx.max() >= fitted["n_features_in"]):
        raise ModelFileError(f"{str(path)!r}: channel indices out of range.")
    if version == 3 and config["extractor"] is not None and (
            config["extractor"]["resize_shape"] != config["tiled"]["fitted"]["window"]):
        raise ModelFileError(
            f"{str(path)!r}: the extractor embeds images of {config['extractor']['resize_shape']!r}, "
            f"not the tiled window {config['tiled']['fitted']['window']!r}."
        )
    if maps_only and (config["extractor"] is None or config["fitted"]["fitted_on_embeddings"]):
        raise ModelFileError(f"{str(path)!r}: a localizer embeds its windows, but has no extractor.")
    if version == 4:
        local = config["localizer"]
        _require(local, ("format_version",), "localizer", path)
        try:
            if local["format_version"] != 3:
                raise ModelFileError(f"{str(path)!r}: it is not described as format version 3.")
            _check_model(local, _localizer_arrays(arrays), path, 3, maps_only=True)
        except ModelFileError as exc:
            raise ModelFileError(f"In the 'localizer' section: {exc}") from exc


def _localizer_arrays(arrays):
    return {key[len(_LOCALIZER_PREFIX):]: value for key, value in arrays.items()
            if key.startswith(_LOCALIZER_PREFIX)}  # fmt: skip


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def _offset_json(offset):
    """A threshold as JSON: a localizer's NaN (it serves maps only) as null, which
    strict JSON readers accept."""
    return None if np.isnan(offset) else float(offset)


def _offset_value(value):
    return float("nan") if value is None else value


def _is_offset(value, maps_only):
    """A threshold as written: a number, or null for a localizer."""
    return value is None if maps_only else _is_number(value)


def _is_count(value, least=1):
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _refuse_unknown(section, known, name, path):
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ModelFileError(
            f"{str(path)!r}: the {name!r} section holds unknown entries {', '.join(unknown)}."
        )


def _check_detector_values(params, path, name="detector"):
    """A detector's parameters: only known ones, each valid as the detector
    itself would judge it at fit."""
    _refuse_unknown(params, _DETECTOR_PARAMS, name, path)
    try:
        PatchGaussianDetector(**{**_DETECTOR_PARAM_FALLBACKS, **params})._validate_params()
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{str(path)!r}: invalid {name} parameter: {exc}") from exc


def _fitted_shrinkage(config):
    """The shrinkage the Gaussian was fitted with (files of older releases: the parameter's)."""
    return config["fitted"].get("gaussian_shrinkage", config["detector"]["shrinkage"])


def _check_fitted_values(fitted, path, maps_only=False):
    """The fitted scalars: of the types and ranges a fit gives them, so that a
    hand-edited file fails here and not while scoring."""
    def pair(value, valid):
        return isinstance(value, list) and len(value) == 2 and all(valid(v) for v in value)

    checks = {
        "offset": _is_offset(fitted["offset"], maps_only),
        "n_features_in": _is_count(fitted["n_features_in"]),
        "n_samples_seen": _is_count(fitted["n_samples_seen"]),
        "grid_shape": pair(fitted["grid_shape"], _is_count),
        "input_shape": pair(fitted["input_shape"], _is_count),
        "aspect_range": pair(fitted["aspect_range"], lambda v: _is_number(v) and v > 0),
        "fitted_on_embeddings": isinstance(fitted["fitted_on_embeddings"], bool),
        "gaussian_dtype": fitted["gaussian_dtype"] in ("float32", "float64"),
        # Recorded by newer releases only.
        "gaussian_shrinkage": fitted.get("gaussian_shrinkage", "ledoit-wolf") == "ledoit-wolf"
        or (_is_number(fitted["gaussian_shrinkage"]) and fitted["gaussian_shrinkage"] >= 0),
        "gaussian_compact": isinstance(fitted.get("gaussian_compact", False), bool),
        "level_slopes": pair(fitted.get("level_slopes", [0.0, 0.0]), _is_number),
        "log_magnification_range": pair(fitted.get("log_magnification_range", [[0.0, 0.0]] * 2),
                                        lambda row: pair(row, _is_number)),
    }
    bad = [key for key, ok in checks.items() if not ok]
    if bad:
        raise ModelFileError(
            f"{str(path)!r}: the 'fitted' section holds an invalid {bad[0]}: {fitted[bad[0]]!r}."
        )


def _check_tiled(tiled, path, maps_only=False):
    """The "tiled" section: its entries present, of the right types and only those
    a detector takes, so that a hand-edited file fails here and not while scoring."""
    _require(tiled, ("params", "fitted"), "tiled", path)
    _require(tiled["params"], _TILED_PARAMS, "tiled params", path)
    _require(tiled["fitted"], _TILED_FITTED_KEYS, "tiled fitted", path)
    fitted = tiled["fitted"]
    window = fitted["window"]
    if not (isinstance(window, list) and len(window) == 2 and all(_is_count(v, 16) for v in window)):
        raise ModelFileError(
            f"{str(path)!r}: the tiled window {window!r} is not two sides of 16 pixels or more.")
    if not (_is_number(fitted["scale"]) and fitted["scale"] > 0):
        raise ModelFileError(f"{str(path)!r}: the tiled scale {fitted['scale']!r} is not a positive number.")
    if not _is_count(fitted["n_windows"], 2):
        raise ModelFileError(
            f"{str(path)!r}: the tiled n_windows {fitted['n_windows']!r} is not a count of 2 or more."
        )
    if not _is_offset(fitted["offset"], maps_only):
        raise ModelFileError(f"{str(path)!r}: the tiled offset {fitted['offset']!r} is not "
                             + ("null, as a localizer's is." if maps_only else "a number."))
    template = tiled["params"]["detector"]
    if template is not None:
        _require(template, ("detector", "extractor"), "tiled detector", path)
        _require(template["detector"], [k for k in _DETECTOR_PARAMS if k not in _DETECTOR_PARAM_FALLBACKS],
                 "tiled detector", path)  # fmt: skip
        _check_detector_values(template["detector"], path, "tiled detector")
        if template["extractor"] is not None:
            _require(template["extractor"], _EXTRACTOR_PARAMS, "tiled detector extractor", path)
            _refuse_unknown(template["extractor"], _EXTRACTOR_PARAMS, "tiled detector extractor", path)


def _require(section, keys, name, path):
    if not isinstance(section, dict):
        raise ModelFileError(f"{str(path)!r}: the {name!r} section of the model description is invalid.")
    missing = [key for key in keys if key not in section]
    if missing:
        raise ModelFileError(
            f"{str(path)!r}: the {name!r} section of the model description lacks {', '.join(missing)}."
        )


def _extractor_params(params):
    """Extractor parameters read from JSON: its lists back to the tuples they were."""
    params = dict(params)
    for key in ("layers", "image_size", "crop_size", "mean", "std"):
        if isinstance(params.get(key), list):
            params[key] = tuple(params[key])
    return params


def _rebuild_template(template):
    """The unfitted detector :func:`_template` described, or None."""
    if template is None:
        return None
    extractor = template["extractor"]
    if extractor is not None:
        extractor = TorchvisionExtractor(**_extractor_params(extractor))
    return PatchGaussianDetector(extractor, **{**_DETECTOR_PARAM_FALLBACKS, **template["detector"]})


def _rebuild_extractor(description, arrays, path):
    params = _extractor_params(description["params"])
    # Build the architecture alone (no weights are looked for), read the same
    # layers as at save time, then put the stored weights in.
    weights = params.pop("weights")
    # The size as resolved at fit ("auto" depends on the training images).
    resolved = {"layers": tuple(description["layers"]), "image_size": tuple(description["resize_shape"])}
    # fit() initialises the architecture at random before the stored weights
    # replace it: on a copy of torch's random state, which load leaves as it was.
    with torch.random.fork_rng(devices=[]):
        extractor = TorchvisionExtractor(weights=None, **{**params, **resolved}).fit()
    state = {
        k[len("backbone/"):]: torch.from_numpy(v)
        for k, v in arrays.items()
        if k.startswith("backbone/")
    }
    try:
        extractor.model_.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelFileError(f"{str(path)!r}: backbone weights do not fit ({exc}).") from exc
    # The parameters go back to what the user set, so that a refit behaves as before.
    return extractor.set_params(weights=weights, layers=params["layers"], image_size=params["image_size"])


def load(path):
    """Read a detector written by :func:`save`, without unpickling anything.

    Parameters
    ----------
    path : str or path-like
        A file written by :func:`save`.

    Returns
    -------
    model : PatchGaussianDetector or TiledDetector
        The fitted detector, of the type saved, scoring exactly as the one
        saved; its backbone is rebuilt from the architecture's code and the
        stored weights, on the CPU, with no network access.

    Raises
    ------
    ModelFileError
        If the file is not a skpadim model, was written by a newer format
        version, or is truncated or altered.

    Examples
    --------
    See :func:`save`.
    """
    config, arrays = _read(path)
    _check(config, arrays, path)
    return _build(config, arrays, path)


def _build(config, arrays, path):
    """The fitted detector of a checked description and its arrays."""
    fitted = config["fitted"]
    params = {**_DETECTOR_PARAM_FALLBACKS, **config["detector"]}
    det = PatchGaussianDetector(**params)
    if config["extractor"] is not None:
        det.feature_extractor_ = _rebuild_extractor(config["extractor"], arrays, path)
        if not config["extractor"].get("default", False):
            det.set_params(feature_extractor=clone(det.feature_extractor_))
    else:
        det.feature_extractor_ = None
    if "extractor_param" in config:  # the parameter as it was, where the file records it
        param = config["extractor_param"]
        det.set_params(feature_extractor=None if param is None
                       else TorchvisionExtractor(**_extractor_params(param)))  # fmt: skip
    gaussian = PatchCovariance(
        shrinkage=_fitted_shrinkage(config), device=params["device"],
        dtype=fitted["gaussian_dtype"], store_covariance=False,
        compact=fitted.get("gaussian_compact", params["compact"]),
    )
    gaussian.location_ = np.ascontiguousarray(arrays["location"])
    if "cholesky_lower" in arrays:
        gaussian.cholesky_ = _unpack_lower(arrays["cholesky_lower"], len(arrays["channel_indices"]),
                                           fitted["gaussian_dtype"])
    else:
        gaussian.cholesky_ = np.ascontiguousarray(arrays["cholesky"])
    gaussian.shrinkage_ = arrays["shrinkage"]
    gaussian.grid_shape_ = tuple(fitted["grid_shape"])
    gaussian.n_features_in_ = len(arrays["channel_indices"])
    gaussian.n_samples_seen_ = fitted["n_samples_seen"]
    det.gaussian_ = gaussian
    det.channel_indices_ = arrays["channel_indices"]
    det.offset_ = _offset_value(fitted["offset"])
    det.trimmed_indices_ = arrays.get("trimmed_indices", np.array([], dtype=np.int64))
    det.n_features_in_ = fitted["n_features_in"]
    det.input_shape_ = tuple(fitted["input_shape"])
    det.aspect_range_ = tuple(fitted["aspect_range"])
    # (Files of older releases: no calibration.)
    det.level_slopes_ = np.asarray(fitted.get("level_slopes", [0.0, 0.0]), dtype=np.float64)
    det.log_magnification_range_ = np.asarray(fitted.get("log_magnification_range", [[0.0, 0.0]] * 2),
                                              dtype=np.float64)  # fmt: skip
    det.fitted_on_embeddings_ = fitted["fitted_on_embeddings"]
    det.localizer_ = None
    if config.get("localizer") is not None:
        det.localizer_ = _build(config["localizer"], _localizer_arrays(arrays), path)
    if config.get("tiled") is None:
        return det
    params, fitted = config["tiled"]["params"], config["tiled"]["fitted"]
    window = params["window"]
    tiled = TiledDetector(_rebuild_template(params["detector"]), short_side=params["short_side"],
                          window=tuple(window) if isinstance(window, list) else window)  # fmt: skip
    tiled.detector_ = det
    tiled.scale_ = fitted["scale"]
    tiled.window_ = tuple(fitted["window"])
    tiled.n_windows_ = fitted["n_windows"]
    tiled.offset_ = _offset_value(fitted["offset"])
    return tiled
