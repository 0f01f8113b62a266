"""The presets `vqtool train --preset NAME` starts from: model shape and training options, overridden by options
given explicitly."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from vqtool.model.config import ModelConfig

# What `vqtool train --preset NAME` sets (model shape and codebook health); options given explicitly win.
# seed is the article's model. f8 and f4 are the best factor-8 and factor-4 tokenizers measured on the
# embedded data (benchmarks/presets.py; 1,500 steps, batch 128): residual blocks at the latent resolution,
# codes looked up in 8 dimensions and compared by cosine similarity (as LlamaGen does), and dead codes
# re-seeded after 100 idle steps (70 for f8), which together keep almost every code in use. f8 also trains with
# the rotation trick, Adam's beta2 at 0.95, twice the article's rate with the weights averaged (0.99), a
# 200-step cool-down and the usage term at 0.003 (docs/results.md and the README have the figures).
PRESETS: dict[str, dict[str, Any]] = {
    "seed": {},
    "f8": {
        "codes": 512,
        "dim": 64,
        "downsample": 8,
        "res_blocks": 2,
        "lookup_dim": 8,
        "l2_codes": True,
        "restart_dead": 70,
        "rotation_trick": True,
        "adam_beta2": 0.95,
        "lr": 2e-3,
        "cooldown_steps": 200,
        "average_weights": 0.99,
        "usage_loss": 0.003,
    },
    "f4": {
        "codes": 512,
        "dim": 64,
        "downsample": 4,
        "res_blocks": 2,
        "lookup_dim": 8,
        "l2_codes": True,
        "restart_dead": 100,
    },
}
MODEL_FIELDS = frozenset(f.name for f in fields(ModelConfig))


def preset_settings(name: str, explicit: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ModelConfig fields, TrainConfig fields) of a preset, overridden by the options given explicitly (not None)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    given = {k: v for k, v in explicit.items() if v is not None}
    preset = dict(PRESETS[name])
    if given.get("lr_schedule", "constant") != "constant":
        preset.pop("cooldown_steps", None)  # a preset's cool-down ends its constant rate, not a schedule given instead
    merged = {**preset, **given}
    model = {k: v for k, v in merged.items() if k in MODEL_FIELDS}
    return model, {k: v for k, v in merged.items() if k not in MODEL_FIELDS}
