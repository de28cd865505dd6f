"""Sparse weights in an open format that really shrinks the file: values + bitmask in safetensors.

A pruned model saved the ordinary way is as big as the dense one (its zeros are stored). Here each
tensor that is sparse enough to gain is stored as its non-zero values (1-D, in row-major order) and a
bitmask of where they go (one bit per entry, packed into uint8), with its shape in the file's metadata;
other tensors are stored as they are. Loading restores exactly the dense tensors (zeros are zeros, the
values are the same bits). Any safetensors reader can open the file; `unpack` is all a runtime needs.

Break-even: a float32 entry costs 32 bits dense and (1 - s) * 32 + 1 bits packed, so packing pays from
about 3% sparsity; below that a tensor stays dense.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

FORMAT = "condenser.sparse/1"
VALUES, MASK = ".values", ".mask"


def _gains(tensor: torch.Tensor) -> bool:
    bits = tensor.element_size() * 8
    nonzero = int(torch.count_nonzero(tensor))
    return tensor.numel() > 0 and nonzero * bits + tensor.numel() < tensor.numel() * bits


def pack(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of the sparse file for a state dict."""
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        if not _gains(tensor):
            tensors[name] = tensor
            continue
        present = (tensor != 0).flatten()
        tensors[name + VALUES] = tensor.flatten()[present].clone()
        tensors[name + MASK] = torch.from_numpy(np.packbits(present.numpy()))
        shapes[name] = list(tensor.shape)
    return tensors, {"format": FORMAT, "shapes": json.dumps(shapes, sort_keys=True)}


def unpack(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """The dense state dict back from `pack`'s tensors and metadata."""
    if (metadata or {}).get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file (its metadata says {metadata!r})")
    shapes = json.loads(metadata["shapes"])
    state = {name: t for name, t in tensors.items() if not name.endswith((VALUES, MASK))}
    for name, shape in shapes.items():
        values, bits = tensors[name + VALUES], tensors[name + MASK]
        numel = int(np.prod(shape)) if shape else 1
        present = torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).astype(bool))
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[present] = values
        state[name] = dense.view(shape)
    return state


def sparse_bytes(state: dict[str, torch.Tensor]) -> int:
    """Size of the sparse file for `state`, without writing it."""
    tensors, metadata = pack(state)
    return len(save(tensors, metadata))


def save_sparse(model: torch.nn.Module, path: Path) -> Path:
    """Write `model`'s state dict to `path` in the sparse format."""
    tensors, metadata = pack(model.state_dict())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_sparse(path: Path) -> dict[str, torch.Tensor]:
    """The dense state dict stored at `path` (load it into a model of the deliverable's architecture)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no sparse weights file; run the sparse stage (dvc repro sparse)")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return unpack(tensors, metadata)
