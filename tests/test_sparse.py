"""Unstructured sparsity: masks, their storage, gradual pruning, MEST, and the params that drive them.

On a small real editor generator (the gan_editor kind's model and loss) and random images: the
mechanics are what is tested here; quality on the real deliverables is bench/sparse.py's job."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from condenser.compress.sparse.masks import (
    apply_masks,
    layer_sparsity,
    magnitude_masks,
    prunable,
    sparsity,
    weight_sparsity,
)
from condenser.compress.sparse.mest import Mest
from condenser.compress.sparse.methods import Context, cubic_schedule, prune_finetune
from condenser.compress.sparse.storage import load_sparse, save_sparse
from condenser.compress.sparse.train import Examples, TrainLog, finetune
from condenser.core.config import MestParams, PruneFinetuneParams, SparseParams, parse_params
from condenser.core.errors import ConfigError
from condenser.core.io import StagePaths
from condenser.deliverables import KINDS, Deliverable
from condenser.models.editor import Generator, GeneratorConfig
from tests.conftest import tiny_params

KIND = KINDS["gan_editor"]


def _generator(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    g = Generator(GeneratorConfig(("bold",), channels=8, blocks=1, block="resnet", code_dim=8, default="bold"))
    with torch.no_grad():  # a trained generator's output conv is not zero
        g.out.weight.normal_(0, 0.1)
    return g.eval()


def _examples(n: int = 32) -> Examples:
    gen = torch.Generator().manual_seed(1)
    return Examples([{"image": torch.rand(n, 3, 16, 16, generator=gen) * 2 - 1}])


def _context(dense, tmp_path: Path) -> Context:
    d = Deliverable("editor", KIND, tmp_path, tmp_path, StagePaths(tmp_path))
    return Context(deliverable=d, dense=dense, examples=_examples(), example={"image": torch.zeros(1, 3, 16, 16)},
                   cfg=SparseParams(batch_size=8, lr=1e-3))


def test_magnitude_masks_prune_the_smallest_weights():
    g = _generator()
    masks = magnitude_masks(g, 0.9, "global")
    assert abs(sparsity(masks) - 0.9) < 1e-3
    flat = torch.cat([m.weight.detach().abs().flatten() for m in prunable(g).values()])
    keep = torch.cat([m.flatten() for m in masks.values()])
    assert flat[keep].min() >= flat[~keep].max()
    per_layer = magnitude_masks(g, 0.75, "layer")
    for name, mask in per_layer.items():
        assert abs((1 - mask.float().mean()) - 0.75) <= 1 / mask.numel() + 1e-6, name


def test_sparse_storage_round_trips_exactly_and_shrinks(tmp_path):
    g = _generator()
    apply_masks(g, magnitude_masks(g, 0.9, "global"))
    dense_file = tmp_path / "dense.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in g.state_dict().items()}, str(dense_file))
    path = save_sparse(g, tmp_path / "w.sparse.safetensors")
    restored = load_sparse(path)
    assert restored.keys() == g.state_dict().keys()
    for name, tensor in g.state_dict().items():
        assert torch.equal(restored[name], tensor), name
    assert path.stat().st_size * 4 < dense_file.stat().st_size
    with pytest.raises(ValueError, match="not a condenser.sparse"):
        from condenser.compress.sparse.storage import unpack
        unpack({}, {"format": "other"})


def test_masks_hold_through_finetuning(tmp_path):
    dense = _generator()
    model = copy.deepcopy(dense)
    masks = magnitude_masks(model, 0.8, "layer")
    before = {n: m.weight.detach().clone() for n, m in prunable(model).items()}
    finetune(KIND, model, dense, _examples(), steps=10, lr=1e-2, batch_size=8, seed=0, masks=lambda: masks)
    for name, layer in prunable(model).items():
        assert torch.all(layer.weight[~masks[name]] == 0), name          # pruned: exactly zero
        assert not torch.equal(layer.weight[masks[name]], before[name][masks[name]]), name  # survivors trained


def test_gradual_pruning_reaches_the_target_and_recovers(tmp_path):
    assert cubic_schedule(0, 0.9, 50, 10) < cubic_schedule(20, 0.9, 50, 10) < cubic_schedule(49, 0.9, 50, 10)
    assert cubic_schedule(49, 0.9, 50, 10) == pytest.approx(0.9)
    dense = _generator()
    ctx = _context(dense, tmp_path)
    cfg = PruneFinetuneParams(kind="prune_finetune", sparsity=0.9, steps=40, prune_steps=20, prune_every=5)
    [variant] = prune_finetune("pf", cfg, ctx)
    assert weight_sparsity(variant.model) == pytest.approx(0.9, abs=2e-3)
    oneshot = copy.deepcopy(dense)
    apply_masks(oneshot, magnitude_masks(oneshot, 0.9, "global"))
    from condenser.compress.sparse.train import evaluate_loss

    # Fine-tuning against the dense model recovers part of what one-shot pruning lost.
    assert evaluate_loss(KIND, variant.model, dense, ctx.examples, 8) < evaluate_loss(KIND, oneshot, dense,
                                                                                      ctx.examples, 8)


def test_lottery_ticket_rewinds_to_the_seeded_initialisation(tmp_path):
    dense = _generator()
    ctx = _context(dense, tmp_path)
    start = KIND.initialization(dense, 0)
    torch.manual_seed(0)
    fresh = Generator(dense.config)
    for a, b in zip(start.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    cfg = PruneFinetuneParams(kind="prune_finetune", steps=6, prune_steps=4, prune_every=2, compare_lottery=True)
    variants = prune_finetune("pf", cfg, ctx)
    assert [v.name for v in variants] == ["pf", "pf.lottery"]
    assert weight_sparsity(variants[1].model) == pytest.approx(0.9, abs=2e-3)
    assert -1 <= variants[1].details["init_final_correlation"] <= 1


def test_mest_grows_where_gradients_are_largest():
    g = _generator()
    masks = magnitude_masks(g, 0.9, "layer")
    name, layer = "blocks.0.conv1" if "blocks.0.conv1" in masks else next(iter(masks.items()))[0], None
    layer = prunable(g)[name]
    run = Mest(g, masks, MestParams(kind="mest", mutation=0.5, soft_bound=0.01), total_steps=100)
    grad = torch.zeros_like(layer.weight)
    pruned = (~masks[name]).flatten().nonzero().flatten()
    hot = pruned[:3]
    grad.view(-1)[hot] = torch.tensor([5.0, 4.0, 3.0])
    grad.view(-1)[masks[name].flatten().nonzero().flatten()[:3]] = 100.0  # survivors: never "grown"
    for other in prunable(g).values():
        other.weight.grad = torch.zeros_like(other.weight)
    layer.weight.grad = grad
    run.grow(g, 0.5)
    grown = run.masks[name].flatten() & ~masks[name].flatten()
    n = run.grown[name]
    assert n == min(round(0.5 * int(masks[name].sum())), int(0.01 * masks[name].numel()))
    if n >= 3:
        assert grown[hot].all()
    else:
        assert grown[hot[:n]].all()


def test_mest_stays_within_its_soft_bound_and_ends_at_target(tmp_path):
    dense = _generator()
    model = copy.deepcopy(dense)
    cfg = MestParams(kind="mest", sparsity=0.9, update_every=4, mutation=0.3, soft_bound=0.05, steps=24)
    start = magnitude_masks(model, 0.9, "layer")
    run = Mest(model, start, cfg, total_steps=24)
    finetune(KIND, model, dense, _examples(), steps=24, lr=1e-2, batch_size=8, seed=0, masks=lambda: run.masks,
             step_hook=run.step)
    if run.grown:
        run.prune(model)
    assert run.mutations >= 3
    assert sparsity(start) - cfg.soft_bound - 1e-6 <= run.min_sparsity < sparsity(start)
    for name, mask in run.masks.items():
        assert int(mask.sum()) == int(start[name].sum()), name  # every layer back at its target count
    assert any(not torch.equal(run.masks[n], start[n]) for n in start)  # the structure moved
    apply_masks(model, run.masks)
    assert max(abs(s - 0.9) for s in layer_sparsity(model).values()) < 0.02


def test_mest_drops_the_examples_never_forgotten():
    cfg = MestParams(kind="mest", forgetting_epochs=2)
    run = Mest(_generator(), magnitude_masks(_generator(), 0.5, "layer"), cfg, total_steps=10)
    # 0, 2: learned (low last loss), never forgotten -> dropped; 1, 3: forgotten once; 4: never forgotten
    # but not learned (a hard example the model is still improving on) -> kept.
    log = TrainLog(visits={0: [1.0, 0.5], 1: [0.2, 0.4], 2: [0.3, 0.2], 3: [0.5, 0.6], 4: [3.0, 2.0]})
    active = torch.arange(5)
    assert torch.equal(run.drop_never_forgotten(1, log, active), active)  # not yet
    kept = run.drop_never_forgotten(2, log, active)
    assert kept.tolist() == [1, 3, 4] and log.dropped == 2


@pytest.mark.parametrize("change, key", [
    (lambda p: p["sparse"]["methods"]["pf90"].update(sparsity=1.0), "sparse.methods.pf90"),
    (lambda p: p["sparse"]["methods"].update(x={"kind": "magic"}), "sparse.methods.x"),
    (lambda p: p["sparse"]["methods"]["mest90"].update(deliverables=["nobody"]), "sparse.methods.mest90.deliverables"),
    (lambda p: p["sparse"]["chain"].update(student="nothing"), "sparse.chain.student"),
    (lambda p: p["sparse"]["chain"].pop("editor_italic"), "sparse.chain: no entry for deliverable 'editor_italic'"),
    (lambda p: p["sparse"]["chain"].update(student="mest90") or p["sparse"]["methods"]["mest90"].update(
        deliverables=["editor_bold"]), "sparse.chain.student: method 'mest90' does not run"),
])
def test_bad_sparse_params_are_refused_naming_the_key(change, key):
    raw = tiny_params()
    change(raw)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
        parse_params(raw)
