"""The one table of precisions: for each, the graph it runs, that graph's arithmetic, whether it exists for the
encoder alone, the parity rule of its exact contract, the bounded contract's rule, and the runtimes that run it.

Every other list of precisions in vqtool is read from here: the command line's choices, the manifest's graph names,
the exporter's dtypes, parity's rules and contracts, the INT8 search's rule, the runtime table's precisions and what
`auto` may start. A leaf: it imports nothing of vqtool, so every layer can read it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Precision(str, enum.Enum):
    """The precisions an export is run at (the command line's --precision)."""

    fp32 = "fp32"
    fp16 = "fp16"  # FP16 graphs with an FP32 quantizer (export --fp16)
    bf16 = "bf16"  # OpenVINO's BF16 inference over the FP32 graph, or PyTorch's BF16 autocast; no file of its own
    int8 = "int8"  # an INT8 encoder for CPUs (export --int8)


FP32, FP16, BF16, INT8 = (p.value for p in Precision)
PRECISIONS = tuple(p.value for p in Precision)
# Not a precision but a request for one: the fastest runtime and precision whose codes parity published under a
# contract (exact or bounded), by what bench.json measured (vqtool.runtime.select.fastest_choice).
FASTEST = "fastest"
# Variants parity builds aside to show what the FP32 quantizer island buys; never exported, never run by a user.
NAIVE_FP16, NAIVE_BF16 = "fp16-naive", "bf16-naive"


@dataclass(frozen=True)
class ParityRule:
    """What a precision's codes and reconstructions must meet against PyTorch's; None: not checked.

    `tie_rtol`: two codes whose distances to a latent differ by less than this share of |z|² + |e|² are a near-tie
    (either is right up to rounding). `end_to_end`: the runtime's own codes are decoded, rather than PyTorch's, for
    an encoder allowed to differ: what matters then is how far its codes move the reconstruction.
    """

    tie_rtol: float
    max_unexplained: int | None = 0
    min_identical: float | None = None
    max_abs_diff: int | None = None
    min_psnr: float | None = None
    max_quality_drop_db: float | None = None
    end_to_end: bool = False
    exact: bool = True  # whether meeting it is the exact contract; False: the precision has only the bounded one

    def missed(
        self,
        *,
        identical: float,
        unexplained: int,
        batch_unexplained: int,
        recon_max_abs: int,
        recon_psnr: float,
        quality_drop_db: float,
    ) -> list[str]:
        """Why a runtime with these parity figures (export/parity.py) misses the rule; empty where it meets it.
        Each limit is written as what a figure must be, so that one that is not a number (NaN, from a record
        written by hand) misses it rather than passing every comparison; so in the rules below."""
        failures = []
        if self.max_unexplained is not None and not unexplained <= self.max_unexplained:
            failures.append(f"{unexplained} codes differ from PyTorch without a near-tie to explain them")
        if self.max_unexplained is not None and not batch_unexplained <= self.max_unexplained:
            failures.append(f"{batch_unexplained} codes change with the batch size, not near-ties")
        if self.min_identical is not None and not identical >= self.min_identical:
            failures.append(f"{identical:.2%} identical codes, below {self.min_identical:.1%}")
        if self.max_abs_diff is not None and not recon_max_abs <= self.max_abs_diff:
            failures.append(f"reconstructions differ by up to {recon_max_abs} grey levels (> {self.max_abs_diff})")
        if self.min_psnr is not None and not recon_psnr >= self.min_psnr:
            failures.append(f"reconstruction PSNR against PyTorch {recon_psnr:.1f} dB < {self.min_psnr} dB")
        drop = self.max_quality_drop_db
        if drop is not None and not quality_drop_db <= drop:
            failures.append(f"reconstructions {quality_drop_db:.2f} dB further from the images (> {drop} dB)")
        return failures


# FP32 must agree exactly apart from true ties: rounding of a length-D dot product is ~1e-6.
EXACT = ParityRule(tie_rtol=1e-5, max_abs_diff=1)
# FP16 and BF16 graphs keep the quantizer FP32; BF16 (8 mantissa bits against FP16's 11) is held to the FP16 rule,
# so it is the harder one to meet.
HALF = ParityRule(tie_rtol=1e-2, min_identical=0.995, min_psnr=40.0)
# INT8 rounds each activation to 1/255 of its calibrated range, enough to flip codes that lie within a few percent
# of each other: it has no exact contract, only the bounded one. Its own codes are decoded in parity, since what
# matters is how far they move the reconstruction.
INT8_RULE = ParityRule(tie_rtol=1e-2, max_unexplained=None, end_to_end=True, exact=False)


@dataclass(frozen=True)
class BoundedRule:
    """The bounded contract, the second beside a precision's own (exact) rule: where a runtime's codes differ from
    FP32's, each is a near neighbour of the exact code (its regret, the extra squared distance to the latent over
    the model's mean quantisation error, at p99; its rank among the latent's nearest codes, at most), and the codes
    decode to a picture indistinguishable from the exact codes' (PSNR of one decode against the other)."""

    max_regret_p99: float
    max_rank: int
    min_drift_psnr: float
    min_identical: float = 0.0  # a user may demand more (--min-identical)

    def missed(self, identical: float, regret_p99: float, rank_max: int, drift_psnr: float) -> list[str]:
        """Why codes with these figures (export/drift.py) miss the rule; empty where they meet it."""
        failures = []
        if not identical >= self.min_identical:
            failures.append(f"{identical:.2%} identical codes, below the {self.min_identical:.1%} asked for")
        if not regret_p99 <= self.max_regret_p99:
            failures.append(f"changed codes' regret p99 {regret_p99:.3g} > {self.max_regret_p99:g}")
        if not rank_max <= self.max_rank:
            failures.append(f"a changed code ranks {rank_max} among its latent's nearest (> {self.max_rank})")
        if not drift_psnr >= self.min_drift_psnr:
            failures.append(
                f"decoded, the codes are {drift_psnr:.1f} dB from the exact codes' (< {self.min_drift_psnr:g})"
            )
        return failures


# The contracts a reduced-precision runtime is published under, best first: its precision's own rule (for FP32,
# identical codes but for true ties), else the bounded one.
EXACT_CONTRACT, BOUNDED_CONTRACT, NO_CONTRACT = "exact", "bounded", "none"
# Limits chosen from the drift measured on vqtool's presets and the imported families, and justified beside the
# drift table (docs/precision.md): rounding moves codes to neighbours within these; a latent sent elsewhere is not.
BOUNDED = BoundedRule(max_regret_p99=2.0, max_rank=8, min_drift_psnr=40.0)


@dataclass(frozen=True)
class LatentRule:
    """What the latent graphs (`export --latents`) must meet against the model's own code in PyTorch (an imported
    model's: its library's) at a precision: the encoder's latents within `max_error` of PyTorch's (largest
    difference over the latents' largest magnitude), and the decoder's pictures from PyTorch's latents at least
    `min_decode_psnr` dB from PyTorch's decode.
    Each graph is judged on its own: a pipeline that only decodes latents needs only the decoder's."""

    max_error: float
    min_decode_psnr: float

    def encoder_missed(self, error: float) -> list[str]:
        if not error <= self.max_error:
            return [f"latents differ by {error:.3g} of their range (> {self.max_error:g})"]
        return []

    def decoder_missed(self, decode_psnr: float) -> list[str]:
        if not decode_psnr >= self.min_decode_psnr:
            return [f"decoded {decode_psnr:.1f} dB from PyTorch's decode (< {self.min_decode_psnr:g})"]
        return []


# FP32 reorders sums only: latents agree to 2e-6 (small models) to 5e-5 (latent diffusion's VQ-f4 at 256 x 256) of
# their range, and 50 dB is under a grey level's rounding on a few pixels. FP16 and BF16 round activations to 11
# and 8 bits: their decode is held to the bounded contract's 40 dB, their latents to 2% of the latents' range.
LATENTS_EXACT = LatentRule(max_error=5e-4, min_decode_psnr=50.0)
LATENTS_HALF = LatentRule(max_error=2e-2, min_decode_psnr=40.0)

# The runtimes, as (backend, device): vqtool.runtime.base.RUNTIMES has a row for each.
TORCH_CPU, ORT_CPU, OPENVINO_CPU = ("torch", "cpu"), ("onnxruntime", "cpu"), ("openvino", "cpu")
TORCH_CUDA, ORT_CUDA = ("torch", "cuda"), ("onnxruntime", "cuda")
ORT_TRT, TENSORRT = ("onnxruntime-trt", "cuda"), ("tensorrt", "cuda")


@dataclass(frozen=True)
class PrecisionRow:
    """One precision: `graph`, the precision of the graph file it runs (its own, or BF16's FP32 graph);
    `arithmetic`, the (convolutions, quantizer) dtypes of the graph the exporter writes for it (None: none is
    written for it, or it is written another way, as INT8's by quantization); `encoder_only`, whether it exists for
    the encoder alone (its codes are decoded in FP32); `rule`, its parity rule; `runtimes`, which run it;
    `exported`, False for a comparison variant parity builds aside; `bounded`, the bounded contract's rule;
    `autocast`, the dtype the PyTorch runtime runs the encoder and decoder bodies in at this precision, under
    torch.autocast with the quantizer's search and lookup kept in FP32 (None: PyTorch does not run it)."""

    name: str
    graph: str
    arithmetic: tuple[str, str] | None
    encoder_only: bool
    rule: ParityRule
    runtimes: tuple[tuple[str, str], ...]
    exported: bool = True
    # The bounded contract it may be published under where it misses its own rule (None: FP32, exact or nothing).
    bounded: BoundedRule | None = BOUNDED
    # The latent graphs' rule at this precision (None: export --latents writes none for it).
    latents: LatentRule | None = None
    autocast: str | None = None


ROWS = (
    PrecisionRow(
        FP32,
        FP32,
        ("float32", "float32"),
        False,
        EXACT,
        (TORCH_CPU, ORT_CPU, OPENVINO_CPU, TORCH_CUDA, ORT_CUDA, ORT_TRT, TENSORRT),
        bounded=None,
        latents=LATENTS_EXACT,
    ),
    # PyTorch runs FP16 on CUDA only: CPUs have BF16 arithmetic (AVX-512 BF16, AMX) but no FP16 convolutions.
    PrecisionRow(
        FP16,
        FP16,
        ("float16", "float32"),
        False,
        HALF,
        (ORT_CPU, ORT_CUDA, ORT_TRT, TENSORRT, TORCH_CUDA),
        latents=LATENTS_HALF,
        autocast="float16",
    ),
    PrecisionRow(
        BF16, FP32, None, False, HALF, (OPENVINO_CPU, TORCH_CPU, TORCH_CUDA), latents=LATENTS_HALF, autocast="bfloat16"
    ),
    PrecisionRow(INT8, INT8, None, True, INT8_RULE, (ORT_CPU, OPENVINO_CPU)),
    PrecisionRow(NAIVE_FP16, NAIVE_FP16, ("float16", "float16"), False, HALF, (ORT_CPU,), exported=False),
    PrecisionRow(NAIVE_BF16, FP32, None, False, HALF, (OPENVINO_CPU,), exported=False),
)
TABLE = {row.name: row for row in ROWS}
ENCODER_ONLY = frozenset(row.name for row in ROWS if row.encoder_only)


def row(precision: str) -> PrecisionRow:
    """The table's row for `precision` (a Precision or its name); KeyError for a name not in it."""
    return TABLE[str(getattr(precision, "value", precision))]


def decoder_precision(precision: str) -> str:
    """The decoder's precision when the encoder runs `precision`: FP32 under an encoder-only precision."""
    return FP32 if precision in ENCODER_ONLY else precision
