"""condenser.runtime (ONNX export, sessions, latency, parity) and condenser.compress.contract on tiny real
models: a two-conv net and a two-level diffusers UNet."""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from condenser.compress import contract
from condenser.compress.contract import block, compare, profile
from condenser.runtime import measure
from condenser.runtime.measure import Latency, latency, onnx_latency, parity
from condenser.runtime.onnx import export_onnx, session


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))


def export(model: nn.Module, path):
    return export_onnx(model, (torch.zeros(1, 3, 16, 16),), path, ["image"], ["edit"])


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=8, sample_size=8, layers_per_block=1,
        attention_head_dim=4, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")).eval()


# --- runtime.onnx ----------------------------------------------------------------------------------

def test_export_matches_pytorch_at_any_batch(tmp_path):
    model = conv_net()
    path = export(model, tmp_path / "new" / "net.onnx")
    assert path == tmp_path / "new" / "net.onnx" and path.is_file()

    assert parity(model, path, {"image": torch.randn(1, 3, 16, 16)}) < 1e-4
    batch = torch.randn(3, 3, 16, 16)
    (out,) = session(path).run(None, {"image": batch.numpy()})
    assert out.shape == (3, 3, 16, 16)
    with torch.no_grad():
        assert np.abs(out - model(batch).numpy()).max() < 1e-4


def test_export_is_byte_identical(tmp_path):
    model = conv_net()
    assert export(model, tmp_path / "a.onnx").read_bytes() == export(model, tmp_path / "b.onnx").read_bytes()


def test_session_on_a_missing_file_says_to_export(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.onnx.*export"):
        session(tmp_path / "nothing.onnx")


def test_parity_sees_a_stale_file(tmp_path):
    model = conv_net()
    path = export(model, tmp_path / "net.onnx")
    with torch.no_grad():
        model[2].bias.add_(0.5)
    assert parity(model, path, {"image": torch.randn(1, 3, 16, 16)}) == pytest.approx(0.5, abs=1e-4)


# --- runtime.measure --------------------------------------------------------------------------------

def test_latency_is_the_median_and_p95_of_the_timed_calls(monkeypatch):
    # A fake clock that each call of fn advances by a known duration; binary fractions of a second, so
    # the clock's differences are the durations exactly.
    durations = iter([1.0, 1.0, 0.25, 0.0625, 0.125, 0.09375, 1.5])
    clock = {"now": 0.0, "calls": 0}

    def fn():
        clock["calls"] += 1
        clock["now"] += next(durations)

    monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    result = latency(fn, repeats=5, warmup=2)

    timed = [0.25, 0.0625, 0.125, 0.09375, 1.5]
    assert clock["calls"] == 7
    assert result.median_ms == float(np.median(timed) * 1000) == 125.0
    assert result.p95_ms == float(np.percentile(timed, 95) * 1000)
    assert result.median_ms <= result.p95_ms
    assert (result.repeats, result.warmup, result.threads) == (5, 2, torch.get_num_threads())
    assert latency(lambda: None, repeats=1, warmup=0, threads=7).threads == 7


def test_latency_runs_without_grad():
    grads = []
    latency(lambda: grads.append(torch.is_grad_enabled()), repeats=2, warmup=1)
    assert grads == [False, False, False]


def test_onnx_latency_records_its_settings(tmp_path):
    path = export(conv_net(), tmp_path / "net.onnx")
    feed = {"image": np.zeros((1, 3, 16, 16), np.float32)}

    one = onnx_latency(path, feed, repeats=4, warmup=1, threads=1)
    assert (one.repeats, one.warmup, one.threads) == (4, 1, 1)
    assert 0 < one.median_ms <= one.p95_ms
    assert onnx_latency(path, feed, repeats=2, warmup=0).threads > 0
    assert one.to_dict() == {"median_ms": one.median_ms, "p95_ms": one.p95_ms, "repeats": 4, "warmup": 1,
                             "threads": 1}


# --- compress.contract: profile ---------------------------------------------------------------------

def test_profile_counts_parameters_and_zeros():
    model = conv_net()
    example = (torch.zeros(1, 3, 16, 16),)
    before = profile(model, example)
    assert before["params"] == sum(p.numel() for p in model.parameters())
    assert before["nonzero_params"] == before["params"]

    weight = model[0].weight
    with torch.no_grad():
        weight.view(-1)[: weight.numel() // 2] = 0
    after = profile(model, example)
    assert after["params"] == before["params"]
    assert after["nonzero_params"] == before["nonzero_params"] - weight.numel() // 2


def test_macs_of_a_conv_count_the_products_only():
    # Cout * Cin * kh * kw multiply-accumulates per output pixel; FlopCounterMode leaves the bias
    # additions (8 * 16 * 16 here) out, so the count is exactly the products.
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert profile(conv, (torch.zeros(1, 3, 16, 16),))["macs"] == 8 * 3 * 3 * 3 * 16 * 16


def test_size_bytes_is_the_fp32_weights_plus_a_header():
    model = conv_net()
    result = profile(model, (torch.zeros(1, 3, 16, 16),))
    assert 0 < result["size_bytes"] - 4 * result["params"] < 500


def test_unet_macs_count_attention_without_changing_the_model(unet):
    kwargs = {"sample": torch.randn(1, 4, 8, 8), "timestep": torch.tensor([10]),
              "encoder_hidden_states": torch.randn(1, 2, 8)}
    processors = {name: type(p) for name, p in unet.attn_processors.items()}

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        copy.deepcopy(unet)(**kwargs)
    without_attention = counter.get_total_flops() // 2

    assert contract.macs(unet, kwargs) > without_attention
    assert {name: type(p) for name, p in unet.attn_processors.items()} == processors
    assert profile(unet, kwargs)["params"] == sum(p.numel() for p in unet.parameters())


# --- compress.contract: block and compare -----------------------------------------------------------

def test_compare_gives_ratios_of_numbers_nested_latency_included():
    def latency_of(ms: float) -> Latency:
        return Latency(median_ms=ms, p95_ms=2 * ms, repeats=5, warmup=3, threads=2)

    reference = block({"psnr": 30.0, "zero": 0.0, "passed": True, "note": "a"},
                      {"params": 1000, "nonzero_params": 1000, "macs": 10, "size_bytes": 4000},
                      {"onnxruntime": latency_of(4.0), "pytorch": latency_of(8.0).to_dict()})
    compressed = block({"psnr": 27.0, "zero": 1.0, "passed": False, "note": "b"},
                       {"params": 1000, "nonzero_params": 500, "macs": 5, "size_bytes": 1000},
                       {"onnxruntime": latency_of(1.0), "pytorch": latency_of(6.0)})
    assert reference["latency_ms"] == {"onnxruntime": {"median": 4.0, "p95": 8.0},
                                       "pytorch": {"median": 8.0, "p95": 16.0}}

    result = compare(reference, compressed)
    assert result["reference"] is reference and result["compressed"] is compressed
    assert result["ratio"] == {"psnr": 0.9, "params": 1.0, "nonzero_params": 0.5, "macs": 0.5,
                               "size_bytes": 0.25,
                               "latency_ms": {"onnxruntime": {"median": 0.25, "p95": 0.25},
                                             "pytorch": {"median": 0.75, "p95": 0.75}}}


def test_compare_refuses_blocks_with_different_keys():
    with pytest.raises(ValueError, match="psnr"):
        compare({"psnr": 30.0, "params": 10}, {"params": 5})
    with pytest.raises(ValueError, match="latency_ms.*pytorch"):
        compare({"latency_ms": {"onnxruntime": {"median": 1.0}, "pytorch": {"median": 1.0}}},
                {"latency_ms": {"onnxruntime": {"median": 1.0}}})


def test_block_refuses_quality_keys_that_clash():
    with pytest.raises(ValueError, match="params"):
        block({"params": 1.0}, {"params": 10}, {})


def test_compare_latency_times_every_file_in_rounds(tmp_path):
    small = export(conv_net(), tmp_path / "small.onnx")
    torch.manual_seed(0)
    wide = export(nn.Sequential(nn.Conv2d(3, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 3, 3, padding=1)),
                  tmp_path / "wide.onnx")
    feed = {"image": np.zeros((1, 3, 16, 16), np.float32)}
    timed = measure.compare_latency({"small": small, "wide": wide}, feed, repeats=40, rounds=4, warmup=1, threads=1)
    assert set(timed) == {"small", "wide"}
    assert all((t.repeats, t.warmup, t.threads) == (40, 1, 1) for t in timed.values())
    # 85x the MACs: measured side by side, the wide net is the slower one.
    assert timed["wide"].median_ms > timed["small"].median_ms
