"""Choosing the torch device, with a clear error when CUDA is asked for but absent."""

import torch


def resolve_device(device):
    """Map ``"auto"``, ``"cpu"``, ``"cuda"`` (or a ``torch.device``) to a torch.device.

    ``"auto"`` picks the first CUDA GPU when torch sees one and the CPU otherwise.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={str(device)!r} was requested but torch sees no CUDA GPU on this "
            "machine; use device='cpu' or device='auto'."
        )
    return device
