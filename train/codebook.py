"""Codebook health during training: EMA updates, k-means initialisation, dead-code restarts.

All three are off by default, so the default run is the article's model. Statistics are summed
over processes under torchrun, and every random choice is seeded by (seed, step), so every rank
takes the same decision and a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from vqtool.model.config import TrainConfig
from vqtool.model.vqvae import Quantizer, code_distances

KMEANS_ITERATIONS = 20


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def _all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Rows from every process, in rank order (each rank holds a contiguous slice of the global batch)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def kmeans(
    vectors: torch.Tensor, count: int, generator: torch.Generator, iterations: int = KMEANS_ITERATIONS
) -> torch.Tensor:
    """Lloyd's k-means on `vectors` (N x D) -> `count` centres; empty clusters take a random vector."""
    vectors = vectors.to(torch.float32)
    picks = (
        torch.randperm(len(vectors), generator=generator)[:count]
        if len(vectors) >= count
        else (torch.randint(len(vectors), (count,), generator=generator))
    )
    centres = vectors[picks].clone()
    for _ in range(iterations):
        assignment = code_distances(vectors, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assignment, vectors)
        sizes = torch.bincount(assignment, minlength=count).to(vectors.dtype)
        empty = sizes == 0
        centres = torch.where(empty[:, None], centres, sums / sizes.clamp_min(1)[:, None])
        if empty.any():
            refill = torch.randint(len(vectors), (int(empty.sum()),), generator=generator)
            centres[empty] = vectors[refill]
    return centres


def usage_divergence(assignment_sums: torch.Tensor, count: int) -> torch.Tensor:
    """log K minus the entropy of the mean soft assignment: the KL divergence from the batch's code usage to an even
    use of all K codes, 0 when the batch spreads evenly. LlamaGen's entropy loss has this batch term and a
    per-latent one that sharpens assignments; the latter cost reconstruction here (see the README), so it is left out.
    """
    mean = assignment_sums / count
    return math.log(len(mean)) + (mean * mean.clamp_min(1e-12).log()).sum()


class CodebookHealth:
    """Owns the codebook's non-gradient updates and their state (saved in every checkpoint)."""

    def __init__(self, quantizer: Quantizer, config: TrainConfig) -> None:
        self.quantizer, self.config = quantizer, config
        codes, dim = quantizer.codebook.weight.shape
        device = quantizer.codebook.weight.device
        self.cluster_size = torch.zeros(codes, device=device)
        self.embed_sum = quantizer.codebook.weight.detach().clone()
        self.last_used = torch.zeros(codes, dtype=torch.long, device=device)
        self.restarts = 0
        self.initialised = not config.kmeans_init
        if config.ema:
            # With EMA the codebook moves only by its running averages, never by the optimizer.
            quantizer.codebook.weight.requires_grad_(False)

    def _generator(self, step: int, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.config.seed * 1_000_003 + step) * 7 + salt)

    @torch.no_grad()
    def initialise(self, latents: torch.Tensor) -> None:
        """k-means on the first batches' encoder outputs (N x D, the same on every rank)."""
        codes = self.quantizer.codebook.weight.shape[0]
        centres = kmeans(latents.cpu(), codes, self._generator(0, 1)).to(self.quantizer.codebook.weight.device)
        self.quantizer.codebook.weight.copy_(centres)
        self.embed_sum.copy_(centres)
        self.cluster_size.fill_(1.0)
        self.initialised = True

    @torch.no_grad()
    def after_step(self, latents: torch.Tensor, codes: torch.Tensor, step: int) -> None:
        """Update usage, EMA statistics and dead codes from this step's (local) latents and codes."""
        flat_latents = latents.reshape(-1, latents.shape[-1]).to(torch.float32)
        flat_codes = codes.reshape(-1)
        book = self.quantizer.codebook.weight
        one_hot = torch.zeros(len(flat_codes), book.shape[0], device=book.device)
        one_hot.scatter_(1, flat_codes[:, None], 1.0)
        counts = _all_reduce(one_hot.sum(0))
        self.last_used[counts > 0] = step
        if self.config.ema:
            sums = _all_reduce(one_hot.t() @ flat_latents)
            decay, eps = self.config.ema_decay, self.config.ema_epsilon
            self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
            self.embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
            total = self.cluster_size.sum()
            # Laplace smoothing keeps rarely used codes from dividing by ~0.
            smoothed = (self.cluster_size + eps) / (total + book.shape[0] * eps) * total
            book.copy_(self.embed_sum / smoothed[:, None])
        if self.config.restart_dead:
            dead = (step - self.last_used) >= self.config.restart_dead
            if dead.any():
                self._restart(dead, _all_gather_rows(flat_latents), step)

    def _restart(self, dead: torch.Tensor, latents: torch.Tensor, step: int) -> None:
        """Re-seed dead codes from recent encoder outputs (this step's global batch)."""
        book = self.quantizer.codebook.weight
        generator = self._generator(step, 2)
        picks = torch.randint(len(latents), (int(dead.sum()),), generator=generator).to(latents.device)
        fresh = latents[picks]
        book[dead] = fresh
        self.embed_sum[dead] = fresh
        self.cluster_size[dead] = 1.0
        self.last_used[dead] = step
        self.restarts += int(dead.sum())

    def state_dict(self) -> dict[str, Any]:
        return {
            "cluster_size": self.cluster_size.cpu(),
            "embed_sum": self.embed_sum.cpu(),
            "last_used": self.last_used.cpu(),
            "restarts": self.restarts,
            "initialised": self.initialised,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.quantizer.codebook.weight.device
        self.cluster_size = state["cluster_size"].to(device)
        self.embed_sum = state["embed_sum"].to(device)
        self.last_used = state["last_used"].to(device)
        self.restarts = int(state["restarts"])
        self.initialised = bool(state["initialised"])
