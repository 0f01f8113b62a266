"""The reference VQ-VAE: shapes, the distance formula, the loss and its straight-through gradient."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from vqtool.model.config import ModelConfig
from vqtool.model.vqvae import VQVAE, code_distances, images_to_input, output_to_images, rotate_onto


@pytest.mark.parametrize(("size", "grid"), [(32, 2), (64, 4)])
def test_code_grid_is_one_sixteenth_of_the_image(size: int, grid: int) -> None:
    model = VQVAE(ModelConfig(codes=64, dim=32))
    x = torch.rand(3, 3, size, size) * 2 - 1
    assert model.encode(x).shape == (3, grid, grid)
    assert model(x).reconstruction.shape == x.shape


def test_layers_match_the_reference_design() -> None:
    model = VQVAE(ModelConfig())
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)] + [model.before_quantize]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 32), (32, 64), (64, 128), (128, 256)]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) and c.padding == (1, 1) for c in convs)
    deconvs = [model.after_quantize] + [m for m in model.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels) for c in deconvs] == [(256, 128), (128, 64), (64, 32), (32, 3)]
    assert [type(m).__name__ for m in model.decoder] == [
        "ConvTranspose2d",
        "Tanh",
        "ConvTranspose2d",
        "Tanh",
        "ConvTranspose2d",
    ]
    assert model.quantizer.codebook.weight.shape == (256, 256)


def test_expanded_distance_matches_brute_force_and_picks_the_nearest_code() -> None:
    torch.manual_seed(0)
    latents, codebook = torch.randn(5, 7, 16, dtype=torch.float64), torch.randn(40, 16, dtype=torch.float64)
    brute = ((latents[..., None, :] - codebook) ** 2).sum(-1)
    assert torch.allclose(code_distances(latents, codebook), brute)
    precomputed = code_distances(latents, codebook, (codebook**2).sum(-1))
    assert torch.equal(precomputed.argmin(-1), brute.argmin(-1))


def test_loss_terms_and_straight_through_gradients() -> None:
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(codes=16, dim=8))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    result = model(x)
    z_e = model.encode_latents(x)
    e = model.quantizer.lookup(result.codes)
    assert torch.allclose(result.codebook_loss, F.mse_loss(e, z_e))
    assert torch.allclose(result.commit_loss, result.codebook_loss)  # same value, different gradients

    # The reconstruction loss reaches the encoder (straight-through) but not the codebook.
    result.recon_loss.backward()
    assert model.encoder[0].weight.grad is not None and model.encoder[0].weight.grad.abs().sum() > 0
    assert model.quantizer.codebook.weight.grad is None or model.quantizer.codebook.weight.grad.abs().sum() == 0
    model.zero_grad(set_to_none=True)

    # The codebook term moves only the codebook; the commitment term moves only the encoder.
    model(x).codebook_loss.backward()
    assert model.quantizer.codebook.weight.grad.abs().sum() > 0
    assert model.encoder[0].weight.grad is None
    model.zero_grad(set_to_none=True)
    model(x).commit_loss.backward()
    assert model.quantizer.codebook.weight.grad is None
    assert model.encoder[0].weight.grad.abs().sum() > 0


def test_decoder_sees_the_code_values() -> None:
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(codes=16, dim=8)).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(model(x).reconstruction, model.decode(model.encode(x)), atol=1e-6)


def test_pixel_scale_round_trip_is_exact() -> None:
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert torch.equal(output_to_images(images_to_input(images)), images)


def test_four_phase_form_equals_the_transposed_convolution() -> None:
    from vqtool.export.graphs import FourPhaseConvTranspose

    torch.manual_seed(0)
    deconv = torch.nn.ConvTranspose2d(24, 10, 4, 2, 1)
    x = torch.randn(3, 24, 5, 7)
    with torch.no_grad():
        assert torch.allclose(FourPhaseConvTranspose(deconv)(x), deconv(x), atol=1e-5)


def test_the_rotation_trick_rotates_the_gradient_and_keeps_the_forward_value() -> None:
    torch.manual_seed(0)
    latents = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    codes = torch.randn(6, 8, dtype=torch.float64)
    moved = rotate_onto(latents, codes)
    assert torch.allclose(moved, codes)
    # The gradient reaching the codes comes back rotated (norm kept, scaled by |e|/|z|): a code's own direction
    # comes back as the latent's direction, where straight-through would hand it back unchanged.
    incoming = F.normalize(codes, dim=-1)
    (grad,) = torch.autograd.grad((moved * incoming).sum(), latents)
    scale = codes.norm(dim=-1) / latents.detach().norm(dim=-1)
    assert torch.allclose(grad.norm(dim=-1), scale)
    assert torch.allclose(F.normalize(grad, dim=-1), F.normalize(latents.detach(), dim=-1))
    assert not torch.allclose(F.normalize(grad, dim=-1), incoming)


def test_the_rotation_trick_changes_only_the_encoders_gradient() -> None:
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(codes=16, dim=8))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    straight, rotated = model(x), model(x, rotation_trick=True)
    assert torch.equal(straight.codes, rotated.codes)
    assert torch.allclose(straight.reconstruction, rotated.reconstruction, atol=1e-6)
    grads = []
    for result in (straight, rotated):
        model.zero_grad(set_to_none=True)
        result.recon_loss.backward()
        assert model.quantizer.codebook.weight.grad is None  # as straight-through: the codebook term moves codes
        grads.append(model.encoder[0].weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_the_usage_term_is_zero_for_an_even_spread_and_its_gradient_spreads_a_crowded_batch() -> None:
    from vqtool.model.vqvae import soft_assignment_sums
    from vqtool.train.codebook import usage_divergence

    codes = 8
    even, crowded = torch.full((codes,), 4.0), torch.zeros(codes)
    crowded[0] = 32.0
    assert usage_divergence(even, 32).item() == pytest.approx(0.0, abs=1e-6)
    assert usage_divergence(crowded, 32).item() == pytest.approx(torch.log(torch.tensor(8.0)).item(), rel=1e-5)
    # Latents crowded around code 0: descending the term moves them toward the other codes.
    book = F.normalize(torch.randn(codes, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    latents = (book[0] + 0.05 * torch.randn(64, 4, generator=torch.Generator().manual_seed(1))).requires_grad_()
    before = usage_divergence(soft_assignment_sums(latents, book, 0.1), 64)
    before.backward()
    with torch.no_grad():
        moved = latents - 0.5 * latents.grad
    after = usage_divergence(soft_assignment_sums(moved, book, 0.1), 64)
    assert after < before - 1e-3
    # The model hands the sums over only when asked, one assignment per latent.
    model = VQVAE(ModelConfig(codes=16, dim=8, downsample=8, lookup_dim=4, l2_codes=True))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model(x).assignment_sums is None
    sums = model(x, usage_temperature=0.01).assignment_sums
    assert sums is not None and sums.shape == (16,) and sums.sum().item() == pytest.approx(2 * 4 * 4, rel=1e-5)
