import doctest
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import skpadim.datasets
from skpadim.datasets import (
    load_images,
    load_masks,
    load_mvtec,
    load_mvtec_arrays,
    make_textures,
    write_mvtec,
)

MAGNETIC_TILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "magnetic_tile"
DEFECTS = ("scratch", "stain", "hole", "patch")


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _grey(h=20, w=30, value=100):
    return np.full((h, w), value, dtype=np.uint8)


def _mvtec_tree(root, defect_ext=".png", mask_name="{stem}_mask.png"):
    """A minimal MVTec-layout folder: 2 train, 1 good test, 2 'dent' test images."""
    for name in ("000.png", "001.png"):
        _save(root / "train" / "good" / name, _grey())
    _save(root / "test" / "good" / "000.png", _grey())
    for i in range(2):
        stem = f"{i:03d}"
        _save(root / "test" / "dent" / (stem + defect_ext), _grey(value=50))
        mask = np.zeros((20, 30), dtype=np.uint8)
        mask[5:10, 5 + i : 15] = 255
        _save(root / "ground_truth" / "dent" / mask_name.format(stem=stem), mask)
    return root


# -- make_textures -----------------------------------------------------------


@pytest.mark.parametrize("texture", ["brick", "grass", "gravel"])
def test_make_textures_shapes_and_dtypes(texture):
    data = make_textures(texture, n_train=5, n_test=8, image_size=48, random_state=0)
    assert data.X_train.shape == (5, 48, 48, 3) and data.X_train.dtype == np.uint8
    assert data.X_test.shape == (8, 48, 48, 3) and data.X_test.dtype == np.uint8
    assert data.y_test.shape == (8,) and data.y_test.dtype.kind == "i"
    assert set(data.y_test.tolist()) <= {0, 1}
    assert data.masks_test.shape == (8, 48, 48) and data.masks_test.dtype == bool
    assert data.defect_types.shape == (8,) and data.defect_types.dtype.kind == "U"
    assert texture in data.DESCR
    # Greyscale replicated to RGB.
    assert (data.X_train[..., 0] == data.X_train[..., 2]).all()
    assert (data.X_test[..., 1] == data.X_test[..., 2]).all()


def test_make_textures_is_deterministic():
    a = make_textures(n_train=6, n_test=10, image_size=64, random_state=3)
    b = make_textures(n_train=6, n_test=10, image_size=64, random_state=3)
    c = make_textures(n_train=6, n_test=10, image_size=64, random_state=4)
    for key in ("X_train", "X_test", "y_test", "masks_test", "defect_types"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a.X_train, c.X_train)
    assert not np.array_equal(a.X_test, c.X_test)


class _BackwardsSet(set):
    """A set iterated in reverse sorted order: like any set's, an order that depends
    on string hashing, which differs from one Python process to the next."""

    def __iter__(self):
        return iter(sorted(super().__iter__(), reverse=True))


def test_make_textures_reproduces_with_a_set_of_defects():
    kwargs = dict(n_train=1, n_test=8, defect_ratio=1.0, image_size=32, random_state=0)
    listed = make_textures(defects=("scratch", "stain", "hole", "patch"), **kwargs)
    as_set = make_textures(defects=_BackwardsSet({"scratch", "stain", "hole", "patch"}), **kwargs)
    np.testing.assert_array_equal(as_set.defect_types, listed.defect_types)
    np.testing.assert_array_equal(as_set.X_test, listed.X_test)


def test_make_textures_accepts_random_state_instance():
    a = make_textures(n_train=2, n_test=2, image_size=32, random_state=np.random.RandomState(5))
    b = make_textures(n_train=2, n_test=2, image_size=32, random_state=5)
    np.testing.assert_array_equal(a.X_test, b.X_test)


def test_train_and_test_tiles_are_distinct_crops():
    data = make_textures(n_train=20, n_test=20, defect_ratio=0, image_size=64, random_state=0)
    train = {x.tobytes() for x in data.X_train}
    assert not any(x.tobytes() in train for x in data.X_test)
    assert len(train) == 20  # no two training tiles identical either


def test_masks_non_empty_exactly_for_defective_images():
    data = make_textures(n_train=1, n_test=40, image_size=64, random_state=1)
    has_mask = data.masks_test.reshape(40, -1).any(axis=1)
    np.testing.assert_array_equal(has_mask, data.y_test == 1)
    np.testing.assert_array_equal(data.y_test == 1, data.defect_types != "good")
    assert data.y_test.sum() == 20


@pytest.mark.parametrize("ratio, expected", [(0.0, 0), (0.25, 5), (1.0, 20)])
def test_defect_ratio_sets_the_number_of_defective_images(ratio, expected):
    data = make_textures(n_train=1, n_test=20, defect_ratio=ratio, image_size=32, random_state=0)
    assert data.y_test.sum() == expected


def test_every_defect_type_appears_evenly():
    data = make_textures(n_train=1, n_test=40, defect_ratio=0.5, image_size=64, random_state=2)
    names, counts = np.unique(data.defect_types, return_counts=True)
    assert dict(zip(names.tolist(), counts.tolist())) == {
        "good": 20, "hole": 5, "patch": 5, "scratch": 5, "stain": 5
    }
    only = make_textures(n_train=1, n_test=6, defects=["hole"], image_size=64, random_state=2)
    assert set(only.defect_types.tolist()) == {"good", "hole"}


@pytest.mark.parametrize("texture", ["brick", "grass", "gravel"])
def test_defects_change_the_tile_inside_the_mask_only(texture):
    # With a fixed seed the clean test tiles do not depend on defect_ratio, so
    # the defect-free version of every test tile is available for comparison.
    kwargs = dict(n_train=1, n_test=24, image_size=96, random_state=11)
    data = make_textures(texture, defect_ratio=1.0, **kwargs)
    clean = make_textures(texture, defect_ratio=0.0, **kwargs)
    assert clean.y_test.sum() == 0
    diff = np.abs(data.X_test[..., 0].astype(int) - clean.X_test[..., 0])
    for name in DEFECTS:
        idx = data.defect_types == name
        assert idx.sum() == 6
        inside = diff[idx][data.masks_test[idx]].mean()
        outside = diff[idx][~data.masks_test[idx]].mean()
        assert inside > 25, (name, inside)
        assert outside < 1.5, (name, outside)
        # Defects are not tiny: at least 0.3 % of the tile, on every image.
        assert data.masks_test[idx].reshape(6, -1).mean(axis=1).min() > 0.003


def test_defect_sizes_scale_with_the_tile():
    small = make_textures(n_train=1, n_test=40, image_size=64, random_state=0)
    large = make_textures(n_train=1, n_test=40, image_size=256, random_state=0)
    frac_small = small.masks_test[small.y_test == 1].mean()
    frac_large = large.masks_test[large.y_test == 1].mean()
    assert 0.3 < frac_large / frac_small < 3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(texture="wood"), ValueError, "brick, grass, gravel"),
        (dict(n_train=0), ValueError, "n_train"),
        (dict(n_test=0), ValueError, "n_test"),
        (dict(n_train=2.5), TypeError, "n_train"),
        (dict(defect_ratio=1.5), ValueError, "defect_ratio"),
        (dict(defect_ratio=-0.1), ValueError, "defect_ratio"),
        (dict(defect_ratio=float("nan")), ValueError, "defect_ratio"),
        (dict(image_size=31), ValueError, "image_size"),
        (dict(image_size=513), ValueError, "image_size"),
        (dict(defects=("scratch", "crack")), ValueError, "crack"),
        (dict(defects=()), ValueError, "at least one"),
    ],
)
def test_make_textures_validates_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_textures(**kwargs)


def test_make_textures_extreme_sizes():
    data = make_textures(
        "gravel", n_train=1, n_test=4, defect_ratio=1, image_size=32, random_state=0
    )
    assert data.masks_test.reshape(4, -1).any(axis=1).all()
    data = make_textures("grass", n_train=2, n_test=1, image_size=512, random_state=0)
    assert data.X_train.shape == (2, 512, 512, 3)


# -- write_mvtec / load_mvtec round trip --------------------------------------


def test_write_then_load_round_trip(tmp_path):
    kwargs = dict(n_train=5, n_test=12, image_size=64, random_state=0)
    path = write_mvtec(tmp_path, "gravel", **kwargs)
    assert path == tmp_path / "gravel"
    data = make_textures("gravel", **kwargs)

    assert sorted(p.name for p in (path / "train" / "good").iterdir()) == [
        f"{i:03d}.png" for i in range(5)
    ]
    for name in DEFECTS:
        n = int((data.defect_types == name).sum())
        images = sorted(p.name for p in (path / "test" / name).iterdir())
        masks = sorted(p.name for p in (path / "ground_truth" / name).iterdir())
        assert images == [f"{i:03d}.png" for i in range(n)]
        assert masks == [f"{i:03d}_mask.png" for i in range(n)]
    assert not (path / "ground_truth" / "good").exists()

    frame = load_mvtec(path)
    assert frame.columns.tolist() == ["path", "split", "label", "defect_type", "mask_path"]
    assert len(frame) == 17
    assert frame["split"].tolist() == ["train"] * 5 + ["test"] * 12
    test = frame[frame.split == "test"]
    assert test["label"].sum() == data.y_test.sum() == 6
    assert (test["label"] == (test["defect_type"] != "good")).all()
    assert test.loc[test.label == 0, "mask_path"].isna().all()
    assert frame["defect_type"].tolist() == sorted(frame["defect_type"].iloc[:5]) + sorted(
        test["defect_type"]
    )

    # PNG is lossless: the files hold exactly the generated arrays.
    X_train = load_images(frame.loc[frame.split == "train", "path"], size=None)
    np.testing.assert_array_equal(np.stack(X_train), data.X_train)
    written = {}
    for name in np.unique(data.defect_types):
        idx = np.flatnonzero(data.defect_types == name)
        for number, i in enumerate(idx):
            written[str(path / "test" / name / f"{number:03d}.png")] = i
    X_test, y_test, masks = load_mvtec_arrays(frame, split="test")
    for row, x, y, m in zip(test.itertuples(), X_test, y_test, masks):
        i = written[row.path]
        np.testing.assert_array_equal(x, data.X_test[i])
        np.testing.assert_array_equal(m, data.masks_test[i])
        assert y == data.y_test[i]
    raw = np.asarray(Image.open(test.loc[test.label == 1, "mask_path"].iloc[0]))
    assert raw.ndim == 2 and set(np.unique(raw).tolist()) == {0, 255}


def test_write_mvtec_load_with_category(tmp_path):
    write_mvtec(
        tmp_path, "tiles", texture="brick", n_train=2, n_test=2, image_size=32, random_state=0
    )
    frame = load_mvtec(tmp_path, category="tiles")
    assert len(frame) == 4


def test_write_mvtec_names_a_root_that_is_not_a_folder(tmp_path):
    # pathlib's own errors came out of it, after the textures were drawn.
    with pytest.raises(TypeError, match="root must be a folder path"):
        write_mvtec(None, "brick")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        write_mvtec(tmp_path / "file.txt", "brick")
    assert (tmp_path / "file.txt").read_text() == "x"


def test_write_mvtec_refuses_to_overwrite(tmp_path):
    path = write_mvtec(tmp_path, "brick", n_train=3, n_test=4, image_size=32, random_state=0)
    (path / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(path) for p in path.rglob("*"))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_mvtec(tmp_path, "brick", n_train=2, n_test=2, image_size=32, random_state=1)
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == before
    for overwrite in ("no", "False", 1, None):  # truthy ones deleted the folders
        with pytest.raises(TypeError, match="overwrite must be True or False"):
            write_mvtec(tmp_path, "brick", n_train=2, n_test=2, image_size=32, overwrite=overwrite)
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == before

    write_mvtec(tmp_path, "brick", n_train=2, n_test=2, defect_ratio=0, image_size=32,
                random_state=1, overwrite=True)
    frame = load_mvtec(path)
    assert len(frame) == 4  # no stale files from the first, larger set
    assert (path / "notes.txt").read_text() == "mine"
    assert not (path / "ground_truth").exists()


def test_write_mvtec_writes_into_an_empty_existing_folder(tmp_path):
    (tmp_path / "grass").mkdir()
    write_mvtec(tmp_path, "grass", n_train=1, n_test=1, image_size=32, random_state=0)
    assert (tmp_path / "grass" / "train" / "good" / "000.png").is_file()


@pytest.mark.parametrize("category", ["tiles", "a/b", ""])
def test_write_mvtec_validates_category(tmp_path, category):
    with pytest.raises(ValueError, match="category"):
        write_mvtec(tmp_path, category, n_train=1, n_test=1, image_size=32)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("category", ["..", "."])
def test_write_mvtec_never_writes_outside_root(tmp_path, category):
    # With overwrite, ".." would have replaced the train/ folder beside root.
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="plain folder name"):
        write_mvtec(root, category, texture="brick", overwrite=True, n_train=1, n_test=1,
                    image_size=32)  # fmt: skip
    assert (tmp_path / "train" / "keep.txt").read_text() == "user data"
    assert not any(root.iterdir())


# -- load_mvtec on user folders -----------------------------------------------


def test_load_mvtec_sorting_extensions_and_alternative_mask_names(tmp_path):
    root = _mvtec_tree(tmp_path / "cat", defect_ext=".JPG", mask_name="{stem}.png")
    _save(root / "train" / "good" / "10.png", _grey())
    _save(root / "train" / "good" / "2.bmp", _grey())
    (root / "train" / "good" / ".DS_Store").write_bytes(b"junk")
    (root / "train" / "good" / "notes.txt").write_text("not an image")
    frame = load_mvtec(root)
    train = [Path(p).name for p in frame.loc[frame.split == "train", "path"]]
    assert train == ["000.png", "001.png", "2.bmp", "10.png"]
    dent = frame[frame.defect_type == "dent"]
    assert [Path(p).name for p in dent["mask_path"]] == ["000.png", "001.png"]
    assert frame["label"].tolist() == [0] * 4 + [1, 1, 0]
    assert frame["defect_type"].tolist()[4:] == ["dent", "dent", "good"]


def test_load_mvtec_prefers_mask_suffix(tmp_path):
    root = _mvtec_tree(tmp_path / "cat")
    _save(root / "ground_truth" / "dent" / "000.png", np.zeros((20, 30), np.uint8))
    frame = load_mvtec(root)
    assert Path(frame["mask_path"].dropna().iloc[0]).name == "000_mask.png"


def test_load_mvtec_arrays_at_native_and_fixed_size(tmp_path):
    root = _mvtec_tree(tmp_path / "cat")
    X, y, masks = load_mvtec_arrays(root, split="test")
    assert isinstance(X, list) and [x.shape for x in X] == [(20, 30, 3)] * 3
    assert y.tolist() == [1, 1, 0]
    assert [m.sum() for m in masks] == [50, 45, 0]
    X, y, masks = load_mvtec_arrays(tmp_path, category="cat", split="train", size=(10, 16))
    assert X.shape == (2, 10, 16, 3) and X.dtype == np.uint8
    assert masks.shape == (2, 10, 16) and not masks.any()
    with pytest.raises(ValueError, match="split"):
        load_mvtec_arrays(root, split="val")
    with pytest.raises(ValueError, match="category"):
        load_mvtec_arrays(load_mvtec(root), category="cat")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['mask_path'\]"):
        load_mvtec_arrays(load_mvtec(root).drop(columns="mask_path"))
    # An edited frame: labels and masks must agree, and the split must have rows.
    frame = load_mvtec(root)
    unmasked = frame.assign(mask_path=None)
    with pytest.raises(ValueError, match="2 image.* is defective .* but has no mask_path"):
        load_mvtec_arrays(unmasked)
    relabelled = frame.assign(label=1)
    with pytest.raises(ValueError, match="is defective .* but has no mask_path"):
        load_mvtec_arrays(relabelled, split="train")
    with pytest.raises(ValueError, match="is good .* but has a mask_path"):
        load_mvtec_arrays(frame.assign(label=0))
    with pytest.raises(ValueError, match=r"label column must hold 0 .* or 1 .*; got \[2\]"):
        load_mvtec_arrays(frame.assign(label=frame.label * 2))
    with pytest.raises(ValueError, match="no 'train' rows"):
        load_mvtec_arrays(frame[frame.split == "test"], split="train")


def test_load_mvtec_missing_root_and_category(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mvtec(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="file.txt"):
        load_mvtec(tmp_path / "file.txt")
    _mvtec_tree(tmp_path / "bottle")
    _mvtec_tree(tmp_path / "screw")
    with pytest.raises(FileNotFoundError, match="bottle, screw"):
        load_mvtec(tmp_path, category="cable")
    # The data-set root given as if it were a category folder.
    with pytest.raises(FileNotFoundError, match="pass category="):
        load_mvtec(tmp_path)
    with pytest.raises(TypeError, match="category must be a folder name"):
        load_mvtec(tmp_path, 3)


def test_load_mvtec_wrong_layout(tmp_path):
    (tmp_path / "cat" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="train.good"):
        load_mvtec(tmp_path / "cat")
    (tmp_path / "cat" / "train" / "good").mkdir()
    with pytest.raises(ValueError, match="No images"):
        load_mvtec(tmp_path / "cat")
    _save(tmp_path / "cat" / "train" / "good" / "000.png", _grey())
    with pytest.raises(FileNotFoundError, match="test"):
        load_mvtec(tmp_path / "cat")
    (tmp_path / "cat" / "test" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="No images"):
        load_mvtec(tmp_path / "cat")


def test_load_mvtec_missing_mask(tmp_path):
    root = _mvtec_tree(tmp_path / "cat")
    (root / "ground_truth" / "dent" / "001_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"001\.png.*001_mask\.png"):
        load_mvtec(root)


# -- load_images / load_masks -----------------------------------------------------


def test_load_images_sizes_and_greyscale(tmp_path):
    _save(tmp_path / "grey.png", _grey(20, 30, 7))
    rgb = np.zeros((12, 8, 3), dtype=np.uint8)
    rgb[..., 1] = 200
    _save(tmp_path / "rgb.png", rgb)
    paths = [tmp_path / "grey.png", str(tmp_path / "rgb.png")]
    images = load_images(paths)
    assert [x.shape for x in images] == [(20, 30, 3), (12, 8, 3)]
    assert (images[0] == 7).all()
    np.testing.assert_array_equal(images[1], rgb)
    assert load_images(paths, size=16).shape == (2, 16, 16, 3)
    fixed = load_images(paths, size=(10, 6))
    assert fixed.shape == (2, 10, 6, 3) and fixed.dtype == np.uint8
    assert (fixed[1, ..., 1] == 200).all()
    assert load_images([], size=4).shape == (0, 4, 4, 3)
    with pytest.raises(TypeError, match="single path"):
        load_images(str(tmp_path / "grey.png"))
    with pytest.raises(TypeError, match="paths must be a list of paths, got 5"):
        load_images(5)
    for bad in (3, b"grey.png", None):
        with pytest.raises(TypeError, match=r"paths\[1\] must be a path"):
            load_images([paths[0], bad])
    # Masks take None (a good image) too, but nothing else that is not a path.
    for bad in (3, b"m.png"):
        with pytest.raises(TypeError, match=r"mask_paths\[0\] must be a path .* or None"):
            load_masks([bad], size=4)


def test_load_images_unreadable_files(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a PNG file" * 20)
    with pytest.raises(ValueError, match="garbage.png"):
        load_images([garbage])

    full = tmp_path / "full.png"
    _save(full, np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.png"):
        load_images([full, truncated], size=8)

    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_images([tmp_path / "missing.png"])
    with pytest.raises(TypeError, match=r"paths\[1\] must be a path .* got None"):
        load_images([full, None])


def test_load_masks(tmp_path):
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[2:6, 3:9] = 255
    _save(tmp_path / "m.png", mask)
    _save(tmp_path / "binary01.png", (mask > 0).astype(np.uint8))
    masks = load_masks([tmp_path / "m.png", None, tmp_path / "binary01.png"],
                       shapes=[(20, 30), (5, 7), (20, 30)])
    assert [m.shape for m in masks] == [(20, 30), (5, 7), (20, 30)]
    assert all(m.dtype == bool for m in masks)
    np.testing.assert_array_equal(masks[0], mask > 0)
    assert not masks[1].any()
    np.testing.assert_array_equal(masks[2], mask > 0)

    resized = load_masks([tmp_path / "m.png", None], size=(10, 15))
    assert resized.shape == (2, 10, 15) and resized.dtype == bool
    # Halved each way: a pixel is a defect if any of the four it covers is.
    np.testing.assert_array_equal(resized[0], (mask > 0).reshape(10, 2, 15, 2).any(axis=(1, 3)))
    assert not resized[1].any()

    with pytest.raises(ValueError, match="shapes nor size"):
        load_masks([None])
    with pytest.raises(ValueError, match="shape"):
        load_masks([tmp_path / "m.png"], shapes=[(30, 20)])
    with pytest.raises(ValueError, match="entries"):
        load_masks([None, None], shapes=[(3, 3)])
    (tmp_path / "bad_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match="bad_mask.png"):
        load_masks([tmp_path / "bad_mask.png"])
    # pandas' missing value, as a frame with a nullable string column holds it.
    assert not load_masks([pd.NA], shapes=[(4, 5)])[0].any()
    for shapes in ([5], [(0, 3)], ["ab"]):
        with pytest.raises(ValueError, match=r"shapes\[0\] must be an image shape"):
            load_masks([None], shapes=shapes)


def test_load_masks_keeps_small_defects_when_shrinking(tmp_path):
    # Nearest-neighbour sampling dropped defects narrower than its step: their
    # image came back with an empty mask and counted as good.
    rng = np.random.default_rng(0)
    for k in range(20):
        mask = np.zeros((97, 131), dtype=np.uint8)
        r, c = rng.integers(0, 95), rng.integers(0, 129)
        mask[r : r + 2, c : c + 2] = 255
        _save(tmp_path / f"m{k}.png", mask)
    small = load_masks([tmp_path / f"m{k}.png" for k in range(20)], size=(13, 17))
    assert small.any(axis=(1, 2)).all()
    # Against a plain reference: output pixel (i, j) covers rows [i * 97 // 13,
    # (i + 1) * 97 // 13) and the like for columns.
    full = load_masks([tmp_path / "m0.png"])[0]
    rows, cols = np.arange(14) * 97 // 13, np.arange(18) * 131 // 17
    expected = [[full[rows[i]:rows[i + 1], cols[j]:cols[j + 1]].any() for j in range(17)]
                for i in range(13)]
    np.testing.assert_array_equal(small[0], expected)
    # Growing repeats pixels, as nearest neighbour does; a mixed resize does both.
    np.testing.assert_array_equal(load_masks([tmp_path / "m0.png"], size=(194, 262))[0],
                                  full.repeat(2, axis=0).repeat(2, axis=1))
    by_columns = np.stack([full[:, cols[j]:cols[j + 1]].any(axis=1) for j in range(17)], axis=1)
    np.testing.assert_array_equal(load_masks([tmp_path / "m0.png"], size=(194, 17))[0],
                                  by_columns.repeat(2, axis=0))


@pytest.mark.parametrize("high", [1, 255, 65535])
def test_load_masks_reads_16_bit_masks_of_labels_and_of_full_range(tmp_path, high):
    # A 16-bit mask of 0/1 was divided by 257 like an image and read empty.
    mask = np.zeros((12, 10), dtype=np.uint16)
    mask[3:7, 2:5] = high
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert Image.open(tmp_path / "m.png").mode.startswith("I")
    np.testing.assert_array_equal(load_masks([tmp_path / "m.png"])[0], mask > 0)
    # Below the threshold on 8-bit levels, as in an 8-bit file: no defect.
    mask[3:7, 2:5] = 100 if high != 65535 else 100 * 257
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert not load_masks([tmp_path / "m.png"])[0].any()


@pytest.mark.parametrize("mode", ["RGB", "P"])
@pytest.mark.parametrize("colour", [(255, 0, 0), (0, 0, 255), (255, 255, 255)])
def test_load_masks_reads_colour_masks_by_their_brightest_channel(tmp_path, mode, colour):
    # Pure red or blue is below the threshold as a grey level (76, 29).
    rgb = np.zeros((12, 10, 3), dtype=np.uint8)
    rgb[4:8, 2:6] = colour
    Image.fromarray(rgb).convert(mode).save(tmp_path / "m.png")
    expected = rgb.max(axis=2) > 0
    np.testing.assert_array_equal(load_masks([tmp_path / "m.png"])[0], expected)
    resized = load_masks([tmp_path / "m.png"], size=(6, 5))[0]
    assert resized.sum() == expected.sum() // 4


# -- real data ------------------------------------------------------------------


@pytest.mark.skipif(
    not MAGNETIC_TILE.is_dir(),
    reason="the magnetic_tile data set is not in shared/data beside the checkout",
)
def test_load_mvtec_on_magnetic_tile():
    frame = load_mvtec(MAGNETIC_TILE)
    counts = frame.groupby(["split", "defect_type"]).size().to_dict()
    assert counts == {
        ("train", "good"): 600,
        ("test", "good"): 150,
        ("test", "blowhole"): 115,
        ("test", "break"): 85,
        ("test", "crack"): 57,
    }
    assert frame["label"].sum() == 257
    assert frame.loc[frame.label == 1, "mask_path"].str.endswith("_mask.png").all()
    assert frame.loc[frame.label == 0, "mask_path"].isna().all()

    test = frame[frame.split == "test"]
    sample = pd.concat(
        [test[test.defect_type == d].head(2) for d in ("blowhole", "break", "crack", "good")]
    )
    images = load_images(sample["path"])
    masks = load_masks(sample["mask_path"], shapes=[x.shape[:2] for x in images])
    assert len({x.shape for x in images}) > 1  # sizes vary in this set
    for x, m, label in zip(images, masks, sample["label"]):
        assert x.ndim == 3 and x.shape[2] == 3 and x.dtype == np.uint8
        assert m.shape == x.shape[:2]
        assert m.any() == bool(label)
    X, y, M = load_mvtec_arrays(sample, size=64)
    assert X.shape == (8, 64, 64, 3) and y.tolist() == [1] * 6 + [0] * 2
    assert M[:6].reshape(6, -1).any(axis=1).all() and not M[6:].any()
    # Shrunk a lot, every defective image still has a defect (nearest-neighbour
    # sampling left 74 of the 257 empty at this size).
    small = load_masks(test["mask_path"].tolist(), size=24)
    np.testing.assert_array_equal(small.any(axis=(1, 2)), test["label"].to_numpy() == 1)


# -- docstrings -------------------------------------------------------------------


def test_doctests():
    result = doctest.testmod(skpadim.datasets, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
