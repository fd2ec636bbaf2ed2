"""The command line: the demo runs offline, and bad arguments fail before any fitting."""

import io
import os
import stat

import numpy as np
import pytest
from PIL import Image

from skpadim.__main__ import main, run_demo


def test_tiny_demo_writes_its_figure(tmp_path):
    out = tmp_path / "demo.png"
    stream = io.StringIO()
    results = run_demo(("brick",), n_train=6, n_test=4, image_size=64, out=str(out), stream=stream)
    assert [r["texture"] for r in results] == ["brick"]
    assert 0 <= results[0]["image_auroc"] <= 1 and 0 <= results[0]["pixel_auroc"] <= 1
    assert "brick" in stream.getvalue() and f"wrote {out}" in stream.getvalue()
    # What the figure shows, as counted: 4 test tiles hold 2 defective ones.
    assert "(brick), 2 defective and 1 good test tile (top" in stream.getvalue()
    figure = np.asarray(Image.open(out))
    assert figure.ndim == 3 and figure.shape[2] == 3 and figure.shape[0] == 2 * 64
    # Written through a temporary file (mode 0600), but with a new file's mode.
    umask = os.umask(0o077)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("args, message", [
    (["--n-test", "1"], "--n-test: must be at least 2"),
    (["--n-train", "x"], "--n-train: expected an integer"),
    (["--n-train", "2"], "--n-train: must be at least 3"),
    (["--image-size", "8"], "--image-size: must be at least 32"),
    (["--out", "{tmp}"], "is a folder"),
    (["--out", "{tmp}/missing/demo.png"], "does not exist"),
    # These failed only after fitting every texture, or with a traceback.
    (["--out", "{tmp}/demo.txt"], "not an image file name"),
    (["--image-size", "600"], "--image-size: must be at most 512"),
    (["--out", "{tmp}/demo.psd"], "not an image file name"),  # PIL reads, cannot write it
    (["--seed", str(2**32 - 1)], "--seed: must be at most"),  # each texture takes seed + k
    # PIL lists XBM as writable, but not for a colour image: it failed after fitting.
    (["--out", "{tmp}/demo.xbm"], "cannot write a colour image as XBM"),
])
def test_bad_arguments_fail_before_fitting(tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exc:
        main(["demo", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_failed_write_leaves_the_previous_figure_untouched(tmp_path, monkeypatch):
    # The figure was written in place: a failure truncated the file it replaced.
    out = tmp_path / "demo.png"
    out.write_bytes(b"previous figure")

    def fail(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        run_demo(("brick",), n_train=3, n_test=2, image_size=32, out=str(out), stream=io.StringIO())
    assert out.read_bytes() == b"previous figure"
    assert [p.name for p in tmp_path.iterdir()] == ["demo.png"]
