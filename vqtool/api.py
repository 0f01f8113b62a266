"""The Python API: load an export once, then encode and decode arrays, tensors or files.

    tok = vqtool.load("runs/run-001/export")
    codes = tok.encode(images)      # uint8 N x H x W x 3 -> N x h x w codes
    images = tok.decode(codes)      # -> uint8 N x H x W x 3

The commands `vqtool encode` and `vqtool decode` are this API's `encode_files` and `decode_file`.
Nothing here imports torch: it works where PyTorch is not installed, and takes torch tensors where it is.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vqtool.data.specs import image_set
from vqtool.errors import VqtoolError
from vqtool.formats.atomic import partial_path
from vqtool.formats.contract import Contract, contract_of
from vqtool.formats.manifest import Manifest, code_dtype_for, fitting_batch, read_manifest
from vqtool.host import inference_threads
from vqtool.images.fit import Fit
from vqtool.images.limits import DEFAULT_MAX_PIXELS
from vqtool.images.reading import fast_png_available, read_rgb
from vqtool.pipeline.decode import DecodeResult, check_decodable
from vqtool.pipeline.decode import decode_file as _decode_file
from vqtool.pipeline.encode import EncodeKeywords, EncodeOptions, EncodeResult, codes_output, plan_encode, run_encode
from vqtool.pipeline.resume import progress_path
from vqtool.precisions import BF16, FASTEST, FP32, decoder_precision, row
from vqtool.runtime import tensors
from vqtool.runtime.base import CudaTensorRunner, Runner
from vqtool.runtime.select import ChosenRunner, RuntimeChoice, bf16_note, fastest_choice, open_runner

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Contract", "DecodeResult", "EncodeOptions", "EncodeResult", "Fit", "RuntimeChoice", "Tokenizer", "load"]

_log = logging.getLogger("vqtool")
# Images (or code grids) per graph call: the CLI's default, so the API's codes are the CLI's byte for byte.
DEFAULT_BATCH = 64
ImageInput = Any  # np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor | str | Path]


def load(
    export_dir: str | Path,
    backend: str = "auto",
    device: str = "auto",
    precision: str = "fp32",
    *,
    threads: int | None = None,
    lazy: bool = False,
    engines: bool = True,
    runtime: RuntimeChoice | None = None,
) -> Tokenizer:
    """Open an export folder made by `vqtool export` and start its encoder and decoder.

    The manifest is read and every graph (or `model.pt`) is checked against its recorded checksum before
    it runs. `backend` is auto, onnxruntime, onnxruntime-trt, tensorrt, openvino or torch; `device` auto, cpu
    or cuda; `precision` fp32, fp16 (export --fp16; PyTorch: on CUDA), bf16 (OpenVINO, or PyTorch under
    autocast; refused where parity.json records that it met no contract), int8 (export --int8; an encoder
    precision, so the decoder runs fp32), or fastest: the runtime and precision bench.json measured fastest
    among those parity.json publishes under the exact or bounded contract (fp32 where bench.json measures none of
    them). With auto, a GPU runtime if one starts,
    else the CPU runtime bench.json measured fastest among those parity.json shows exact; `describe()` says
    which ran and why, and `contract` what its codes promise. `threads` caps the CPU threads (default: a core each).
    With `lazy`, each graph starts on its first use instead (a job that only encodes never starts the decoder), and
    a precision parity.json refuses is refused there, graph by graph (its latent graphs are judged apart).
    A TensorRT engine is code that TensorRT runs, not data: with `engines=False`, engine files in the folder are
    ignored (no tensorrt or onnxruntime-trt backend starts), for exports from sources you do not trust.
    `runtime` (a RuntimeChoice) says all of backend, device, precision, threads and engines at once, in place of
    those keywords. Raises VqtoolError, naming the file, for anything wrong with the export.
    """
    folder = Path(export_dir)
    manifest = read_manifest(folder)
    runtime = runtime or RuntimeChoice(backend, device, precision, inference_threads(threads), engines)
    note = ""
    if runtime.precision == FASTEST:
        runtime, note = fastest_choice(folder, manifest, runtime)
    if runtime.precision == BF16:
        note = "; ".join(filter(None, (note, bf16_note(folder, runtime.backend))))
    tok = Tokenizer(folder, manifest, runtime, note)
    if not lazy:
        tok.start()
    return tok


class Tokenizer:
    """An export's encoder and decoder, started once and kept between calls.

    Safe to call from several threads at once: ONNX Runtime sessions and PyTorch's inference mode take
    concurrent calls, and the TensorRT runner serialises its calls (one execution context) itself.
    Made by `vqtool.load`.
    """

    def __init__(self, export_dir: Path, manifest: Manifest, runtime: RuntimeChoice, note: str = "") -> None:
        self._note = f" ({note})" if note else ""  # appended to every line that says what runs
        self.export_dir = export_dir
        self.manifest = manifest
        self.runtime = runtime
        self.precision = runtime.precision
        self.code_dtype = code_dtype_for(manifest.codes)
        self._decode_precision = decoder_precision(runtime.precision)
        # The latent graphs run at the precisions the precision table gives a latent rule; the others (INT8) in FP32.
        self._latent_precision = runtime.precision if row(runtime.precision).latents is not None else FP32
        self._started: dict[str, ChosenRunner] = {}
        self._start_lock = threading.Lock()

    def start(self, *roles: str) -> None:
        """Start these graphs ("encoder", "decoder"; default: those the export has) now rather than on first use, so
        that a graph that cannot run says so here (what `load` does unless lazy)."""
        for role in roles or self.manifest.roles:
            self._runner_of(role)

    def _runner_of(self, role: str) -> ChosenRunner:
        with self._start_lock:
            if role not in self._started:
                precision = {"encoder": self.precision, "decoder": self._decode_precision}.get(
                    role, self._latent_precision
                )
                choice = replace(self.runtime, precision=precision)
                # In-memory calls run small batches on spinning threads, which answer them sooner; the file pipelines
                # run the same sessions without them (Runner.pipelined): their readers and writers need the cores.
                self._started[role] = open_runner(self.export_dir, self.manifest, role, choice, spin=True)
            return self._started[role]

    @property
    def _encoder(self) -> ChosenRunner:
        return self._runner_of("encoder")

    @property
    def _decoder(self) -> ChosenRunner:
        return self._runner_of("decoder")

    @property
    def num_codes(self) -> int:
        """K, the codebook size: codes are 0..K-1."""
        return self.manifest.codes

    @property
    def image_size(self) -> int:
        """The side of the square images the model was trained on (inputs are resized to it by default)."""
        return self.manifest.image_size

    @property
    def downsample(self) -> int:
        """Image side / code-grid side."""
        return self.manifest.downsample

    @property
    def has_decoder(self) -> bool:
        """Whether codes can be decoded: False for an encoder-only model (ChameleonVQVAE)."""
        return "decoder" in self.manifest.roles

    @property
    def backend(self) -> str:
        """The backend that runs: onnxruntime, openvino, tensorrt, onnxruntime-trt or torch (encoder first if the two
        differ)."""
        if not self.has_decoder:
            return self._encoder.runner.backend
        return _joined(self._encoder.runner.backend, self._decoder.runner.backend)

    @property
    def provider(self) -> str:
        """What really runs the graphs, e.g. CPUExecutionProvider, or PyTorch/TensorRT with the device."""
        if not self.has_decoder:
            return self._encoder.runner.provider
        return _joined(self._encoder.runner.provider, self._decoder.runner.provider)

    @property
    def contract(self) -> Contract:
        """The contract the encoder's codes are made under (exact, bounded, none or unchecked), with the runtime,
        precision and the drift parity measured for it; every codes file this tokenizer writes records it."""
        runner = self._encoder.runner
        return contract_of(self.export_dir, runner.backend, self.precision, runner.provider)

    def describe(self) -> str:
        """One line: what runs each graph, why faster backends were passed over, and the codes' contract."""
        terms = f"; codes under the {self.contract.describe()}"
        if not self.has_decoder:
            return f"encoder {self.precision}: {self._encoder.describe()}{self._note}{terms}"
        encoder, decoder = self._encoder.describe(), self._decoder.describe()
        if (encoder, self.precision) == (decoder, self._decode_precision):
            return f"{self.precision}: {encoder}{self._note}{terms}"
        return f"encoder {self.precision}: {encoder}; decoder {self._decode_precision}: {decoder}{self._note}{terms}"

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The code grid (h, w) of a height x width image encoded without resizing."""
        factor = self.downsample
        if height < factor or width < factor or height % factor or width % factor:
            raise VqtoolError(f"{width}x{height} is not a multiple of the model's factor {factor}")
        return height // factor, width // factor

    def _fitting_batch(self, role: str, batch_size: int) -> int:
        """`batch_size`, or fewer where that many images' activations would not fit the memory budget."""
        _check_batch_size(batch_size)
        precision = self.precision if role == "encoder" else self._decode_precision
        return fitting_batch(self.manifest, role, precision, batch_size)

    def encode(
        self,
        images: ImageInput,
        *,
        resize: bool = True,
        batch_size: int = DEFAULT_BATCH,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        crop: str = "resize",
        fit: Fit | None = None,
    ) -> Any:
        """Images -> codes N x h x w in the smallest unsigned dtype that holds K codes.

        `images`: a uint8 N x H x W x 3 array or torch tensor, or a list of H x W x 3 arrays, tensors or
        image file paths. With `resize` (as `vqtool encode`), images not of the model's size are resized
        to it (bicubic, Pillow; with crop="center", the centre square of the short side first); without it,
        sides must be multiples of the model's factor and, in a list, equal (`fit`, a Fit, says all three of
        resize, crop and max_pixels at once). A torch tensor gives a torch tensor: CPU tensors share memory both
        ways; CUDA tensors stay on the GPU when ONNX Runtime's CUDA provider runs (else they are copied through
        the host).
        """
        fit = fit or Fit.of(resize, crop, max_pixels)
        batch_size = self._fitting_batch("encoder", batch_size)
        if tensors.is_tensor(images) and images.is_cuda and _on_cuda(self._encoder.runner):
            batch = self._cuda_images(images, fit)
            out_shape = (batch.shape[0], *self.grid(batch.shape[1], batch.shape[2]))
            codes = _chunked_cuda(self._encoder.runner, batch, out_shape, np.dtype(np.int32), batch_size)
            return codes.to(tensors.torch_dtype(self.code_dtype))
        pixels = self._image_batch(images, fit)
        grid = self.grid(pixels.shape[1], pixels.shape[2])
        codes = _chunked(self._encoder.runner, pixels, (*grid,), self.code_dtype, batch_size)
        return tensors.like(codes, images) if tensors.is_tensor(images) else codes

    def decode(self, codes: Any, *, batch_size: int = DEFAULT_BATCH, max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
        """Codes N x h x w (any integer dtype, values 0..K-1) -> uint8 images N x H x W x 3.

        A torch tensor gives a torch tensor on its device (CUDA through I/O binding, as for encode). Grids whose
        images would have more than `max_pixels` pixels, or need more memory than the system has, are refused.
        """
        _check_batch_size(batch_size)
        on_cuda = tensors.is_tensor(codes) and codes.is_cuda and _on_cuda(self._decoder.runner)
        if on_cuda:
            grids = self._check_codes(codes, codes.dtype.is_floating_point or codes.dtype.is_complex)
        else:
            array = tensors.to_numpy(codes) if tensors.is_tensor(codes) else np.asarray(codes)
            grids = self._check_codes(array, not np.issubdtype(array.dtype, np.integer))
        grid = (int(grids.shape[1]), int(grids.shape[2]))
        pixels = check_decodable(self.manifest, grid, self._decode_precision, max_pixels)
        batch_size = fitting_batch(self.manifest, "decoder", self._decode_precision, batch_size, pixels)
        height, width = grid[0] * self.downsample, grid[1] * self.downsample
        if on_cuda:
            grids = grids.to(tensors.torch_dtype(np.dtype(np.int32)))
            out_shape = (grids.shape[0], height, width, 3)
            return _chunked_cuda(self._decoder.runner, grids, out_shape, np.dtype(np.uint8), batch_size)
        grids = np.ascontiguousarray(grids, dtype=np.int32)
        images = _chunked(self._decoder.runner, grids, (height, width, 3), np.dtype(np.uint8), batch_size)
        return tensors.like(images, codes) if tensors.is_tensor(codes) else images

    @property
    def has_latents(self) -> bool:
        """Whether the export has its latent graphs (vqtool export --latents)."""
        return bool(self.manifest.latent_decode)

    def encode_latents(
        self,
        images: ImageInput,
        *,
        resize: bool = True,
        batch_size: int = DEFAULT_BATCH,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        crop: str = "resize",
        fit: Fit | None = None,
    ) -> Any:
        """Images -> float32 latents N x D x h x w before quantisation, in the library's layout (what diffusers'
        `encode(x).latents` gives): the input a diffusion pipeline's latent space starts from. Images are taken as
        by `encode`; a torch tensor gives a torch tensor. Needs an export made with --latents."""
        fit = fit or Fit.of(resize, crop, max_pixels)
        _check_batch_size(batch_size)
        runner = self._runner_of("encoder_latents").runner
        pixels = self._image_batch(images, fit)
        self.grid(pixels.shape[1], pixels.shape[2])  # sides the model's factor divides
        batch_size = fitting_batch(self.manifest, "encoder_latents", self._latent_precision, batch_size)
        latents = _in_slices(runner, pixels, batch_size, np.dtype(np.float32))
        return tensors.like(latents, images) if tensors.is_tensor(images) else latents

    def decode_latents(self, latents: Any, *, batch_size: int = DEFAULT_BATCH) -> Any:
        """float32 latents N x D x h x w (the library's layout, as `encode_latents` gives and diffusion pipelines
        produce) -> uint8 images N x H x W x 3, decoded as the export's latent decoder does: through the nearest
        codes (`quantize`, latent diffusion's vqvae.decode) or as they are (`direct`, Kandinsky's MoVQ); which is
        `manifest.latent_decode`. A torch tensor gives a torch tensor."""
        _check_batch_size(batch_size)
        runner = self._runner_of("decoder_latents").runner
        array = tensors.to_numpy(latents) if tensors.is_tensor(latents) else np.asarray(latents)
        manifest = self.manifest
        shape = (manifest.latent_channels, manifest.grid, manifest.grid)  # the latent decoder's, fixed at export
        if array.ndim != 4 or not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise VqtoolError(f"latents must be finite floats shaped N x D x h x w, got {_kind(latents)}")
        if manifest.latent_channels and array.shape[1:] != shape:
            raise VqtoolError(f"this model's latents are N x {' x '.join(map(str, shape))}, got {_kind(latents)}")
        batch_size = fitting_batch(self.manifest, "decoder_latents", self._latent_precision, batch_size)
        images = _in_slices(runner, np.ascontiguousarray(array, dtype=np.float32), batch_size, np.dtype(np.uint8))
        return tensors.like(images, latents) if tensors.is_tensor(latents) else images

    def encode_files(
        self,
        inputs: Sequence[str | Path] | str | Path,
        out: str | Path,
        options: EncodeOptions | None = None,
        *,
        log: Callable[[str], None] | None = None,
        **keywords: Unpack[EncodeKeywords],
    ) -> EncodeResult:
        """What `vqtool encode` does: images -> `out`, a codes.npy with its codes.json sidecar or a codes.parquet.

        `inputs`: image files and folders (recursive, sorted), `.txt` lists of paths, WebDataset tar shards (a
        .tar, a folder of them, a brace pattern) and Parquet files with an image-bytes column (`image_column`,
        found by itself when it is image, jpg, jpeg, png or webp; keys from `key_column`, by default `key`).
        Streaming (reader processes decode files while the graph runs), resumable (`resume`), sharded
        (`shard="I/N"`); the options are the command's, as keywords (batch_size, resize, crop, max_pixels, shard,
        resume, overwrite, skip_bad, readers, image_column, key_column) or as one EncodeOptions. An existing
        `out` is replaced only with `overwrite` (or continued with `resume`), and no other run may write `out`
        meanwhile. Notes (resized or skipped files) go to `log`, by default the "vqtool" logger.
        """
        if options is not None and keywords:
            raise TypeError("encode_files takes an EncodeOptions or its keywords, not both")
        options = options or EncodeOptions.of(**keywords)
        log = log or _log.info
        out = Path(out)
        with codes_output(out, overwrite=options.overwrite, resume=options.resume, left_behind=_left_behind):
            images = image_set(
                [inputs] if isinstance(inputs, str | Path) else inputs,
                image_column=options.image_column,
                key_column=options.key_column,
            )
            contract = self.contract
            plan = plan_encode(images, self.manifest, self.export_dir, out, options, self.precision, contract)
            if not fast_png_available() and any(str(name).lower().endswith(".png") for name in images.keys[:1000]):
                log("reading PNG files with Pillow; pip install 'vqtool[fast-png]' reads them about twice as fast")
            shard = options.shard
            part = f" (shard {shard.index}/{shard.count})" if shard else ""
            runs = f"in {self.precision} with {self._encoder.describe()}{self._note}, under the {contract.describe()}"
            log(f"encoding {len(images.keys)} images{part} {runs}")
            if plan.batch_size < options.batch_size:
                log(f"batches of {plan.batch_size} images, not {options.batch_size}: the model's activations are large")
            return run_encode(plan, self._encoder.runner.pipelined(), resume=options.resume, log=log)

    def decode_file(
        self,
        codes: str | Path,
        out: str | Path,
        *,
        batch_size: int = DEFAULT_BATCH,
        writers: int | None = None,
        log: Callable[[str], None] | None = None,
        overwrite: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> DecodeResult:
        """What `vqtool decode` does: a codes .npy (with its sidecar) -> one PNG per grid in the folder `out`, which
        must be empty or, with `overwrite`, hold an earlier decode. Grids whose images would exceed `max_pixels`
        are refused."""
        log = log or _log.info
        log(f"decoding in {self._decode_precision} with {self._decoder.describe()}{self._note}")
        return _decode_file(
            Path(codes),
            self.manifest,
            self._decoder.runner.pipelined(),
            Path(out),
            batch_size=batch_size,
            workers=writers,
            log=log,
            overwrite=overwrite,
            max_pixels=max_pixels,
        )

    def _image_batch(self, images: ImageInput, fit: Fit) -> np.ndarray:
        """Whatever encode was given -> one uint8 N x H x W x 3 array at the size the graph will see."""
        if tensors.is_tensor(images):
            images = tensors.to_numpy(images)
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise VqtoolError(
                    f"images must be uint8 N x H x W x 3 (RGB), got a {images.dtype} array shaped {images.shape}"
                    + ("; for one image pass images[None]" if images.ndim == 3 else "")
                )
            if not fit.resizes or images.shape[1:3] == (self.image_size, self.image_size):
                self.grid(images.shape[1], images.shape[2])
                return images
            return np.stack([self._fit(image, fit, f"images[{i}]") for i, image in enumerate(images)])
        if isinstance(images, str | Path) or not isinstance(images, Sequence):
            raise VqtoolError(
                "images must be a uint8 N x H x W x 3 array or tensor, or a list of arrays, tensors or paths; "
                f"got {type(images).__name__} (for files and folders use encode_files)"
            )
        fitted = []
        for index, item in enumerate(images):
            if isinstance(item, str | Path):
                fitted.append(self._fit(read_rgb(item, fit.max_pixels), fit, item))
                continue
            pixels = tensors.to_numpy(item) if tensors.is_tensor(item) else item
            if (
                not isinstance(pixels, np.ndarray)
                or pixels.dtype != np.uint8
                or pixels.ndim != 3
                or pixels.shape[-1] != 3
            ):
                raise VqtoolError(f"images[{index}] must be a path or a uint8 H x W x 3 array, got {_kind(pixels)}")
            fitted.append(self._fit(pixels, fit, f"images[{index}]"))
        if not fitted:
            return np.empty((0, self.image_size, self.image_size, 3), dtype=np.uint8)
        shapes = {image.shape for image in fitted}
        if len(shapes) > 1:
            raise VqtoolError(f"without resize all images must share one size; got {sorted(shapes)}")
        return np.stack(fitted)

    def _fit(self, pixels: np.ndarray, fit: Fit, name: str | Path) -> np.ndarray:
        return fit.apply(pixels, self.image_size, self.downsample, name)

    def _cuda_images(self, images: Any, fit: Fit) -> Any:
        if str(images.dtype) != "torch.uint8" or images.dim() != 4 or images.shape[-1] != 3:
            raise VqtoolError(
                f"images must be uint8 N x H x W x 3 (RGB), got {images.dtype} shaped {tuple(images.shape)}"
            )
        if fit.resizes and tuple(images.shape[1:3]) != (self.image_size, self.image_size):
            raise VqtoolError(
                f"CUDA images must already be {self.image_size}x{self.image_size} (or pass resize=False with sides "
                f"that are multiples of {self.downsample}); got {images.shape[2]}x{images.shape[1]}"
            )
        return images

    def _check_codes(self, codes: Any, not_integers: bool) -> Any:
        if not_integers or codes.ndim != 3:
            raise VqtoolError(f"codes must be integers shaped N x h x w, got {_kind(codes)}")
        if codes.shape[0] and codes.shape[1] * codes.shape[2] and (codes.min() < 0 or codes.max() >= self.num_codes):
            low, high = int(codes.min()), int(codes.max())
            raise VqtoolError(f"codes must lie in 0..{self.num_codes - 1}, but range over {low}..{high}")
        return codes

    def close(self) -> None:
        """Release the sessions (and GPU memory); the tokenizer cannot run afterwards."""
        with self._start_lock:
            for opened in self._started.values():
                opened.runner.close()

    def __enter__(self) -> Tokenizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Tokenizer({str(self.export_dir)!r}, codes={self.num_codes}, image_size={self.image_size}, "
            f"downsample={self.downsample}, backend={self.backend!r}, precision={self.precision!r})"
        )


def _left_behind(out: Path) -> tuple[Path, Path]:
    """What an interrupted local encode of `out` leaves for --resume: its partial codes and its progress record."""
    return partial_path(out), progress_path(out)


def _joined(encoder: str, decoder: str) -> str:
    return encoder if encoder == decoder else f"{encoder} (encoder), {decoder} (decoder)"


def _kind(value: Any) -> str:
    if isinstance(value, np.ndarray) or tensors.is_tensor(value):
        return f"{value.dtype} shaped {tuple(value.shape)}"
    return type(value).__name__


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise VqtoolError(f"batch_size must be at least 1, got {batch_size}")


def _on_cuda(runner: Runner) -> bool:
    """Whether the runner runs this graph on the GPU and takes CUDA tensors where they lie."""
    return isinstance(runner, CudaTensorRunner) and runner.on_cuda


def _chunked(runner: Runner, batch: np.ndarray, tail: tuple[int, ...], dtype: np.dtype, batch_size: int) -> np.ndarray:
    """The runner over `batch` in slices of at most batch_size, cast to `dtype`; one call when it fits."""
    if len(batch) <= batch_size:
        return runner(batch).astype(dtype, copy=False) if len(batch) else np.empty((0, *tail), dtype=dtype)
    result = np.empty((len(batch), *tail), dtype=dtype)
    for start in range(0, len(batch), batch_size):
        result[start : start + batch_size] = runner(batch[start : start + batch_size])
    return result


def _in_slices(runner: Runner, batch: np.ndarray, batch_size: int, dtype: np.dtype) -> np.ndarray:
    """The runner over `batch` in slices of at most batch_size, whatever shape its output takes."""
    if not len(batch):
        raise VqtoolError("no images or latents given")
    parts = [runner(batch[start : start + batch_size]) for start in range(0, len(batch), batch_size)]
    return np.concatenate(parts).astype(dtype, copy=False) if len(parts) > 1 else parts[0].astype(dtype, copy=False)


def _chunked_cuda(runner: Runner, batch: Any, out_shape: tuple[int, ...], dtype: np.dtype, batch_size: int) -> Any:
    """As _chunked, for a CUDA tensor bound in place (ONNX Runtime's CUDA or TensorRT provider)."""
    assert isinstance(runner, CudaTensorRunner)
    torch = sys.modules["torch"]
    if not len(batch):
        return torch.empty(out_shape, dtype=tensors.torch_dtype(dtype), device=batch.device)
    parts = []
    for start in range(0, len(batch), batch_size):
        part = batch[start : start + batch_size]
        parts.append(runner.run_cuda(part, (len(part), *out_shape[1:]), dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
