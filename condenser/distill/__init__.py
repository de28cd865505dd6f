"""Distillation: editing pairs from the teacher, fewer sampling steps, per-concept LoRA editors."""
