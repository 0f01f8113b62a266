"""Checkpoints as their authors published them, before any library converted them: LlamaGen's tokenizers (a torch
file with the weights under "model"), DeepSeek's Janus / Janus-Pro repositories (the VQ model's `gen_vision_model.*`
tensors inside the multimodal checkpoint's safetensors shards), and taming-transformers' VQGANs, latent
diffusion's first-stage VQ models and Chameleon's VQGAN (a Lightning `.ckpt` beside the YAML that describes it).

Each is read as data (pickles by `pickled.py`, which runs nothing in them; shards tensor by tensor, only the VQ
model's), its weights renamed into the library class that runs the same design (transformers' `JanusVQVAE` for
LlamaGen and Janus, diffusers' `VQModel` for the taming family), and given the original's quantizer: LlamaGen and
Janus search l2-normalised latents against l2-normalised codes, as their `VectorQuantizer` does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqtool.errors import VqtoolError, first_line
from vqtool.model.config import JANUS, LLAMAGEN, TAMING
from vqtool.model.pickled import read_pickled_checkpoint, tensors_under

# The YAML beside a taming / latent-diffusion / Chameleon checkpoint, by the names their releases use.
TAMING_CONFIG_NAMES = ("model.yaml", "config.yaml", "vqgan.yaml", "project.yaml")
# taming's released runs keep the checkpoint and the YAML in subfolders: logs/NAME/{checkpoints,configs}/.
TAMING_CHECKPOINTS, TAMING_CONFIGS = "checkpoints", "configs"
CHECKPOINT_SUFFIXES = {".ckpt": TAMING, ".pt": LLAMAGEN, ".pth": LLAMAGEN}
JANUS_PREFIX = "gen_vision_model."
JANUS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Original:
    """An original checkpoint, read and renamed: the library class that runs its design, that class's
    configuration, the weights under that class's names, and which quantizer gives the original's codes."""

    library: str
    class_name: str
    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    quantizer: str
    image_size: int
    described: str  # one line: what was read, from where
    used_codes: int | None = None  # taming's remap: the codebook rows in use (ImportedConfig.used_codes)


# ---- LlamaGen and Janus: tokenizer/tokenizer_image/vq_model.py -> transformers' JanusVQVAE ------------------------

# LlamaGen's module names -> JanusVQVAE's, applied in order (both list the deepest level first).
LLAMAGEN_KEYS: tuple[tuple[str, str], ...] = (
    (r"^encoder\.conv_blocks\.", "encoder.down."),
    (r"^decoder\.conv_blocks\.", "decoder.up."),
    (r"^(encoder|decoder)\.(down|up)\.(\d+)\.res\.", r"\1.\2.\3.block."),
    (r"^(encoder|decoder)\.mid\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid\.1\.", r"\1.mid.attn_1."),
    (r"^(encoder|decoder)\.mid\.2\.", r"\1.mid.block_2."),
)
# LlamaGen's count of how often each code was used in training: not part of the model.
LLAMAGEN_DROPPED = ("quantize.codebook_used",)
# Where LlamaGen's own loading code looks for the weights in its .pt files, in its order.
LLAMAGEN_STATE_KEYS = ("ema", "model", "state_dict")
LLAMAGEN_SIZE = 256  # its class-conditional tokenizers' training size (vq_ds8_c2i, vq_ds16_c2i)
JANUS_SIZE = 384  # Janus and Janus-Pro generate 384 x 384 images (24 x 24 codes)


def _levels(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    """The output channels of each level's first residual block under `prefix` (e.g. encoder.conv_blocks)."""
    found: dict[int, int] = {}
    for key, value in state.items():
        match = re.fullmatch(re.escape(prefix) + r"\.(\d+)\.res\.0\.conv2\.weight", key)
        if match:
            found[int(match.group(1))] = int(value.shape[0])
    return [found[i] for i in sorted(found)]


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    return len({m.group(1) for key in state if (m := re.fullmatch(pattern, key))})


def llamagen_config(state: dict[str, torch.Tensor], image_size: int, path: Path) -> dict[str, Any]:
    """JanusVQVAEConfig's values for the LlamaGen VQ model whose weights these are: LlamaGen's ModelArgs (codebook
    size and dimension, z channels, channel multipliers) read from the tensors' shapes, so no option can disagree
    with the weights."""
    try:
        codes, dim = state["quantize.embedding.weight"].shape
        latent_channels = int(state["quant_conv.weight"].shape[1])
        base = int(state["encoder.conv_in.weight"].shape[0])
    except (KeyError, ValueError):
        raise VqtoolError(
            "holds no LlamaGen VQ model (no quantize.embedding, quant_conv or encoder.conv_in)", path
        ) from None
    encoder = [c // base for c in _levels(state, "encoder.conv_blocks")]
    decoder = [c // base for c in reversed(_levels(state, "decoder.conv_blocks"))]
    if not encoder or encoder != decoder:
        raise VqtoolError(
            f"its encoder's channel multipliers {encoder} and decoder's {decoder} differ; transformers' JanusVQVAE, "
            "which runs LlamaGen's design, has one for both",
            path,
        )
    factor = 2 ** (len(encoder) - 1)
    if image_size % factor:
        raise VqtoolError(f"--image-size must be a multiple of the model's factor {factor}, got {image_size}")
    return {
        "embed_dim": int(dim),
        "num_embeddings": int(codes),
        "double_latent": False,
        "latent_channels": latent_channels,
        "in_channels": 3,
        "out_channels": 3,
        "base_channels": base,
        "channel_multiplier": encoder,
        "num_res_blocks": _count(state, r"encoder\.conv_blocks\.0\.res\.(\d+)\.conv1\.weight"),
        "dropout": 0.0,
        "num_patches": image_size // factor,
    }


def llamagen_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LlamaGen's (or Janus's, its prefix removed) VQ weights under JanusVQVAE's names; the codebook as stored."""
    renamed = {}
    for key, value in state.items():
        if key in LLAMAGEN_DROPPED:
            continue
        for pattern, replacement in LLAMAGEN_KEYS:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def _llamagen_weights(payload: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in LLAMAGEN_STATE_KEYS:
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            return tensors_under(payload, key, path)
    return tensors_under(payload, None, path)


def _llamagen_design(state: dict[str, torch.Tensor], size: int, where: Path, described: str) -> Original:
    """LlamaGen's VQ model (its weights in `state`, under LlamaGen's names) at `size`, run by JanusVQVAE with the
    original's l2-normalised search."""
    config = llamagen_config(state, size, where)
    what = f"({config['num_embeddings']} codes of {config['embed_dim']} dimensions)"
    factor = 2 ** (len(config["channel_multiplier"]) - 1)
    return Original(
        "transformers",
        "JanusVQVAE",
        config,
        llamagen_state(state),
        "original",
        size,
        described.format(factor=factor, what=what),
    )


def read_llamagen(path: Path, image_size: int | None, allow_pickle: bool) -> Original:
    """A LlamaGen tokenizer checkpoint (vq_ds8_c2i.pt, vq_ds16_c2i.pt, vq_ds16_t2i.pt)."""
    state = _llamagen_weights(read_pickled(path, allow_pickle), path)
    size = image_size or LLAMAGEN_SIZE
    return _llamagen_design(state, size, path, f"LlamaGen VQ-{{factor}} {{what}} from {path.name}")


def _inside(folder: Path, name: object) -> Path:
    """`name` from a file in `folder`, refused where it is no file name or leads outside it."""
    if not isinstance(name, str):
        raise VqtoolError(f"names {name!r}, which is not a file name", folder)
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()) or not path.is_file():
        raise VqtoolError(f"names {name!r}, which is not a file inside the folder", folder)
    return path


def _janus_shards(folder: Path) -> tuple[list[Path], bool]:
    """The checkpoint files of a Janus folder holding gen_vision_model's tensors, and whether they are pickles."""
    for index_name, pickled in ((JANUS_INDEX, False), ("pytorch_model.bin.index.json", True)):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = sorted({file for key, file in weight_map.items() if key.startswith(JANUS_PREFIX)})
            except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
                raise VqtoolError(f"not a readable checkpoint index ({first_line(exc)})", index) from None
            if not names:
                raise VqtoolError(f"lists no {JANUS_PREFIX}* tensors: not a Janus checkpoint", index)
            return [_inside(folder, name) for name in names], pickled
    for name, pickled in (("model.safetensors", False), ("pytorch_model.bin", True)):
        if (folder / name).is_file():
            return [folder / name], pickled
    raise VqtoolError(f"holds neither {JANUS_INDEX} nor model.safetensors nor pytorch_model.bin", folder)


def read_janus(folder: Path, image_size: int | None, allow_pickle: bool) -> Original:
    """DeepSeek's original Janus / Janus-Pro folder: only the gen_vision_model tensors are read (the language model's
    stay on disk), from the safetensors shards that hold them or, allowed, the pickled ones (mapped, not read)."""
    shards, pickled = _janus_shards(folder)
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        if pickled:
            whole = tensors_under(read_pickled(shard, allow_pickle), None, shard)
            found = {k: v for k, v in whole.items() if k.startswith(JANUS_PREFIX)}
        else:
            found = _safetensors_with_prefix(shard, JANUS_PREFIX)
        state.update({key.removeprefix(JANUS_PREFIX): value for key, value in found.items()})
    if not state:
        raise VqtoolError(f"its weights hold no {JANUS_PREFIX}* tensors: not a Janus checkpoint", folder)
    size = image_size or JANUS_SIZE
    described = f"Janus's generation VQ model {{what}} from {len(shards)} of its checkpoint files"
    return _llamagen_design(state, size, folder, described)


def _safetensors_with_prefix(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as shard:
            return {key: shard.get_tensor(key) for key in shard.keys() if key.startswith(prefix)}
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise VqtoolError(f"not a readable safetensors file ({first_line(exc)})", path) from None


def read_pickled(path: Path, allow_pickle: bool) -> Any:
    """A pickled checkpoint's contents, tensors only, once the user has allowed pickles."""
    if not allow_pickle:
        raise VqtoolError(
            "is a pickle; vqtool reads only its tensors and runs nothing in it, but reads pickles only when asked: "
            "pass --allow-pickle",
            path,
        )
    return read_pickled_checkpoint(path)


# ---- taming-transformers, latent diffusion, Chameleon: a Lightning .ckpt and its YAML -> diffusers' VQModel -------

# The VQ models of those repositories whose inference is the plain nearest-code VQGAN (taming's VQModel and its EMA
# variant, latent diffusion's, Chameleon's), by the class their YAML's `target` names; only the name is read.
TAMING_TARGETS = ("VQModel", "EMAVQ", "VQModelInterface", "VQGAN")
# What the conversion reads of the YAML's ddconfig.
TAMING_DDCONFIG = ("ch", "ch_mult", "num_res_blocks", "resolution", "z_channels", "in_channels", "out_ch")
TAMING_DROPPED = ("loss.", "model_ema.")  # the discriminator and perceptual loss; latent diffusion's EMA copy
_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


@dataclass(frozen=True)
class TamingConfig:
    """What a taming / latent-diffusion / Chameleon YAML says of its VQ model."""

    target: str
    ddconfig: dict[str, Any]
    n_embed: int
    embed_dim: int
    remap: str | None

    def has_attention(self, level: int) -> bool:
        if self.ddconfig.get("attn_type", "vanilla") == "none":
            return False
        return int(self.ddconfig["resolution"]) // 2**level in list(self.ddconfig.get("attn_resolutions", []))


def read_taming_yaml(path: Path) -> TamingConfig:
    """The model part of a taming-style YAML (model.params: ddconfig, n_embed, embed_dim), read as plain data."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
        model = raw["model"]
        params = model["params"]
        ddconfig = dict(params["ddconfig"])
        config = TamingConfig(
            str(model.get("target", "")),
            ddconfig,
            int(params["n_embed"]),
            int(params["embed_dim"]),
            params.get("remap"),
        )
    except (OSError, yaml.YAMLError) as exc:
        raise VqtoolError(f"not a readable YAML file ({first_line(exc)})", path) from None
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise VqtoolError(
            f"does not describe a VQ model as taming's YAML does (model.params.ddconfig: {exc})", path
        ) from None
    missing = [name for name in TAMING_DDCONFIG if name not in config.ddconfig]
    if missing:
        raise VqtoolError(f"its model.params.ddconfig lacks {', '.join(missing)}", path)
    if config.target.rsplit(".", 1)[-1] not in TAMING_TARGETS:
        raise VqtoolError(
            f"describes a {config.target or 'model without a target'}; vqtool imports the plain VQGANs of taming, "
            f"latent diffusion and Chameleon ({', '.join(TAMING_TARGETS)})",
            path,
        )
    return config


def _expressible(config: TamingConfig, path: Path) -> None:
    """Refuse, in one line, what diffusers' VQModel cannot run as the original does."""
    dd = config.ddconfig
    reasons = {
        "double_z": dd.get("double_z", True),  # a KL autoencoder's, never a VQ model's
        "resamp_with_conv: false": not dd.get("resamp_with_conv", True),
        "give_pre_end": dd.get("give_pre_end", False),
        "tanh_out": dd.get("tanh_out", False),
        f"attn_type {dd.get('attn_type')}": dd.get("attn_type", "vanilla") not in ("vanilla", "none"),
        f"in_channels {dd['in_channels']} / out_ch {dd['out_ch']}": (dd["in_channels"], dd["out_ch"]) != (3, 3),
    }
    for reason, present in reasons.items():
        if present:
            raise VqtoolError(f"its model sets {reason}, which vqtool cannot run as the original does", path)


def taming_vqmodel_config(config: TamingConfig) -> dict[str, Any]:
    """diffusers' VQModel configuration that runs the taming design `config` describes."""
    dd = config.ddconfig
    levels = len(dd["ch_mult"])
    down = ["AttnDownEncoderBlock2D" if config.has_attention(i) else "DownEncoderBlock2D" for i in range(levels)]
    up = ["AttnUpDecoderBlock2D" if config.has_attention(levels - 1 - i) else "UpDecoderBlock2D" for i in range(levels)]
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": [int(dd["ch"]) * int(m) for m in dd["ch_mult"]],
        "layers_per_block": int(dd["num_res_blocks"]),  # the decoder has one more per level, as taming's
        "act_fn": "silu",
        "latent_channels": int(dd["z_channels"]),
        "sample_size": int(dd["resolution"]),
        "num_vq_embeddings": config.n_embed,
        "vq_embed_dim": config.embed_dim,
        "norm_num_groups": 32,
        "norm_type": "group",
        "mid_block_add_attention": dd.get("attn_type", "vanilla") != "none",
        "lookup_from_codebook": False,
        "force_upcast": False,
    }


def _taming_key(key: str, levels: int) -> str:
    """One taming weight name -> diffusers' VQModel's (the decoder's levels in the opposite order)."""
    if key.startswith(("quantize.", "quant_conv.", "post_quant_conv.")):
        return key
    part, rest = key.split(".", 1)
    if match := re.fullmatch(r"(down|up)\.(\d+)\.(block|attn|downsample|upsample)\.(.*)", rest):
        kind, level, sub, tail = match.groups()
        index = int(level) if kind == "down" else levels - 1 - int(level)
        prefix = f"{part}.{kind}_blocks.{index}"
        if sub == "block":
            block, name = tail.split(".", 1)
            return f"{prefix}.resnets.{block}.{name.replace('nin_shortcut', 'conv_shortcut')}"
        if sub == "attn":
            block, module, param = tail.split(".")
            return f"{prefix}.attentions.{block}.{_ATTENTION_NAMES[module]}.{param}"
        return f"{prefix}.{sub}rs.0.{tail}"  # downsamplers / upsamplers
    if match := re.fullmatch(r"mid\.block_(\d)\.(.*)", rest):
        block, name = match.groups()
        return f"{part}.mid_block.resnets.{int(block) - 1}.{name.replace('nin_shortcut', 'conv_shortcut')}"
    if match := re.fullmatch(r"mid\.attn_1\.(\w+)\.(\w+)", rest):
        return f"{part}.mid_block.attentions.0.{_ATTENTION_NAMES[match.group(1)]}.{match.group(2)}"
    if rest.startswith("norm_out."):
        return f"{part}.conv_norm_out.{rest.removeprefix('norm_out.')}"
    if rest.startswith(("conv_in.", "conv_out.")):
        return key
    raise KeyError(key)


def taming_state(state: dict[str, torch.Tensor], config: TamingConfig, path: Path) -> dict[str, torch.Tensor]:
    """A taming VQModel's weights under diffusers' VQModel's names; the losses' weights left out, each attention's
    1x1 convolutions as the linear layers diffusers' attention has."""
    levels = len(config.ddconfig["ch_mult"])
    renamed = {}
    for key, value in state.items():
        if key.startswith(TAMING_DROPPED):
            continue
        try:
            new = _taming_key(key, levels)
        except (KeyError, ValueError):
            raise VqtoolError(f"holds {key!r}, which is no part of a taming VQ model", path) from None
        renamed[new] = value[:, :, 0, 0] if ".attentions." in new and value.ndim == 4 else value
    return renamed


def _taming_yaml(checkpoint: Path, source: Path, config_file: Path | None) -> Path:
    """The YAML that describes `checkpoint`: the one given, else one beside it by its releases' names, else, where
    SOURCE is a release folder, one in it or the one in its configs/ (taming's logs/NAME/configs/)."""
    if config_file is not None:
        return config_file
    folders = [checkpoint.parent] + ([source, source / TAMING_CONFIGS] if source.is_dir() else [])
    candidates = [checkpoint.with_suffix(".yaml")] + [f / name for f in folders for name in TAMING_CONFIG_NAMES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    in_configs = sorted((source / TAMING_CONFIGS).glob("*.yaml")) if source.is_dir() else []
    if len(in_configs) == 1:
        return in_configs[0]
    names = ", ".join(dict.fromkeys(c.name for c in candidates))
    raise VqtoolError(f"has no YAML beside it or in configs/ ({names}); name it with --config", checkpoint)


def read_taming(
    path: Path, source: Path, config_file: Path | None, image_size: int | None, allow_pickle: bool
) -> Original:
    """A taming-transformers / latent-diffusion / Chameleon VQGAN: its Lightning checkpoint and YAML (SOURCE: the
    checkpoint itself or the release folder it was found in)."""
    yaml_path = _taming_yaml(path, source, config_file)
    config = read_taming_yaml(yaml_path)
    _expressible(config, yaml_path)
    payload = read_pickled(path, allow_pickle)
    key = "state_dict" if isinstance(payload, dict) and "state_dict" in payload else None
    state = taming_state(tensors_under(payload, key, path), config, path)
    used_codes = _rows_in_use(state, config, path) if config.remap is not None else None
    size = image_size or int(config.ddconfig["resolution"])
    factor = 2 ** (len(config.ddconfig["ch_mult"]) - 1)
    remapped = f", remapped to the {used_codes} in use" if used_codes is not None else ""
    return Original(
        "diffusers",
        "VQModel",
        taming_vqmodel_config(config),
        state,
        "library",
        size,
        f"{config.target.rsplit('.', 1)[-1]} of factor {factor} ({config.n_embed} codes of {config.embed_dim} "
        f"dimensions{remapped}) from {path.name} and {yaml_path.name}",
        used_codes,
    )


def _rows_in_use(state: dict[str, torch.Tensor], config: TamingConfig, path: Path) -> int:
    """How many codebook rows a remapping model uses: its quantizer's `used` buffer, which taming saves with the
    weights (the YAML's remap names the .npy file it was first read from, on the machine that trained it)."""
    used = state.get("quantize.used")
    if used is None:
        raise VqtoolError(
            f"its model sets remap ({config.remap}) but it holds no quantize.used, the codes in use", path
        )
    if used.ndim != 1 or used.is_floating_point() or not len(used):
        raise VqtoolError(f"its quantize.used is not a list of codebook rows ({tuple(used.shape)}, {used.dtype})", path)
    if int(used.min()) < 0 or int(used.max()) >= config.n_embed:
        raise VqtoolError(f"its quantize.used names rows outside the codebook's {config.n_embed}", path)
    return len(used)


# ---- which format a SOURCE is -------------------------------------------------------------------------------------


def _janus_folder(folder: Path) -> bool:
    """Whether `folder` is DeepSeek's original Janus layout: a config.json naming a gen_vision_config."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(raw, dict) and isinstance(raw.get("gen_vision_config"), dict)


def _checkpoints_in(folder: Path, fmt: str) -> list[Path]:
    """The checkpoint files of format `fmt` in `folder` and, for taming's releases (logs/NAME/checkpoints/last.ckpt),
    in its checkpoints/ subfolder."""
    places = [folder, folder / TAMING_CHECKPOINTS] if fmt == TAMING else [folder]
    suffixes = [suffix for suffix, kind in CHECKPOINT_SUFFIXES.items() if kind == fmt]
    return sorted(
        p for place in places if place.is_dir() for p in place.iterdir() if p.is_file() and p.suffix in suffixes
    )


def recognise(source: Path) -> str | None:
    """The original format SOURCE holds, or None where it is not one (a library's own layout is checked elsewhere):
    a .ckpt (taming) or .pt/.pth (LlamaGen) file, a folder holding exactly one such file (a taming release's in
    checkpoints/), or a Janus folder."""
    if source.is_file():
        return CHECKPOINT_SUFFIXES.get(source.suffix)
    if not source.is_dir():
        return None
    if _janus_folder(source):
        return JANUS
    if (source / "config.json").is_file():
        return None  # a library's own layout
    return next((fmt for fmt in (TAMING, LLAMAGEN) if len(_checkpoints_in(source, fmt)) == 1), None)


def _checkpoint_file(source: Path, fmt: str) -> Path:
    """The checkpoint file of SOURCE: itself, or the one file of the format in the folder."""
    if source.is_file():
        return source
    files = _checkpoints_in(source, fmt)
    if len(files) != 1:
        found = ", ".join(str(p.relative_to(source)) for p in files) or "none"
        raise VqtoolError(f"holds {len(files)} {fmt} checkpoint files ({found}); name the one to import", source)
    return files[0]


def read_original(
    source: Path, fmt: str, *, config_file: Path | None, image_size: int | None, allow_pickle: bool
) -> Original:
    """The original checkpoint SOURCE holds, in format `fmt`, read and renamed for its library class."""
    if fmt == JANUS:
        if not source.is_dir() or not _janus_folder(source):
            raise VqtoolError("is not a Janus folder (a config.json with gen_vision_config)", source)
        return read_janus(source, image_size, allow_pickle)
    path = _checkpoint_file(source, fmt)
    if fmt == LLAMAGEN:
        return read_llamagen(path, image_size, allow_pickle)
    return read_taming(path, source, config_file, image_size, allow_pickle)
