"""A learned performance predictor in PerfSAGE's shape: a GraphSAGE-style network over the ONNX graph predicting
latency and peak memory per target, trained on variants measured here (`condenser.targets.population`).

Nodes are the operators `condenser.targets.graph.load_graph` keeps (constants folded, QDQ files read as an int8
runtime runs them). A node's features: its operator (one-hot over `VOCABULARY`, anything else "other"), the
log1p of its MACs, ops, activation bytes read and written, weight bytes, output channels and positions, the same
work figures unlogged (so a unit can be linear in them and the sum over nodes an op count), and whether it runs
in int8; standardised with the training set's statistics. `layers` rounds of message passing along the data
flow, h' = relu(W_self h + W_in mean(producers' h) + W_out mean(consumers' h)), then a sum over the graph's nodes
(latency adds up over operators; the MLP reads the log of the sum, since its outputs are logs) and an MLP give
log latency and log peak memory per target. A row lacks the targets it was not measured on (mobile is measured
on a subset): the loss is a masked MSE, each output standardised and weighted alike.

Training: Adam with a cosine schedule for `steps` steps, each on a fixed chunk of `GRAPHS_PER_STEP` concatenated
graphs (edges offset per graph, sparse mean matrices, readout by `index_add_`), chunks and their order seeded:
on the CPU a rerun gives the same weights. The baselines, on the same held-out split: a constant (the training
set's geometric mean) and MicroNets' linear op-count model (`condenser.targets.estimate.fit_opcount`). The split
is by a seeded hash of each variant's id, so a variant stays on its side as the dataset grows.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from condenser.core.errors import DataError
from condenser.targets.estimate import fit_opcount, opcount_latency
from condenser.targets.graph import Graph
from condenser.targets.population import TARGETS, GraphRecord, Row

WEIGHTS, CONFIG = "predictor.safetensors", "predictor.json"
# The operators the two families' graphs contain, fp32 and QDQ int8 (as load_graph keeps them), and a few their
# variants could bring; the rest share "other".
VOCABULARY = ("Add", "AveragePool", "Cast", "Clip", "Concat", "Conv", "Cos", "DequantizeLinear", "Div", "Einsum",
              "Erf", "Exp", "Expand", "Gather", "Gemm", "GlobalAveragePool", "InstanceNormalization",
              "LayerNormalization", "MatMul", "MaxPool", "Mul", "Neg", "Pad", "Pow", "QuantizeLinear", "ReduceMean",
              "Relu", "Reshape", "Resize", "Sigmoid", "Sin", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub",
              "Tanh", "Transpose", "Unsqueeze", "Where", "other")
NUMBERS = ("macs", "ops", "input_bytes", "output_bytes", "weight_bytes", "channels", "positions")
# The work figures again on their own scale: a sum over nodes of a unit linear in them is the graph's op count or
# bytes moved, the op-count model's input, which logs alone would have to learn to exponentiate.
LINEAR = ("macs", "ops", "input_bytes", "output_bytes", "weight_bytes")
FEATURES = len(NUMBERS) + len(LINEAR) + 1
GRAPHS_PER_STEP = 16
QUANTITIES = ("latency_ms", "peak_memory_bytes")
# Output columns: log latency and log peak memory per target.
COLUMNS = tuple((target, quantity) for target in TARGETS for quantity in QUANTITIES)


def save_dataset(rows: Iterable[Row], path: Path) -> None:
    """Write `rows` as JSON lines (one row per line, keys sorted), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r.to_dict(), sort_keys=True) + "\n" for r in rows))
    tmp.replace(path)


def load_dataset(path: Path) -> list[Row]:
    """The rows of a JSON-lines dataset `save_dataset` wrote; a line that is not a row raises DataError naming the
    file and line."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(Row.from_dict(json.loads(line)))
        except (ValueError, TypeError, KeyError) as error:
            raise DataError(f"{path}:{number}: not a measured row ({type(error).__name__}: {error}); delete the "
                            "file to measure the dataset again") from error
    return rows


def held_out(variant_id: str, seed: int, fraction: float) -> bool:
    """Whether a variant is in the held-out split: a hash of the seed and its id, uniform in [0, 1), below
    `fraction`. The same id is on the same side whatever else the dataset holds."""
    digest = hashlib.sha256(f"{seed}:{variant_id}".encode()).hexdigest()
    return int(digest[:12], 16) / 16**12 < fraction


def node_numbers(record: GraphRecord) -> np.ndarray:
    """Per node, log1p of `NUMBERS`, `LINEAR` as they are, and the int8 flag: [nodes, FEATURES]."""
    out = np.zeros((len(record.ops), FEATURES), dtype=np.float64)
    for i, (shape, (macs, ops, in_b, out_b, w_b, quantized)) in enumerate(zip(record.out_shapes, record.numbers)):
        # [N, C, *positions] for activations of convolutions and norms; [N, tokens, width] for attention's.
        channels = shape[1] if len(shape) > 1 else 0
        positions = math.prod(shape[2:]) if len(shape) > 2 else 1
        out[i, :len(NUMBERS)] = np.log1p([macs, ops, in_b, out_b, w_b, channels, positions])
        out[i, len(NUMBERS):-1] = [macs, ops, in_b, out_b, w_b]
        out[i, -1] = quantized
    return out


@dataclass
class _Batch:
    """Graphs concatenated: per node its operator (index into the vocabulary), raw numbers (`node_numbers`) and
    graph index; the mean over each node's producers and over its consumers as sparse [nodes, nodes] matrices."""

    ops: torch.Tensor
    numbers: torch.Tensor
    graph: torch.Tensor
    graphs: int
    producers: torch.Tensor
    consumers: torch.Tensor


def _mean_matrix(rows: np.ndarray, cols: np.ndarray, nodes: int) -> torch.Tensor:
    """The sparse matrix averaging, for each node `r`, the nodes `c` of the pairs (r, c); zero rows where none."""
    count = np.bincount(rows, minlength=nodes).astype(np.float32)
    values = 1.0 / count[rows] if len(rows) else np.zeros(0, np.float32)
    return torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(values),
                                   (nodes, nodes), check_invariants=True).coalesce()


def _batch(records: Sequence[GraphRecord], vocabulary: Sequence[str]) -> _Batch:
    index = {op: i for i, op in enumerate(vocabulary)}
    other = index["other"]
    ops, numbers, src, dst, graph = [], [], [], [], []
    offset = 0
    for g, record in enumerate(records):
        ops.append(np.array([index.get(op, other) for op in record.ops], dtype=np.int64))
        numbers.append(node_numbers(record))
        edges = np.array(record.edges, dtype=np.int64).reshape(-1, 2)
        src.append(edges[:, 0] + offset)
        dst.append(edges[:, 1] + offset)
        graph.append(np.full(len(record.ops), g, dtype=np.int64))
        offset += len(record.ops)
    src_all, dst_all = np.concatenate(src), np.concatenate(dst)
    return _Batch(ops=torch.from_numpy(np.concatenate(ops)), numbers=torch.from_numpy(np.concatenate(numbers)).float(),
                  graph=torch.from_numpy(np.concatenate(graph)), graphs=len(records),
                  producers=_mean_matrix(dst_all, src_all, offset), consumers=_mean_matrix(src_all, dst_all, offset))


class _SageLayer(nn.Module):
    """h' = relu(W_self h + W_in mean(producers' h) + W_out mean(consumers' h)), the three weights as one matrix
    over the concatenation (one matrix product instead of three)."""

    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.linear = nn.Linear(3 * features, hidden)

    def forward(self, h: torch.Tensor, batch: _Batch) -> torch.Tensor:
        return torch.relu(self.linear(torch.cat([h, torch.sparse.mm(batch.producers, h),
                                                 torch.sparse.mm(batch.consumers, h)], 1)))


class SageNet(nn.Module):
    """The network: `layers` message-passing rounds over features of width `features`, a sum readout, an MLP to
    `outputs` values per graph."""

    def __init__(self, features: int, hidden: int, layers: int, outputs: int):
        super().__init__()
        self.layers = nn.ModuleList(_SageLayer(features if i == 0 else hidden, hidden) for i in range(layers))
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, outputs))

    def forward(self, x: torch.Tensor, batch: _Batch) -> torch.Tensor:
        h = x
        for layer in self.layers:
            h = layer(h, batch)
        pooled = torch.zeros(batch.graphs, h.shape[1]).index_add_(0, batch.graph, h)
        # A sum of per-node costs spans three decades over these graphs and the outputs are logs: the MLP reads
        # the log of the sum (the node states are non-negative after the ReLU).
        return self.head(torch.log1p(pooled))


class Predictor:
    """A trained network with its vocabulary and the normalisation of its inputs and outputs."""

    def __init__(self, net: SageNet, config: dict):
        self.net, self.config = net.eval(), config

    def _inputs(self, records: Sequence[GraphRecord]) -> tuple[torch.Tensor, _Batch]:
        batch = _batch(records, self.config["vocabulary"])
        mean = torch.tensor(self.config["number_mean"])
        std = torch.tensor(self.config["number_std"])
        one_hot = nn.functional.one_hot(batch.ops, len(self.config["vocabulary"])).float()
        return torch.cat([one_hot, (batch.numbers - mean) / std], 1), batch

    def _raw(self, records: Sequence[GraphRecord]) -> torch.Tensor:
        """Standardised outputs [graphs, columns] (the training loss's scale)."""
        x, batch = self._inputs(records)
        return self.net(x, batch)

    def predict_records(self, records: Sequence[GraphRecord]) -> list[dict[str, dict[str, float]]]:
        """`predict` for many graphs at once, as records."""
        with torch.no_grad():
            out = self._raw(records).double().numpy()
        logs = out * np.array(self.config["target_std"]) + np.array(self.config["target_mean"])
        return [{target: {quantity: float(np.exp(row[COLUMNS.index((target, quantity))]))
                          for quantity in QUANTITIES} for target in TARGETS} for row in logs]

    def predict(self, graph: Graph) -> dict[str, dict[str, float]]:
        """Per target (`cpu`, `mobile`): predicted `latency_ms` (median, batch 1, on the threads the training rows
        were timed with) and `peak_memory_bytes`."""
        return self.predict_records([GraphRecord.from_graph(graph)])[0]

    @property
    def opcount(self) -> dict[str, tuple[float, float] | None]:
        """Per target, the op-count model (ms_per_mop, overhead_ms) fitted on this predictor's training rows, for
        `condenser.targets.estimate.opcount_latency`; None where it could not be fitted."""
        return {t: None if c is None else (c[0], c[1]) for t, c in self.config["opcount"].items()}

    def estimates(self, graph: Graph, target: str) -> dict[str, float | None]:
        """For one target: the predictor's `latency_ms` and `peak_memory_bytes`, and `opcount_latency_ms`, the
        op-count model's latency fitted on the same rows (None where it could not be fitted)."""
        if target not in TARGETS:
            raise ValueError(f"target '{target}': the predictor knows {', '.join(TARGETS)}")
        predicted = self.predict(graph)[target]
        coefficients = self.opcount[target]
        return {**predicted,
                "opcount_latency_ms": None if coefficients is None else opcount_latency(graph, *coefficients)}

    def save(self, folder: Path) -> None:
        """The weights (safetensors) and the configuration (JSON: vocabulary, normalisation, sizes) in `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.net.state_dict().items()}, str(folder / WEIGHTS))
        (folder / CONFIG).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder: Path) -> Predictor:
        folder = Path(folder)
        missing = [name for name in (WEIGHTS, CONFIG) if not (folder / name).is_file()]
        if missing:
            raise DataError(f"{folder}: no predictor here (missing {', '.join(missing)}); run the predictor stage "
                            "(dvc repro predictor)")
        config = json.loads((folder / CONFIG).read_text())
        net = SageNet(len(config["vocabulary"]) + FEATURES, config["hidden"], config["layers"], len(COLUMNS))
        net.load_state_dict(load_file(str(folder / WEIGHTS)))
        return cls(net, config)


def labels(rows: Sequence[Row]) -> tuple[np.ndarray, np.ndarray]:
    """Log labels [rows, columns] and their mask (False where a row was not measured on that target)."""
    values = np.zeros((len(rows), len(COLUMNS)))
    mask = np.zeros((len(rows), len(COLUMNS)), dtype=bool)
    for i, row in enumerate(rows):
        for j, (target, quantity) in enumerate(COLUMNS):
            measured = row.targets.get(target)
            if measured is None:
                continue
            value = measured["latency_ms"]["median"] if quantity == "latency_ms" else measured[quantity]
            values[i, j], mask[i, j] = math.log(value), True
    return values, mask


def fit_opcounts(rows: Sequence[Row]) -> dict[str, list[float] | None]:
    """Per target, MicroNets' op-count model (ms_per_mop, overhead_ms) fitted on the rows measured on it; None
    where fewer than two distinct op counts were."""
    out: dict[str, list[float] | None] = {}
    for target in TARGETS:
        measured = [r for r in rows if target in r.targets]
        try:
            out[target] = list(fit_opcount([r.graph.to_graph() for r in measured],
                                           [r.targets[target]["latency_ms"]["median"] for r in measured]))
        except ValueError:  # fewer than two distinct op counts: no line to fit
            out[target] = None
    return out


def fit(rows: Sequence[Row], hidden: int, layers: int, steps: int, lr: float, seed: int) -> Predictor:
    """A predictor trained on `rows` (see the module's docstring), carrying the op-count model fitted on the same
    rows (`Predictor.opcount`)."""
    if not rows:
        raise ValueError("no rows to train the predictor on")
    torch.manual_seed(seed)
    records = [r.graph for r in rows]
    numbers = np.concatenate([node_numbers(r) for r in records])
    number_mean, number_std = numbers.mean(0), numbers.std(0)
    # Linear figures are only scaled (zero work stays zero, so sums over nodes stay sums of work); the int8 flag
    # stays 0/1; a constant feature is left as it is rather than divided by zero.
    number_mean[len(NUMBERS):] = 0.0
    number_std[len(NUMBERS):-1] = np.sqrt((numbers[:, len(NUMBERS):-1] ** 2).mean(0))
    number_std[-1] = 1.0
    number_std[number_std < 1e-6] = 1.0
    values, mask = labels(rows)
    counts = mask.sum(0)
    target_mean = np.where(counts > 0, (values * mask).sum(0) / np.maximum(counts, 1), 0.0)
    spread = np.sqrt((((values - target_mean) * mask) ** 2).sum(0) / np.maximum(counts, 1))
    target_std = np.where(spread > 1e-6, spread, 1.0)
    config = {"vocabulary": list(VOCABULARY), "numbers": list(NUMBERS), "linear": list(LINEAR),
              "columns": [list(c) for c in COLUMNS],
              "number_mean": number_mean.tolist(), "number_std": number_std.tolist(),
              "target_mean": target_mean.tolist(), "target_std": target_std.tolist(), "hidden": hidden,
              "layers": layers, "seed": seed, "steps": steps, "lr": lr, "opcount": fit_opcounts(rows)}
    net = SageNet(len(VOCABULARY) + FEATURES, hidden, layers, len(COLUMNS))
    predictor = Predictor(net, config)
    # Fixed chunks of GRAPHS_PER_STEP graphs (a seeded partition), one optimizer step each, visited in a seeded
    # order, each once per pass. Full-batch steps cost the whole dataset each and underfit in the time a run has
    # (160 graphs, 300 full-batch steps: 11% training MAPE; 3000 chunk steps, the same time: 5.5%), and a fixed
    # count of steps keeps that time the same as the dataset grows.
    order = np.random.default_rng(seed).permutation(len(rows))
    chunks = []
    for start in range(0, len(rows), GRAPHS_PER_STEP):
        picked = order[start:start + GRAPHS_PER_STEP]
        x, batch = predictor._inputs([records[i] for i in picked])
        chunks.append((x, batch, torch.from_numpy((values[picked] - target_mean) / target_std).float(),
                       torch.from_numpy(mask[picked]).float()))
    # Each measured column weighs the same, however few rows carry it (mobile is measured on a subset).
    weights = torch.from_numpy(np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)).float()
    columns = int((counts > 0).sum())
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    generator = torch.Generator().manual_seed(seed)
    visits: list[int] = []
    net.train()
    for _ in range(steps):
        if not visits:
            visits = torch.randperm(len(chunks), generator=generator).tolist()
        x, batch, y, m = chunks[visits.pop()]
        optimizer.zero_grad()
        # Scaled to the whole training set's count per column, so every chunk's step weighs its rows alike.
        loss = ((((net(x, batch) - y) ** 2) * m).sum(0) * weights).sum() * len(chunks) / columns
        loss.backward()
        optimizer.step()
        schedule.step()
    net.eval()
    return predictor


def ape(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """Mean and median absolute percentage error."""
    errors = np.abs(np.asarray(predicted) - np.asarray(measured)) / np.asarray(measured) * 100
    return {"mape": float(errors.mean()), "median_ape": float(np.median(errors))}


@dataclass(frozen=True)
class Evaluation:
    """Per held-out row and target: measured and predicted latency and memory, and the baselines' latency."""

    id: str
    family: str
    target: str
    latency_ms: float
    predicted_latency_ms: float
    opcount_latency_ms: float | None
    constant_latency_ms: float
    peak_memory_bytes: int
    predicted_peak_memory_bytes: float
    constant_peak_memory_bytes: float


def evaluate(predictor: Predictor, train_rows: Sequence[Row], test_rows: Sequence[Row]) -> list[Evaluation]:
    """The predictor, its op-count model and the constant (both fitted on `train_rows`, the predictor's training
    rows), on every target each of `test_rows` was measured on."""
    predictions = predictor.predict_records([r.graph for r in test_rows]) if test_rows else []
    out = []
    for target in TARGETS:
        train = [r for r in train_rows if target in r.targets]
        if not train:
            continue
        constant = float(np.exp(np.mean(np.log([r.targets[target]["latency_ms"]["median"] for r in train]))))
        constant_memory = float(np.exp(np.mean(np.log([r.targets[target]["peak_memory_bytes"] for r in train]))))
        coefficients = predictor.opcount[target]
        for row, predicted in zip(test_rows, predictions):
            measured = row.targets.get(target)
            if measured is None:
                continue
            out.append(Evaluation(
                id=row.id, family=row.family, target=target, latency_ms=measured["latency_ms"]["median"],
                predicted_latency_ms=predicted[target]["latency_ms"],
                opcount_latency_ms=None if coefficients is None else opcount_latency(row.graph.to_graph(),
                                                                                     *coefficients),
                constant_latency_ms=constant, peak_memory_bytes=measured["peak_memory_bytes"],
                predicted_peak_memory_bytes=predicted[target]["peak_memory_bytes"],
                constant_peak_memory_bytes=constant_memory))
    return out


def summarise(evaluations: Sequence[Evaluation], train_rows: Sequence[Row]) -> dict:
    """Per target: train and held-out counts, latency MAPE / median APE of the predictor, the op-count model and the
    constant (overall, and the predictor's per family), and peak-memory MAPE of the predictor and the constant."""
    table = {}
    for target in TARGETS:
        rows = [e for e in evaluations if e.target == target]
        entry: dict = {"train": sum(target in r.targets for r in train_rows), "held_out": len(rows)}
        if rows:
            measured = [e.latency_ms for e in rows]
            latency = {"predictor": ape([e.predicted_latency_ms for e in rows], measured),
                       "constant": ape([e.constant_latency_ms for e in rows], measured)}
            if all(e.opcount_latency_ms is not None for e in rows):
                latency["opcount"] = ape([e.opcount_latency_ms for e in rows], measured)
            latency["predictor_by_family"] = {
                family: ape([e.predicted_latency_ms for e in rows if e.family == family],
                            [e.latency_ms for e in rows if e.family == family])
                for family in sorted({e.family for e in rows})}
            memory = [e.peak_memory_bytes for e in rows]
            entry["latency"] = latency
            entry["peak_memory"] = {"predictor": ape([e.predicted_peak_memory_bytes for e in rows], memory),
                                    "constant": ape([e.constant_peak_memory_bytes for e in rows], memory)}
        table[target] = entry
    return table


def train(rows: Sequence[Row], params) -> tuple[Predictor, dict]:
    """Split `rows` by `held_out` (params.seed, params.holdout), train on the training side with params' hidden,
    layers, steps, lr and seed, and evaluate predictor and baselines on the held-out side. Returns the predictor
    and a report: the summary table (`summarise`), the per-row evaluations and the split's ids."""
    train_rows = [r for r in rows if not held_out(r.id, params.seed, params.holdout)]
    test_rows = [r for r in rows if held_out(r.id, params.seed, params.holdout)]
    if not train_rows:
        raise DataError(f"all {len(rows)} rows fall in the held-out split; measure more variants or lower "
                        "predictor.holdout")
    predictor = fit(train_rows, params.hidden, params.layers, params.steps, params.lr, params.seed)
    evaluations = evaluate(predictor, train_rows, test_rows)
    return predictor, {"table": summarise(evaluations, train_rows), "evaluations": evaluations,
                       "train_ids": [r.id for r in train_rows], "held_out_ids": [r.id for r in test_rows]}
