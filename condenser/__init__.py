"""Condenser: compress text-to-image diffusion models into small, fast on-device models, reproducibly.

The library layer: models, compression methods, metrics, I/O and config. It never imports prefect,
`tasks/` or `flows/` (see DESIGN.md, "Layers").
"""

__version__ = "0.1.0"
