"""The presets `vqtool train --preset NAME` starts from: model shape and training options, overridden by options
given explicitly."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from vqtool.model.config import ModelConfig

# What `vqtool train --preset NAME` sets (model shape and codebook health); options given explicitly win.
# article is the reference design, the model of the article the product started from (docs/models.md cites it).
# f8 and f4 are the best factor-8 and factor-4 tokenizers measured on the embedded data (benchmarks/presets.py;
# 1,500 steps, batch 128): residual blocks at the latent resolution, codes looked up in 8 dimensions and compared by
# cosine similarity (as LlamaGen does), and dead codes re-seeded after 100 idle steps (70 for f8), which together
# keep almost every code in use. f8 also trains with the rotation trick, Adam's beta2 at 0.95, twice the reference
# rate with the weights averaged (0.99), a 200-step cool-down and the usage term at 0.003 (docs/experiments.md).
PRESETS: dict[str, dict[str, Any]] = {
    "article": {},
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
# Former names, still accepted: the reference design was the `seed` preset, a name --seed made ambiguous.
PRESET_ALIASES = {"seed": "article"}
DEFAULT_PRESET = "article"
MODEL_FIELDS = frozenset(f.name for f in fields(ModelConfig))


def preset_name(name: str) -> str:
    """The preset a name (or a former name) stands for."""
    return PRESET_ALIASES.get(name, name)


def preset_settings(name: str, explicit: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ModelConfig fields, TrainConfig fields) of a preset, overridden by the options given explicitly (not None)."""
    name = preset_name(name)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    given = {k: v for k, v in explicit.items() if v is not None}
    preset = dict(PRESETS[name])
    if given.get("lr_schedule", "constant") != "constant":
        preset.pop("cooldown_steps", None)  # a preset's cool-down ends its constant rate, not a schedule given instead
    merged = {**preset, **given}
    model = {k: v for k, v in merged.items() if k in MODEL_FIELDS}
    return model, {k: v for k, v in merged.items() if k not in MODEL_FIELDS}
