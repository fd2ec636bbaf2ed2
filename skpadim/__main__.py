"""Command line: ``python -m skpadim demo`` fits the default detector offline.

The demo cuts tiles from real texture photographs shipped with scikit-image, paints
synthetic defects with exact masks, fits :class:`~skpadim.PatchGaussianDetector`
with its defaults (EfficientNet-Lite0 ImageNet weights that come with pip), prints
image- and pixel-level AUROC per texture, and writes a PNG of test images with their
anomaly maps overlaid.
"""

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

TEXTURES = ("brick", "grass", "gravel")


def _colormap(values):
    """Values in [0, 1] -> RGB uint8 with a blue-green-yellow-red ramp."""
    anchors = np.array(
        [[0, 0, 0.5], [0, 0.3, 1], [0, 0.9, 0.6], [1, 0.9, 0], [1, 0.2, 0], [0.6, 0, 0]]
    )
    pos = np.clip(values, 0, 1) * (len(anchors) - 1)
    low = np.floor(pos).astype(int).clip(max=len(anchors) - 2)
    frac = (pos - low)[..., None]
    rgb = anchors[low] * (1 - frac) + anchors[low + 1] * frac
    return (rgb * 255).astype(np.uint8)


def overlay(image, amap, vmin, vmax, alpha=0.45):
    """Blend an anomaly map (higher = hotter) over an RGB uint8 image."""
    heat = _colormap((amap - vmin) / max(vmax - vmin, 1e-12)).astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + heat * alpha).astype(np.uint8)


def _outline(mask):
    inner = mask.copy()
    inner[1:-1, 1:-1] = (
        mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    )
    return mask & ~inner


def figure_rows(images, maps, masks, vmin, vmax):
    """One row of the figure: image with the true defect outlined | map overlaid."""
    tiles = []
    for img, amap, mask in zip(images, maps, masks):
        shown = img.copy()
        shown[_outline(mask)] = (255, 0, 255)
        tiles.append(np.concatenate([shown, overlay(img, amap, vmin, vmax)], axis=0))
    gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
    row = [tiles[0]]
    for t in tiles[1:]:
        row += [gap, t]
    return np.concatenate(row, axis=1)


def run_demo(textures=TEXTURES, n_train=60, n_test=40, image_size=224, out="skpadim-demo.png",
             random_state=0, stream=sys.stdout):
    """Fit and evaluate the default detector on each texture; return the results."""
    from PIL import Image

    from . import PatchGaussianDetector
    from .datasets import make_textures
    from .metrics import image_auroc, pixel_auroc
    from .persistence import _write_atomically

    print(f"Per texture: fit the default detector on {n_train} good tiles of {image_size} px, "
          f"then score {n_test} test tiles (about half with a painted defect).", file=stream)
    print(f"{'texture':<8} {'image AUROC':>11} {'pixel AUROC':>11} {'fit s':>7} {'score img/s':>11}",
          file=stream, flush=True)
    results, rows, counts = [], [], set()
    for k, texture in enumerate(textures):
        data = make_textures(texture, n_train=n_train, n_test=n_test, image_size=image_size,
                             random_state=random_state + k)
        det = PatchGaussianDetector(random_state=random_state)
        start = time.perf_counter()
        det.fit(data.X_train)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        maps = det.anomaly_maps(data.X_test)
        scores = -det.score_samples(data.X_test)
        rate = 2 * len(data.X_test) / (time.perf_counter() - start)  # both passes
        res = {
            "texture": texture,
            "image_auroc": image_auroc(data.y_test, scores),
            "pixel_auroc": pixel_auroc(data.masks_test, maps),
            "fit_seconds": fit_s,
            "images_per_second": rate,
        }
        results.append(res)
        print(f"{texture:<8} {res['image_auroc']:>11.3f} {res['pixel_auroc']:>11.3f} "
              f"{fit_s:>7.1f} {rate:>11.1f}", file=stream, flush=True)
        defective = np.flatnonzero(data.y_test == 1)[:4].tolist()
        good = np.flatnonzero(data.y_test == 0)[:1].tolist()
        counts.add((len(defective), len(good)))
        shown = defective + good
        rows.append(figure_rows(data.X_test[shown], maps[shown], data.masks_test[shown],
                                vmin=np.percentile(maps, 1), vmax=np.percentile(maps, 99.9)))
    if out:
        gap = np.full((6, rows[0].shape[1], 3), 255, np.uint8)
        grid = np.concatenate([x for r in rows for x in (r, gap)][:-1], axis=0)
        # Through a temporary file of the same suffix (PIL picks the format by it).
        _write_atomically(Path(out).resolve(), Image.fromarray(grid).save, suffix=Path(out).suffix)
        n_defective, n_good = max(counts)
        upto = "" if len(counts) == 1 else "up to "
        print(f"wrote {out}: a row per texture ({', '.join(textures)}), {upto}{n_defective} "
              f"defective and {n_good} good test tile{'s' if n_good > 1 else ''} (top: the "
              "defect outlined in magenta; bottom: the anomaly map, hotter = more anomalous)",
              file=stream)
    return results


def _int_in_range(minimum, maximum=None):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


def _check_out(out, parser):
    """Fail before any fitting if the figure could not be written."""
    if not out:
        return
    path = Path(out)
    if path.is_dir():
        parser.error(f"--out {out!r} is a folder; give a file name such as demo.png.")
    folder = path.resolve().parent
    if not folder.is_dir():
        parser.error(f"--out: the folder {str(folder)!r} does not exist.")
    if not os.access(folder, os.W_OK):
        parser.error(f"--out: cannot write in {str(folder)!r}.")
    if path.exists() and not os.access(path, os.W_OK):
        parser.error(f"--out: cannot overwrite {out!r}.")
    from PIL import Image

    Image.init()  # registers every format PIL can read; SAVE holds those it can write
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt not in Image.SAVE:
        parser.error(f"--out {out!r}: not an image file name PIL can write; end it in .png or .jpg.")
    try:  # some formats PIL writes take no colour image (XBM, Palm, ...)
        Image.new("RGB", (8, 8)).save(io.BytesIO(), format=fmt)
    except Exception:
        parser.error(f"--out {out!r}: PIL cannot write a colour image as {fmt}; end it in .png or .jpg.")


def main(argv=None):
    # The console script is called skpadim; run as a module, argv[0] is __main__.py.
    prog = Path(sys.argv[0]).name
    prog = "python -m skpadim" if prog in ("__main__.py", "") else prog
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fit the default detector on built-in real textures",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--textures", nargs="+", default=list(TEXTURES), choices=TEXTURES,
                      help="textures to run, each on its own detector")
    demo.add_argument("--n-train", type=_int_in_range(3), default=60, help="good training tiles (>= 3)")
    demo.add_argument("--n-test", type=_int_in_range(2), default=40,
                      help="test tiles (>= 2: good and defective ones)")  # fmt: skip
    demo.add_argument("--image-size", type=_int_in_range(32, 512), default=224,
                      help="side of the square tiles cut from the 512 x 512 photographs, in pixels")
    demo.add_argument("--out", default="skpadim-demo.png", help="PNG to write ('' for none)")
    demo.add_argument("--seed", type=_int_in_range(0, 2**32 - len(TEXTURES)), default=0,
                      help="seed of the tiles and defects (texture k uses seed + k)")
    args = parser.parse_args(argv)
    _check_out(args.out, demo)
    run_demo(args.textures, args.n_train, args.n_test, args.image_size, args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
