"""ExecuTorch export (XNNPACK backend, fp32 or int8) and the ExecuTorch runtime: the phone deployment, run here on x86.

A `.pte` file is a program lowered to XNNPACK, specialised to the example's shapes (batch 1). int8 files are
quantized with PyTorch 2 export quantization (XNNPACK quantizer: symmetric per-channel int8 weights, per-tensor
int8 activations) calibrated on batch-1 rows of the caller's batches. Lowering is slow single-threaded Python
(about a minute for a UNet, twice that for int8), so `Lowering` runs it in worker processes while the caller works.

Threads: XNNPACK runs on ExecuTorch's process-wide thread pool (one thread per logical processor unless set),
which a method captures when it is loaded (XNNPACK creates its runtime then). Its size is set with the runtime's
`_unsafe_reset_threadpool`, which replaces the pool: a method loaded before a change would go on using the
destroyed pool. So the timing functions size the pool first and load their methods after, and every function
here loads its own method per call and never hands one out.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
    XNNPACKQuantizer,
    get_symmetric_quantization_config,
)
from executorch.exir import to_edge_transform_and_lower
from executorch.exir._serialize._program import deserialize_pte_binary
from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count, _unsafe_reset_threadpool
from executorch.runtime import Method, Runtime
from torch import nn
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from condenser.runtime.measure import Latency, compare_calls, latency

Example = tuple[torch.Tensor, ...]
# name -> (model, example inputs, destination, calibration batches or None for fp32)
Job = tuple[nn.Module, Example, Path, Sequence[Example] | None]


def calibration_rows(calibration: Sequence[Example], max_examples: int = 64) -> list[Example]:
    """Batch-1 rows of `calibration` (tuples of positional inputs sharing their batch size), at most
    `max_examples` of them spread evenly over all the rows, so every batch (every timestep of a sampler,
    say) is represented. Rows are copies: a view would carry (and pickle) its whole batch."""
    sizes = []
    for i, batch in enumerate(calibration):
        lengths = {len(t) for t in batch}
        if len(lengths) != 1:
            raise ValueError(f"calibration batch {i}: inputs of different batch sizes {sorted(lengths)}")
        sizes.append(lengths.pop())
    total = sum(sizes)
    if total == 0 or max_examples < 1:
        raise ValueError(f"calibration: {total} examples, max_examples={max_examples}; at least one of each "
                         "is needed (calibration=None makes an fp32 file)")
    starts = np.cumsum([0, *sizes])
    picks = np.unique(np.linspace(0, total - 1, min(max_examples, total)).round().astype(int))
    rows = []
    for index in picks:
        b = int(np.searchsorted(starts, index, side="right") - 1)
        r = int(index - starts[b])
        rows.append(tuple(t[r:r + 1].clone() for t in calibration[b]))
    return rows


def _quantized(model: nn.Module, example: Example, rows: Sequence[Example]) -> torch.export.ExportedProgram:
    """`model` with int8 weights and activations, ranges observed on `rows`, exported again for lowering.

    Only Conv2d and Linear are quantized, the layers the simulation (condenser.compress.quantize) quantizes:
    the quantizer's global setting also requantizes adds, concatenations and attention's activation
    products, which on the student's UNet took the mean |int8 - fp32| output error from 0.018 (this
    operator-type setting) to 0.21 and its FD from fp32's 113 to 182 (measured here)."""
    config = get_symmetric_quantization_config(is_per_channel=True)
    # By operator, not module type: a module-type filter drops a conv fused with the ReLU after it.
    quantizer = (XNNPACKQuantizer().set_operator_type(torch.ops.aten.conv2d.default, config)
                 .set_operator_type(torch.ops.aten.linear.default, config))
    prepared = prepare_pt2e(torch.export.export(model, example).module(), quantizer)
    with torch.no_grad():
        for row in rows:
            prepared(*row)
    return torch.export.export(convert_pt2e(prepared), example)


def export_pte(model: nn.Module, example: Example, path: Path, calibration: Sequence[Example] | None = None,
               max_examples: int = 64) -> Path:
    """Lower `model` (put in eval mode) exported on `example` to XNNPACK and write the `.pte` to `path`:
    fp32 when `calibration` is None, else int8 calibrated on at most `max_examples` rows of it (see
    `calibration_rows`). The file appears only once complete (temporary file, then rename)."""
    return _export(model, example, path, None if calibration is None else calibration_rows(calibration, max_examples))


def _export(model: nn.Module, example: Example, path: Path, rows: Sequence[Example] | None) -> Path:
    path = Path(path)
    model.eval()
    program = torch.export.export(model, example) if rows is None else _quantized(model, example, rows)
    buffer = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(buffer)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _start_worker() -> None:
    """One torch thread per worker: the workers share the machine with each other and with the caller."""
    torch.set_num_threads(1)


def _lower(job: bytes) -> Path:
    return _export(*pickle.loads(job))


class Lowering:
    """`export_pte` jobs run in `workers` background processes (spawned, one torch thread each) while the
    caller goes on working; `result()` waits for them all.

    Each job is pickled when the Lowering is made (its model, example and calibration rows, picked here
    with `calibration_rows`), so the files are of the models as they were then, whatever the caller does to
    them afterwards. Models therefore must pickle, and their classes be importable by module name in a fresh
    process: a Generator, a diffusers UNet (in the sd_unet kind's exportable wrapper) and nn.Sequential do;
    a class defined in `__main__` or inside a function does not (and a script that makes a Lowering needs
    the `if __name__ == "__main__":` guard, as spawned processes import the main module). As a context
    manager it shuts the pool down on leaving, cancelling the jobs not yet started if the block raised
    (running ones are waited for). `max_examples` caps each job's calibration rows, as for `export_pte`.
    """

    def __init__(self, jobs: dict[str, Job], workers: int = 2, max_examples: int = 64):
        payloads = {name: pickle.dumps((model, example, Path(path),
                                        None if calibration is None else calibration_rows(calibration, max_examples)))
                    for name, (model, example, path, calibration) in jobs.items()}
        self._paths = {name: Path(job[2]) for name, job in jobs.items()}
        self._pool = ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs))),
                                         mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker)
        self._futures: dict[str, Future[Path]] = {name: self._pool.submit(_lower, payload)
                                            for name, payload in payloads.items()}

    def result(self) -> dict[str, Path]:
        """Every job's file, once all are written; a failed job's error re-raised naming the job."""
        done = {}
        for name, future in self._futures.items():
            try:
                done[name] = future.result()
            except Exception as error:
                raise RuntimeError(f"lowering '{name}' to {self._paths[name]} failed: "
                                   f"{type(error).__name__}: {error}") from error
        return done

    def __enter__(self) -> Lowering:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)


def _threads(threads: int) -> int:
    """Give ExecuTorch's thread pool `threads` threads; the count it then has. Methods loaded before this
    must not run after it (see the module's docstring)."""
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    _unsafe_reset_threadpool(threads)
    return _threadpool_get_thread_count()


def _load(path: Path) -> Method:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; lower the model with export_pte first")
    return Runtime.get().load_program(path).load_method("forward")


def run_pte(path: Path, inputs: Example) -> torch.Tensor:
    """The first output of the file at `path` on `inputs` (shaped as the export example was), on the thread
    pool as it is."""
    return _load(path).execute(list(inputs))[0]


def pte_runner(path: Path) -> Callable[[Example], torch.Tensor]:
    """A function computing the file's first output for inputs of any batch size, row by row (the program
    is specialised to the batch-1 export example), the program loaded once: for evaluating a deployed
    model on a whole held-out set."""
    method = _load(path)

    def run(inputs: Example) -> torch.Tensor:
        rows = len(inputs[0])
        return torch.cat([method.execute([t[i:i + 1].contiguous() for t in inputs])[0] for i in range(rows)])
    return run


def pte_latency(path: Path, inputs: Example, repeats: int, warmup: int = 3, threads: int = 1) -> Latency:
    """Latency of one ExecuTorch run of the file at `path` on `inputs`, XNNPACK using `threads` threads."""
    used = _threads(threads)
    method, feed = _load(path), list(inputs)
    return latency(lambda: method.execute(feed), repeats, warmup, threads=used)


def compare_pte_latency(files: dict[str, Path], inputs: Example, repeats: int, rounds: int = 5, warmup: int = 3,
                        threads: int = 1) -> dict[str, Latency]:
    """ExecuTorch latency of several files on the same `inputs`, side by side (`compare_calls`), XNNPACK
    using `threads` threads."""
    used = _threads(threads)
    methods = {name: _load(path) for name, path in files.items()}
    feed = list(inputs)
    return compare_calls({name: (lambda m=method: m.execute(feed)) for name, method in methods.items()},
                         repeats, rounds, warmup, used)


def arena_bytes(path: Path) -> int:
    """Bytes of the memory planner's activation arenas of the file's forward method. XNNPACK keeps the
    intermediate values of a delegated graph in its own workspace, which this does not count: for a fully
    delegated model the arena holds little more than the inputs and outputs."""
    plans = deserialize_pte_binary(Path(path).read_bytes()).program.execution_plan
    plan = next(p for p in plans if p.name == "forward")
    # Buffer 0 is reserved for constants and planned at size 0; the rest are the arenas.
    return int(sum(plan.non_const_buffer_sizes))
