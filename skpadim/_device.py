"""Choosing the torch device, with a clear error when CUDA is asked for but absent."""

import torch


def check_device(device):
    """The ``device`` parameter as a torch.device (None for ``"auto"``), or a ValueError.

    Accepts ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` and torch.device
    objects of type cpu or cuda; whether a GPU is present is not checked here.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device of type "
            f"cpu or cuda; got {device!r}."
        )
    return parsed


def resolve_device(device):
    """Map ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (or a ``torch.device``) to a torch.device.

    ``"auto"`` picks the first CUDA GPU when torch sees one and the CPU otherwise.
    """
    parsed = check_device(device)
    if parsed is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={str(parsed)!r} was requested but torch sees no CUDA GPU on this "
            "machine; use device='cpu' or device='auto'."
        )
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise RuntimeError(
            f"device={str(parsed)!r} was requested but torch sees only "
            f"{torch.cuda.device_count()} CUDA GPU(s), numbered from 0."
        )
    return parsed
