"""sparse@<deliverable> on tiny real deliverables of both kinds: every method's variants, their files,
the chain, and the compression metrics contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from condenser.compress.sparse.storage import load_sparse
from condenser.core.config import parse_params
from condenser.core.errors import ConfigError
from condenser.core.io import StagePaths
from condenser.deliverables import KINDS
from condenser.runtime.measure import parity
from tasks import sparse
from tests.conftest import tiny_params

CONTRACT = {"params", "nonzero_params", "macs", "nonzero_macs", "size_bytes", "latency_ms"}


@pytest.fixture(scope="module")
def results(deliverables_root: Path) -> dict:
    params = parse_params(tiny_params())
    return {name: sparse.run(params, StagePaths(deliverables_root), name) for name in ("student", "editor_bold")}


@pytest.mark.parametrize("name, expected", [
    ("student", {"pf90", "mest90", "mest90.keep_all", "filter50", "hass90", "hass90.uniform"}),
    ("editor_bold", {"pf90", "pf90.lottery", "mest90", "mest90.keep_all", "filter50", "hass90",
                     "hass90.uniform"}),
])
def test_every_method_reports_in_the_contract(results, name, expected):
    metrics = results[name]
    assert set(metrics["variants"]) == expected
    kind = KINDS[metrics["kind"]]
    for variant, record in metrics["variants"].items():
        for side in ("reference", "compressed"):
            assert CONTRACT | set(kind.quality) <= set(record[side]), (variant, side)
            assert record[side]["latency_ms"]["onnxruntime"]["median"] > 0
        assert record["ratio"]["size_bytes"] == record["compressed"]["size_bytes"] / record["reference"]["size_bytes"]
    unstructured = metrics["variants"]["pf90"]
    assert unstructured["weight_sparsity"] == pytest.approx(0.9, abs=0.01)
    assert unstructured["compressed"]["nonzero_params"] < 0.25 * unstructured["reference"]["nonzero_params"]
    assert unstructured["compressed"]["nonzero_macs"] < 0.5 * unstructured["reference"]["macs"]
    # Values + bitmask: the shipped file is several times smaller than the dense one.
    assert unstructured["ratio"]["size_bytes"] < 0.35
    filtered = metrics["variants"]["filter50"]["ratio"]
    # Physically smaller (the student keeps its text-time pooling at full width: less than half goes).
    assert filtered["params"] < 0.8 and filtered["macs"] < 0.8 and filtered["size_bytes"] < 0.8
    hass = metrics["variants"]["hass90"]["search"]
    assert hass["searched"]["schedule"]["throughput"] >= hass["uniform"]["schedule"]["throughput"]
    assert hass["searched"]["error"] <= hass["uniform"]["error"] * (1 + 1e-9)


def test_files_restore_the_variants_and_the_chain_loads(results, deliverables_root):
    root = deliverables_root / "data" / "sparse"
    for name, metrics in results.items():
        kind = KINDS[metrics["kind"]]
        folder = root / name
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["chain"] == metrics["chain"]
        chain = kind.load(folder / sparse.CHAIN)
        if metrics["chain"] == "pf90":
            # The chain is the pf90 variant in the deliverable's own format; its sparse file restores it.
            restored = load_sparse(folder / "pf90" / sparse.SPARSE_FILE)
            for key, tensor in chain.state_dict().items():
                assert torch.equal(restored[key], tensor), key
        filtered = kind.load(folder / "filter50")
        example = {k: v for k, v in kind.example_inputs(_deliverable(deliverables_root, name)).items()}
        assert parity(kind.exportable(filtered), folder / "filter50" / sparse.ONNX_FILE, example) < 1e-4
        assert (deliverables_root / "plots" / "sparse" / f"{name}.tsv").is_file()


def _deliverable(root: Path, name: str):
    from condenser.deliverables import deliverable

    params = parse_params(tiny_params())
    return deliverable(name, params.deliverables[name], StagePaths(root))


def test_missing_deliverable_is_refused_before_work(tmp_path):
    params = parse_params(tiny_params())
    with pytest.raises(ConfigError, match=r"deliverables\.student\.path: .* does not exist"):
        sparse.run(params, StagePaths(tmp_path), "student")
