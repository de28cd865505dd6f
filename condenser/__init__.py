"""Condenser: compress text-to-image diffusion models into small, fast on-device models, reproducibly.

The library layer, by concern: `core` (params, errors, I/O, the stage contract), `data`, `models`,
`train`, `distill`, `quality`, `deliverables`, `compress`, `runtime`. It never imports prefect, `tasks/`
or `flows/` (docs/architecture.md, "Layers").
"""

__version__ = "0.1.0"
