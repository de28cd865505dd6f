"""The performance predictor's training population: variants of the two deliverable families, built with random
weights, exported as they ship, and measured on this machine's runtimes.

A variant is an architecture (the editor's `GeneratorConfig` sizes, or a diffusers UNet's widths, depths and
attention per level, at the input size it runs at), a filter-pruning ratio (channels removed with the kind's own
`prune_filters` spec, so widths come out as uneven as a pruned deliverable's) and a precision: fp32, or int8 as
the deliverables deploy it (ONNX Runtime QDQ U8S8: uint8 activations, int8 weights per channel; XNNPACK int8 on
ExecuTorch). Weights are random: latency and memory depend on shapes and operators, not on values.

`sample_population(seed, n)` draws the variants one after another from a seeded generator, skipping repeats, so
a longer population starts with the shorter one and a dataset measured on a prefix stays valid as it grows.

Measuring (`measure_many`): every variant is built, exported (ONNX, and the QDQ file) and, for the mobile ones,
lowered to ExecuTorch first, in worker processes; only then, with none of that running, are the files timed, all
of them in interleaved rounds so that a slow spell of the shared machine spreads over many variants. A `Row`
keeps the graph (per-node features and edges from `condenser.targets.graph.load_graph`), not the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn
from tqdm.auto import tqdm

from condenser.compress.sparse.filters import prune_filters
from condenser.core.environment import cpu_model
from condenser.models.editor import Generator, GeneratorConfig
from condenser.runtime.executorch import arena_bytes, compare_pte_latency, export_pte
from condenser.runtime.measure import timed_rounds
from condenser.runtime.onnx import export_onnx, session
from condenser.runtime.onnx_quant import Feeds
from condenser.targets.graph import Graph, Node, load_graph, peak_memory

EDITOR, UNET = "gan_editor", "sd_unet"
FAMILIES = (EDITOR, UNET)
TARGETS = ("cpu", "mobile")
# The teacher's text encoder (all-MiniLM-L6-v2) and caption length (params.yaml teacher.max_caption_tokens).
TEXT_WIDTH, TOKENS = 384, 16
LATENT_CHANNELS = 4
# Timestep the UNet examples carry: any timestep has the same shapes and cost.
TIMESTEP = 500
# Operators ONNX Runtime quantizes in the deployed int8 files (condenser.runtime.onnx_quant): the layers with
# weights and the activations fused into them. Everything else stays float between Q/DQ pairs, as deployed.
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "Relu", "Clip"]
# Random batches ONNX Runtime and the XNNPACK quantizer calibrate activation ranges on: ranges change scales,
# not shapes or kernels, so a few suffice.
CALIBRATION_BATCHES, CALIBRATION_SIZE = 2, 4


@dataclass(frozen=True)
class Space:
    """The choices sampled for each knob of each family (a value of a knob is drawn uniformly), and the
    fraction of variants that are UNets. Editor knobs: channels, blocks, block, code_dim, resolution (image
    pixels). UNet knobs: channels (the first level's width; the others double it once), levels,
    layers_per_block, attention (per level, drawn independently), sample_size (latent pixels). Both: prune
    (filter-pruning ratio) and int8."""

    unet_share: float
    editor: dict[str, tuple]
    unet: dict[str, tuple]


# The default population: around the deliverables' own sizes (gan_base.generator: 16 channels, 3 resnet blocks,
# code_dim 32, 16-pixel images; teacher.unet: channels (32, 64), one layer per block, 8-pixel latents), smaller
# and larger. UNets are a third: each costs several editors' time to export and quantize.
DEFAULT_SPACE = Space(
    unet_share=1 / 3,
    editor={"channels": (8, 12, 16, 24, 32), "blocks": (1, 2, 3, 4), "block": ("resnet", "inception"),
            "code_dim": (8, 16, 32), "resolution": (16, 24, 32), "prune": (0.0, 0.25, 0.5), "int8": (False, True)},
    unet={"channels": (16, 24, 32, 48), "levels": (2, 3), "layers_per_block": (1, 2), "attention": (True, False),
          "sample_size": (8, 12, 16), "prune": (0.0, 0.25, 0.5), "int8": (False, True)})


@dataclass(frozen=True)
class Variant:
    """One architecture at one pruning ratio and precision; `config` holds JSON values only."""

    family: str
    config: dict[str, Any]

    @property
    def id(self) -> str:
        """A stable name: the hash of the family and config, so the same variant has the same id on every
        machine and in every population it is drawn into."""
        text = json.dumps({"family": self.family, "config": self.config}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def quantized(self) -> bool:
        return bool(self.config["int8"])


def _draw(rng: np.random.Generator, choices: Sequence) -> Any:
    value = choices[int(rng.integers(len(choices)))]
    return value.item() if isinstance(value, np.generic) else value


def _sample_one(rng: np.random.Generator, space: Space) -> Variant:
    if rng.random() < space.unet_share:
        knobs = dict(space.unet)
        levels = _draw(rng, knobs.pop("levels"))
        attention = knobs.pop("attention")
        config = {k: _draw(rng, v) for k, v in knobs.items()}
        config.update(levels=levels, attention=[bool(_draw(rng, attention)) for _ in range(levels)])
        return Variant(UNET, dict(sorted(config.items())))
    return Variant(EDITOR, {k: _draw(rng, v) for k, v in sorted(space.editor.items())})


def sample_population(seed: int, n: int, space: Space = DEFAULT_SPACE) -> list[Variant]:
    """`n` distinct variants drawn from `space` with a generator seeded by `seed`, in the order drawn: the first
    k of a population of n are the population of k. Raises ValueError when the space has fewer than `n`."""
    rng = np.random.default_rng(seed)
    found: dict[str, Variant] = {}
    draws = 0
    while len(found) < n:
        draws += 1
        if draws > 100 * n + 1000:
            raise ValueError(f"the population space yields fewer than {n} distinct variants; widen it or ask "
                             "for fewer")
        variant = _sample_one(rng, space)
        found.setdefault(variant.id, variant)
    return list(found.values())


def _unet_channels(config: dict) -> tuple[int, ...]:
    base = config["channels"]
    return (base, *([2 * base] * (config["levels"] - 1)))


def example_inputs(variant: Variant) -> dict[str, torch.Tensor]:
    """Batch-1 inputs of `variant` by ONNX input name, the same on every call (seeded by the variant's id)."""
    gen = torch.Generator().manual_seed(int(variant.id, 16) % 2**31)
    if variant.family == EDITOR:
        size = variant.config["resolution"]
        return {"image": torch.rand(1, 3, size, size, generator=gen) * 2 - 1}
    if variant.family == UNET:
        size = variant.config["sample_size"]
        return {"sample": torch.randn(1, LATENT_CHANNELS, size, size, generator=gen),
                "timestep": torch.tensor([TIMESTEP]),
                "encoder_hidden_states": torch.randn(1, TOKENS, TEXT_WIDTH, generator=gen)}
    raise ValueError(f"unknown family '{variant.family}'; one of {', '.join(FAMILIES)}")


def build(variant: Variant) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The variant's exportable model (positional inputs, a tensor out) with random weights, pruned as its
    config says, and its batch-1 example inputs by ONNX input name. Weights and pruned widths are seeded by
    the variant's id, so a variant is the same model on every call."""
    # The kinds bring the whole deliverables stack (diffusers pipelines, transformers: seconds to import): only
    # where models are built, in the measuring workers.
    from condenser.deliverables import KINDS

    torch.manual_seed(int(variant.id, 16) % 2**31)
    config, kind = variant.config, KINDS[variant.family]
    if variant.family == EDITOR:
        model = Generator(GeneratorConfig(concepts=("edit",), channels=config["channels"], blocks=config["blocks"],
                                          block=config["block"], code_dim=config["code_dim"], default="edit"))
    elif variant.family == UNET:
        from diffusers import UNet2DConditionModel

        channels = _unet_channels(config)
        # diffusers' attention_head_dim is the head count here, as in the teacher (teacher.unet.attention_head_dim).
        model = UNet2DConditionModel(
            sample_size=config["sample_size"], in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config["attention"]),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config["attention"])),
            block_out_channels=channels, layers_per_block=config["layers_per_block"], attention_head_dim=8,
            norm_num_groups=math.gcd(16, *channels), cross_attention_dim=TEXT_WIDTH, addition_embed_type="text")
    else:
        raise ValueError(f"unknown family '{variant.family}'; one of {', '.join(FAMILIES)}")
    example = example_inputs(variant)
    model.eval()
    if config["prune"] > 0:
        spec = kind.filter_spec(model)
        with _quiet():
            model = prune_filters(model, example, config["prune"], replace(spec, fix=_regrouped(spec.fix)))
    return kind.exportable(model).eval(), example


def _regrouped(fix: Callable[[nn.Module], None] | None) -> Callable[[nn.Module], None]:
    """The kind's fix, then every GroupNorm's group count lowered to divide its pruned width. torch-pruning keeps
    the group count, so most ratios would leave some width indivisible (the sparse stage reports that and asks
    for another ratio); the population wants every ratio at every width, and the count of groups changes
    neither the operators nor their cost."""
    def apply(model: nn.Module) -> None:
        if fix is not None:
            fix(model)
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.num_channels = m.weight.shape[0]
                m.num_groups = math.gcd(m.num_groups, m.num_channels)
    return apply


def calibration(example: dict[str, torch.Tensor], seed: int) -> list[dict[str, torch.Tensor]]:
    """Random batches shaped like `example` (inputs in the range the deliverables see them: images in [-1, 1],
    unit-normal latents and caption embeddings, timesteps over the schedule)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(CALIBRATION_BATCHES):
        batch = {}
        for name, t in example.items():
            shape = (CALIBRATION_SIZE, *t.shape[1:])
            if name == "timestep":
                batch[name] = torch.randint(0, 2 * TIMESTEP, shape, generator=gen)
            elif name == "image":
                batch[name] = torch.rand(shape, generator=gen) * 2 - 1
            else:
                batch[name] = torch.randn(shape, generator=gen)
        batches.append(batch)
    return batches


def _quiet():
    """ONNX Runtime's quantizer logs a warning per normalization bias and advice on pre-processing; the exporter
    and torch-pruning warn about tracing. None of it is actionable here."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    stack.callback(root.setLevel, level)
    return stack


def export_int8(fp32: Path, out: Path, feeds: Sequence[dict[str, np.ndarray]]) -> Path:
    """The QDQ U8S8 file of the float file `fp32`, as the deliverables deploy it (per-channel int8 weights,
    uint8 activations, min-max ranges on `feeds`; integer MatMul/Gemm return float), at `out`."""
    with tempfile.TemporaryDirectory(prefix="condenser-population-") as tmp, _quiet():
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and ONNX Runtime's graph optimizations first, as the deliverables' files are made: the
        # quantizer's cost grows with the square of the node count, which the optimizations halve for a UNet.
        quant_pre_process(str(fp32), str(prepared), auto_merge=True)
        quantize_static(str(prepared), str(out), Feeds(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=QUANTIZED_OPS,
                        extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]})
    return Path(out)


# --- the measured row and its compact graph -----------------------------------------------------------------------

@dataclass(frozen=True)
class GraphRecord:
    """A `Graph` reduced to what the predictor and the op-count model read: per node its operator, output
    shape, MACs, ops, bytes and int8 flag, and the data-flow edges (producer index, consumer index). Node and
    tensor names are dropped; `to_graph` rebuilds a `Graph` with the same nodes' figures and the same edges."""

    ops: list[str]
    out_shapes: list[list[int]]
    numbers: list[list[int]]   # per node: macs, ops, input_bytes, output_bytes, weight_bytes, quantized
    edges: list[list[int]]
    weight_bytes: int

    @classmethod
    def from_graph(cls, graph: Graph) -> GraphRecord:
        return cls(ops=[n.op for n in graph.nodes], out_shapes=[list(n.out_shape) for n in graph.nodes],
                   numbers=[[n.macs, n.ops, n.input_bytes, n.output_bytes, n.weight_bytes, int(n.quantized)]
                            for n in graph.nodes],
                   edges=[[i, j] for i, j in graph.edges()], weight_bytes=graph.weight_bytes)

    def to_graph(self) -> Graph:
        """A `Graph` whose node i writes tensor `t<i>` and reads the tensors of its producers."""
        producers: dict[int, list[int]] = {}
        for i, j in self.edges:
            producers.setdefault(j, []).append(i)
        nodes = tuple(Node(name=f"{op}_{i}", op=op, inputs=tuple(f"t{p}" for p in producers.get(i, ())),
                           outputs=(f"t{i}",), macs=nums[0], ops=nums[1], input_bytes=nums[2], output_bytes=nums[3],
                           weight_bytes=nums[4], out_shape=tuple(shape), quantized=bool(nums[5]))
                      for i, (op, shape, nums) in enumerate(zip(self.ops, self.out_shapes, self.numbers)))
        return Graph(nodes=nodes, tensor_bytes={f"t{i}": n.output_bytes for i, n in enumerate(nodes)}, inputs=(),
                     outputs=(), weight_bytes=self.weight_bytes)

    @property
    def total_ops(self) -> int:
        return sum(n[1] for n in self.numbers)


@dataclass
class Row:
    """One measured variant: its graph (the ONNX file's, fp32 or QDQ), config, where it was measured (the CPU's
    model name and the thread count: latency means nothing elsewhere) and per target its latency in ms over
    `repeats` calls (median, p95; on cpu also min and noise, see `time_interleaved`) and peak memory label (cpu:
    the liveness pass over the ONNX graph; mobile: the ExecuTorch memory planner's arena)."""

    id: str
    family: str
    config: dict[str, Any]
    quantized: bool
    machine: str
    threads: int
    repeats: int
    graph: GraphRecord
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> Row:
        return cls(**{**raw, "graph": GraphRecord(**raw["graph"])})


# --- measuring ----------------------------------------------------------------------------------------------------

def _numpy(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in inputs.items()}


def _onnx_file(variant: Variant, workdir: Path) -> Path:
    return Path(workdir) / f"{variant.id}.{'int8' if variant.quantized else 'fp32'}.onnx"


def _pte_file(variant: Variant, workdir: Path) -> Path:
    return Path(workdir) / f"{variant.id}.pte"


def export_variant(variant: Variant, workdir: Path) -> tuple[GraphRecord, int]:
    """Build `variant` and write the ONNX file it ships as (fp32, or QDQ int8) under `workdir`; its graph and the
    liveness pass's peak activation bytes (the `cpu` memory label)."""
    from condenser.deliverables import KINDS

    model, example = build(variant)
    fp32 = Path(workdir) / f"{variant.id}.fp32.onnx"
    with _quiet():
        export_onnx(model, tuple(example.values()), fp32, list(example), list(KINDS[variant.family].output_names))
    path = fp32
    if variant.quantized:
        path = export_int8(fp32, _onnx_file(variant, workdir), [_numpy(b) for b in calibration(example, seed=1)])
    graph = load_graph(path)
    return GraphRecord.from_graph(graph), peak_memory(graph).peak_bytes


def lower_variant(variant: Variant, workdir: Path) -> int:
    """Build `variant` and lower it to an XNNPACK `.pte` under `workdir` (int8 with the XNNPACK quantizer,
    calibrated on random batches, when the variant is int8); the memory planner's arena bytes (the `mobile`
    memory label)."""
    model, example = build(variant)
    rows = [tuple(b.values()) for b in calibration(example, seed=1)] if variant.quantized else None
    with _quiet():
        path = export_pte(model, tuple(example.values()), _pte_file(variant, workdir), calibration=rows)
    return arena_bytes(path)


def _one_thread() -> None:
    """Workers share the machine with each other: one torch thread each."""
    torch.set_num_threads(1)


def _run_jobs(jobs: dict[tuple[str, str], tuple[Callable, tuple]], workers: int, progress: bool) -> dict:
    """Every job's result by key, the jobs run in `workers` spawned processes (in this one when 0). A failed job
    cancels the ones not started and is re-raised naming its variant."""
    results = {}

    def record(key: tuple[str, str], get: Callable[[], Any]) -> None:
        try:
            results[key] = get()
        except Exception as error:
            raise RuntimeError(f"{key[0]} of variant {key[1]} failed: {type(error).__name__}: {error}") from error

    with tqdm(total=len(jobs), desc="predictor: exporting and lowering", unit="file", disable=not progress) as bar:
        if not workers:
            for key, (fn, args) in jobs.items():
                record(key, lambda: fn(*args))
                bar.update()
            return results
        with ProcessPoolExecutor(max_workers=workers, initializer=_one_thread,
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(fn, *args): key for key, (fn, args) in jobs.items()}
            try:
                for future in as_completed(futures):
                    record(futures[future], future.result)
                    bar.update()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    return results


def measure_many(variants: Sequence[Variant], workdir: Path, mobile: Iterable[str] = (), repeats: int = 50,
                 threads: int = 1, workers: int = 2, progress: bool = True) -> tuple[list[Row], dict[str, float]]:
    """Rows for `variants`, measured on `cpu` and, for the ids in `mobile`, on `mobile` too, their files written
    under `workdir`. Building, exporting and lowering run first, in `workers` processes (0: in this one); then
    each file is timed here, `repeats` calls after 3 warmup ones on `threads` threads, with nothing else of
    ours running. Returns the rows (in the order given) and the seconds spent preparing and timing."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    by_id = {v.id: v for v in variants}
    mobile = set(mobile)
    unknown = mobile - set(by_id)
    if unknown:
        raise ValueError(f"mobile ids {sorted(unknown)} are not among the variants to measure")
    started = time.perf_counter()
    # The long lowerings first, so they do not end up alone at the end on one worker.
    jobs: dict[tuple[str, str], tuple[Callable, tuple]] = {
        ("lowering", v.id): (lower_variant, (v, workdir)) for v in variants if v.id in mobile}
    jobs.update({("export", v.id): (export_variant, (v, workdir)) for v in variants})
    results = _run_jobs(jobs, workers, progress)
    prepared = time.perf_counter()
    examples = {v.id: example_inputs(v) for v in variants}
    cpu_times = time_interleaved({v.id: _onnx_call(_onnx_file(v, workdir), _numpy(examples[v.id]), threads)
                                  for v in variants}, repeats, progress=progress)
    mobile_times = _time_ptes({v.id: _pte_file(v, workdir) for v in variants if v.id in mobile}, examples, repeats,
                              threads)
    cpu = cpu_model()
    rows = []
    for v in variants:
        record, peak = results[("export", v.id)]
        targets = {"cpu": {"latency_ms": cpu_times[v.id], "peak_memory_bytes": peak}}
        if v.id in mobile:
            targets["mobile"] = {"latency_ms": mobile_times[v.id], "peak_memory_bytes": results[("lowering", v.id)]}
        rows.append(Row(id=v.id, family=v.family, config=v.config, quantized=v.quantized, machine=cpu,
                        threads=threads, repeats=repeats, graph=record, targets=targets))
    return rows, {"prepare_s": prepared - started, "timing_s": time.perf_counter() - prepared}


def _onnx_call(path: Path, feed: dict[str, np.ndarray], threads: int) -> Callable[[], Any]:
    runner = session(path, threads)
    return lambda: runner.run(None, feed)


def time_interleaved(calls: dict[str, Callable[[], Any]], repeats: int, rounds: int = 5, warmup: int = 3,
                     progress: bool = False) -> dict[str, dict[str, float]]:
    """Per call, milliseconds of `repeats` calls after `warmup`, timed side by side (`timed_rounds`): median,
    p95, min, and `noise`, the relative difference between the medians of the even and the odd rounds (how far
    two measurements of the same file disagree here, the floor under any predictor's error)."""
    bar = partial(tqdm, desc="predictor: timing", unit="round", disable=not progress)
    times = timed_rounds(calls, repeats, rounds, warmup, progress=bar)
    out = {}
    for name, per in times.items():
        flat = np.concatenate(per)
        even, odd = np.concatenate(per[0::2]), np.concatenate(per[1::2] or per[:1])
        out[name] = {"median": float(np.median(flat)), "p95": float(np.percentile(flat, 95)), "min": float(flat.min()),
                     "noise": float(abs(np.median(even) - np.median(odd)) / np.median(flat))}
    return out


def _time_ptes(files: dict[str, Path], examples: dict[str, dict[str, torch.Tensor]], repeats: int,
               threads: int) -> dict[str, dict[str, float]]:
    """ExecuTorch latency (median, p95) of each file, files of the same input shapes timed side by side on one
    input (`compare_pte_latency`; an input's values do not change a latency)."""
    groups: dict[tuple, list[str]] = {}
    for key in files:
        groups.setdefault(tuple((k, tuple(t.shape)) for k, t in examples[key].items()), []).append(key)
    out = {}
    for keys in groups.values():
        measured = compare_pte_latency({k: files[k] for k in keys}, tuple(examples[keys[0]].values()), repeats,
                                       threads=threads)
        out.update({k: {"median": lat.median_ms, "p95": lat.p95_ms} for k, lat in measured.items()})
    return out


def measure(variant: Variant, workdir: Path, targets: Sequence[str] = ("cpu",), repeats: int = 50,
            threads: int = 1) -> Row:
    """One variant measured on `targets` (`cpu`, and optionally `mobile`), its files under `workdir`, all in
    this process."""
    unknown = set(targets) - set(TARGETS)
    if "cpu" not in targets or unknown:
        raise ValueError(f"targets {list(targets)}: cpu is always measured, mobile optionally ({', '.join(TARGETS)})")
    rows, _ = measure_many([variant], workdir, mobile=[variant.id] if "mobile" in targets else [],
                           repeats=repeats, threads=threads, workers=0, progress=False)
    return rows[0]
