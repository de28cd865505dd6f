"""The compression metrics contract: what every compression stage reports, and what `report` reads.

For each deliverable and variant, a compression stage (sparse, quantize, validate) reports

    {"reference":  block,   # the model before this compression
     "compressed": block,   # the model after it, with exactly the same keys
     "ratio":      {...}}   # compressed / reference for every numeric key, nested dicts included

where a block is flat apart from latency:

    {<the deliverable kind's quality metrics>: float, ...,
     "params": int,          # all parameters
     "nonzero_params": int,  # parameter entries that are not zero (what sparsity removes)
     "macs": int,            # multiply-accumulates of one forward pass on the profiling example
     "size_bytes": int,      # the state dict saved as safetensors (parameters and buffers)
     "latency_ms": {<runtime>: {"median": float, "p95": float}, ...}}

A ratio is left out where the reference is 0 (undefined) and for booleans and non-numbers.
"""

from __future__ import annotations

import copy
from numbers import Number

import torch
from safetensors.torch import save
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from condenser.models.common import parameter_count
from condenser.runtime.measure import Latency


def profile(model: nn.Module, example: tuple[torch.Tensor, ...] | dict[str, torch.Tensor]) -> dict:
    """params, nonzero_params, macs and size_bytes of `model`; `example` is the forward pass's positional
    arguments, or its keyword arguments as a dict."""
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    return {"params": parameter_count(model),
            "nonzero_params": sum(int(torch.count_nonzero(p)) for p in model.parameters()),
            "macs": macs(model, example),
            "size_bytes": len(save(state))}


def macs(model: nn.Module, example: tuple[torch.Tensor, ...] | dict[str, torch.Tensor]) -> int:
    """Multiply-accumulates of one forward pass (eval mode, no grad) on `example`, as counted by
    FlopCounterMode: matrix products and convolutions, two flops per multiply-accumulate; bias additions,
    normalisations and activations are not counted."""
    if hasattr(model, "set_attn_processor"):
        from diffusers.models.attention_processor import AttnProcessor

        # A diffusers model's default attention calls scaled_dot_product_attention, whose CPU kernel
        # FlopCounterMode does not count; the plain processor computes the same attention with bmm.
        model = copy.deepcopy(model)
        model.set_attn_processor(AttnProcessor())
    args, kwargs = ((), example) if isinstance(example, dict) else (tuple(example), {})
    counter = FlopCounterMode(display=False)
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(*args, **kwargs)
    finally:
        model.train(training)
    return counter.get_total_flops() // 2


def block(quality: dict, profile: dict, latency: dict[str, Latency | dict]) -> dict:
    """One side of a comparison: quality metrics, profile and per-runtime latency (a Latency or its
    to_dict()) in the contract's shape."""
    clash = sorted(set(quality) & (set(profile) | {"latency_ms"}))
    if clash:
        raise ValueError(f"quality metrics {clash} clash with the profile's or latency's keys")
    timings = {runtime: t if isinstance(t, Latency) else Latency(**t) for runtime, t in latency.items()}
    return {**quality, **profile,
            "latency_ms": {runtime: {"median": t.median_ms, "p95": t.p95_ms} for runtime, t in timings.items()}}


def compare(reference: dict, compressed: dict) -> dict:
    """The contract's record of one compression: both blocks and their ratios (compressed / reference)."""
    return {"reference": reference, "compressed": compressed, "ratio": _ratio(reference, compressed)}


def _ratio(reference: dict, compressed: dict, path: tuple[str, ...] = ()) -> dict:
    if set(reference) != set(compressed):
        where = f" under {'.'.join(path)}" if path else ""
        raise ValueError(f"the blocks must have the same keys{where}: only in reference "
                         f"{sorted(set(reference) - set(compressed))}, only in compressed "
                         f"{sorted(set(compressed) - set(reference))}")
    ratio = {}
    for key, ref in reference.items():
        new = compressed[key]
        if isinstance(ref, dict) and isinstance(new, dict):
            nested = _ratio(ref, new, (*path, key))
            if nested:
                ratio[key] = nested
        elif _numeric(ref) and _numeric(new) and ref != 0:
            ratio[key] = new / ref
    return ratio


def _numeric(value: object) -> bool:
    return isinstance(value, Number) and not isinstance(value, bool)
