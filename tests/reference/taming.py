"""Independent reference: a self-contained PyTorch port of taming-transformers' VQGAN.

Tests use this module as an *independent* reference implementation (it imports
nothing from ``vqtool``): build a model here, load a real or seeded state dict,
and compare codes / reconstructions against the code under test.

What is ported (read from the repositories, not written from memory)
----------------------------------------------------------------------
* github:CompVis/taming-transformers @ 3ba01b241669f5ade541ce990f7650a3b8f65318
  (2022-11-07, HEAD of the stored snapshot)

  - ``taming/modules/diffusionmodules/model.py``: ``nonlinearity``,
    ``Normalize``, ``Upsample``, ``Downsample``, ``ResnetBlock``,
    ``AttnBlock``, ``Encoder``, ``Decoder`` (line-for-line; the unused
    ``Model``/``VUNet``/``SimpleDecoder``/``UpsampleDecoder`` are left out).
  - ``taming/modules/vqvae/quantize.py``: ``VectorQuantizer2`` (``remap``,
    ``unknown_index``, ``sane_index_shape``, ``legacy``, ``remap_to_used``,
    ``unmap_to_all``, ``get_codebook_entry``). ``einops.rearrange`` calls are
    written as the equivalent ``permute(...).contiguous()``.
  - ``taming/models/vqgan.py``: ``VQModel`` without the loss and Lightning
    parts: ``encoder``, ``decoder``, ``quantize``, ``quant_conv`` and
    ``post_quant_conv`` are registered in the original's order, so
    ``VQModel(...).state_dict()`` has exactly the keys of a taming /
    latent-diffusion checkpoint's ``state_dict`` minus ``loss.*``
    (plus ``quantize.used`` when ``remap`` is set, as in the original).
  - ``taming/models/cond_transformer.py`` (``encode_to_z``, ``decode_to_img``)
    was read for how the original turns images into indices and back; the
    ``codes`` / ``decode_codes`` helpers at the bottom follow it.

* github:CompVis/latent-diffusion @ a506df5756472e2ebaf9078affdde2c4f1502cd4
  (2022-07-27): ``ldm/models/autoencoder.py``,
  ``ldm/modules/diffusionmodules/model.py``,
  ``models/first_stage_models/vq-f4/config.yaml`` (and ``vq-f4-noattn``).
* github:facebookresearch/chameleon @ dbbe47fdbc7a3cc4982ae931fea75e227262e70a
  (2024-07-29): ``chameleon/inference/vqgan.py``,
  ``chameleon/inference/image_tokenizer.py``.

Deliberate deviations from taming (none changes keys or numerics of the
published configs):

* ``Decoder.__init__`` does not ``print`` the z shape (``self.z_shape`` is kept).
* Two latent-diffusion / Chameleon extensions are accepted, both off by default
  so a taming ``ddconfig`` builds exactly taming's network:
  ``tanh_out`` (Decoder: ``tanh`` after ``conv_out``; taming's Decoder has no
  such option and silently ignores the kwarg) and ``attn_type`` in
  ``{"vanilla", "none"}`` (``"none"`` = ``nn.Identity``, used by LDM's
  ``vq-f4-noattn``; taming would ignore the kwarg and build ``AttnBlock``).
  ``use_linear_attn`` / ``attn_type="linear"`` (LDM ``LinAttnBlock``) is not
  ported and raises.
* ``remap`` may be a path to a ``.npy`` file (as in the original, loaded with
  ``np.load``) or an array / tensor / list of used indices (convenience).

Known quirk kept on purpose: ``VQModel.decode_code`` calls
``self.quantize.embed_code``, which ``VectorQuantizer2`` does not define, in
taming, latent-diffusion and Chameleon alike, so it raises ``AttributeError``
exactly as the original does. The working path the original uses to decode
indices is ``quantize.get_codebook_entry`` + ``decode`` (taming
``Net2NetTransformer.decode_to_img``, Chameleon
``ImageTokenizer.pil_from_img_toks``); ``decode_codes`` below does that.

Differences: latent-diffusion vs taming (for ``first_stage_models/vq-f4``)
---------------------------------------------------------------------------
* LDM's VQModel imports the quantizer from taming
  (``from taming.modules.vqvae.quantize import VectorQuantizer2``): identical.
* LDM ``model.py`` vs taming ``model.py`` (diffed): ``Normalize`` gains a
  ``num_groups=32`` argument (default unchanged); attention is built via
  ``make_attn(attn_type)`` (``"vanilla"`` = the same ``AttnBlock``); ``Decoder``
  gains ``tanh_out=False``; ``ResnetBlock``, ``AttnBlock``, ``Upsample``,
  ``Downsample`` and both forwards are otherwise identical. vq-f4 uses the
  defaults (no ``attn_type`` / ``tanh_out`` in its config), so keys and
  numerics equal taming's. (vq-f4-noattn sets ``attn_type: none``: the
  ``mid.attn_1`` keys disappear.)
* LDM's ``VQModel`` adds ``batch_resize_range``, ``scheduler_config``,
  ``lr_g_factor``, ``use_ema`` (default False; if True a ``model_ema.*``
  ``LitEma`` copy appears in the state dict; vq-f4 does not set it),
  ``encode_to_prequant``, and ``forward(return_pred_indices=...)``. ``encode``,
  ``decode``, ``decode_code`` (same ``embed_code`` bug) are unchanged.
* LDM's ``VQModelInterface`` (what LDM diffusion configs actually load)
  changes the *interface*: ``encode`` returns the pre-quantisation latent
  (after ``quant_conv``) and ``decode`` re-quantises before
  ``post_quant_conv``. Keys are the same.

Differences: Chameleon vs taming
--------------------------------
``chameleon/inference/vqgan.py`` says it is taken from taming at the same
commit 3ba01b2 "with minimal dependencies":

* ``VectorQuantizer2``: the same code, including ``remap`` / ``remap_to_used``
  / ``unmap_to_all`` / ``get_codebook_entry`` (``rearrange`` replaced by
  ``permute``/``transpose``); so remap handling is *not* different.
* ``Normalize(in_channels, num_groups=32)`` and ``make_attn`` as in LDM
  (but ``"linear"`` raises ``ValueError``); ``Encoder`` as LDM's.
* ``Decoder`` is LDM's (``tanh_out=False``, ``attn_type``), minus the print
  and the unused ``in_ch_mult``; same keys, same numerics at defaults.
* ``VQModel`` is a plain ``nn.Module`` with no ``lossconfig`` argument;
  ``init_from_ckpt`` loads with ``strict=False``; ``decode_code`` has the
  same ``embed_code`` bug.
* ``ImageTokenizer`` deletes ``lossconfig`` from the yaml params, encodes a
  512x512 centre crop scaled to [-1, 1] and takes ``info[2]`` (flat
  ``N*h*w`` indices); it decodes with
  ``get_codebook_entry(toks, (1, 32, 32, embed_dim))`` + ``decode``, i.e.
  a hard-coded 32x32 grid (512 / 16).

Published configurations: see ``PUBLISHED`` at the bottom.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "nonlinearity",
    "Normalize",
    "Upsample",
    "Downsample",
    "ResnetBlock",
    "AttnBlock",
    "Encoder",
    "Decoder",
    "VectorQuantizer2",
    "VectorQuantizer",
    "VQModel",
    "codes",
    "decode_codes",
    "PUBLISHED",
]


# --------------------------------------------------------------------------
# taming/modules/diffusionmodules/model.py
# --------------------------------------------------------------------------


def nonlinearity(x):
    # swish
    return x * torch.sigmoid(x)


def Normalize(in_channels):
    return torch.nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    def __init__(self, in_channels, with_conv):
        super().__init__()
        self.with_conv = with_conv
        if self.with_conv:
            self.conv = torch.nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        x = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.with_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    def __init__(self, in_channels, with_conv):
        super().__init__()
        self.with_conv = with_conv
        if self.with_conv:
            # no asymmetric padding in torch conv, must do it ourselves
            self.conv = torch.nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        if self.with_conv:
            pad = (0, 1, 0, 1)
            x = torch.nn.functional.pad(x, pad, mode="constant", value=0)
            x = self.conv(x)
        else:
            x = torch.nn.functional.avg_pool2d(x, kernel_size=2, stride=2)
        return x


class ResnetBlock(nn.Module):
    def __init__(self, *, in_channels, out_channels=None, conv_shortcut=False, dropout, temb_channels=512):
        super().__init__()
        self.in_channels = in_channels
        out_channels = in_channels if out_channels is None else out_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels)
        self.conv1 = torch.nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = torch.nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = torch.nn.Dropout(dropout)
        self.conv2 = torch.nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if self.in_channels != self.out_channels:
            if self.use_conv_shortcut:
                self.conv_shortcut = torch.nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = torch.nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x, temb):
        h = x
        h = self.norm1(h)
        h = nonlinearity(h)
        h = self.conv1(h)

        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]

        h = self.norm2(h)
        h = nonlinearity(h)
        h = self.dropout(h)
        h = self.conv2(h)

        if self.in_channels != self.out_channels:
            if self.use_conv_shortcut:
                x = self.conv_shortcut(x)
            else:
                x = self.nin_shortcut(x)

        return x + h


class AttnBlock(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.in_channels = in_channels

        self.norm = Normalize(in_channels)
        self.q = torch.nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = torch.nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = torch.nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = torch.nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x):
        h_ = x
        h_ = self.norm(h_)
        q = self.q(h_)
        k = self.k(h_)
        v = self.v(h_)

        # compute attention
        b, c, h, w = q.shape
        q = q.reshape(b, c, h * w)
        q = q.permute(0, 2, 1)  # b,hw,c
        k = k.reshape(b, c, h * w)  # b,c,hw
        w_ = torch.bmm(q, k)  # b,hw,hw    w[b,i,j]=sum_c q[b,i,c]k[b,c,j]
        w_ = w_ * (int(c) ** (-0.5))
        w_ = torch.nn.functional.softmax(w_, dim=2)

        # attend to values
        v = v.reshape(b, c, h * w)
        w_ = w_.permute(0, 2, 1)  # b,hw,hw (first hw of k, second of q)
        h_ = torch.bmm(v, w_)  # b, c,hw (hw of q) h_[b,c,j] = sum_i v[b,c,i] w_[b,i,j]
        h_ = h_.reshape(b, c, h, w)

        h_ = self.proj_out(h_)

        return x + h_


def _make_attn(in_channels, attn_type="vanilla"):
    """latent-diffusion's ``make_attn`` (taming always builds ``AttnBlock``)."""
    if attn_type == "vanilla":
        return AttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity(in_channels)
    raise NotImplementedError(f"attn_type {attn_type!r} (LDM LinAttnBlock) is not ported")


class Encoder(nn.Module):
    def __init__(
        self,
        *,
        ch,
        out_ch,
        ch_mult=(1, 2, 4, 8),
        num_res_blocks,
        attn_resolutions,
        dropout=0.0,
        resamp_with_conv=True,
        in_channels,
        resolution,
        z_channels,
        double_z=True,
        attn_type="vanilla",  # LDM extension; taming ignores it
        use_linear_attn=False,  # LDM extension; not ported
        **ignore_kwargs,
    ):
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        # downsampling
        self.conv_in = torch.nn.Conv2d(in_channels, self.ch, kernel_size=3, stride=1, padding=1)

        curr_res = resolution
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for i_block in range(self.num_res_blocks):  # noqa: B007 (as in taming)
                block.append(
                    ResnetBlock(
                        in_channels=block_in, out_channels=block_out, temb_channels=self.temb_ch, dropout=dropout
                    )
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(_make_attn(block_in, attn_type))
            down = nn.Module()
            down.block = block
            down.attn = attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res = curr_res // 2
            self.down.append(down)

        # middle
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(
            in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch, dropout=dropout
        )
        self.mid.attn_1 = _make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(
            in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch, dropout=dropout
        )

        # end
        self.norm_out = Normalize(block_in)
        self.conv_out = torch.nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1
        )

    def forward(self, x):
        # timestep embedding
        temb = None

        # downsampling
        hs = [self.conv_in(x)]
        for i_level in range(self.num_resolutions):
            for i_block in range(self.num_res_blocks):
                h = self.down[i_level].block[i_block](hs[-1], temb)
                if len(self.down[i_level].attn) > 0:
                    h = self.down[i_level].attn[i_block](h)
                hs.append(h)
            if i_level != self.num_resolutions - 1:
                hs.append(self.down[i_level].downsample(hs[-1]))

        # middle
        h = hs[-1]
        h = self.mid.block_1(h, temb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb)

        # end
        h = self.norm_out(h)
        h = nonlinearity(h)
        h = self.conv_out(h)
        return h


class Decoder(nn.Module):
    def __init__(
        self,
        *,
        ch,
        out_ch,
        ch_mult=(1, 2, 4, 8),
        num_res_blocks,
        attn_resolutions,
        dropout=0.0,
        resamp_with_conv=True,
        in_channels,
        resolution,
        z_channels,
        give_pre_end=False,
        tanh_out=False,  # LDM / Chameleon extension; taming ignores it
        attn_type="vanilla",  # LDM extension; taming ignores it
        use_linear_attn=False,  # LDM extension; not ported
        **ignorekwargs,
    ):
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        # compute in_ch_mult, block_in and curr_res at lowest res
        block_in = ch * ch_mult[self.num_resolutions - 1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        # (taming prints "Working with z of shape ..." here; omitted)

        # z to block_in
        self.conv_in = torch.nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        # middle
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(
            in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch, dropout=dropout
        )
        self.mid.attn_1 = _make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(
            in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch, dropout=dropout
        )

        # upsampling
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for i_block in range(self.num_res_blocks + 1):  # noqa: B007 (as in taming)
                block.append(
                    ResnetBlock(
                        in_channels=block_in, out_channels=block_out, temb_channels=self.temb_ch, dropout=dropout
                    )
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(_make_attn(block_in, attn_type))
            up = nn.Module()
            up.block = block
            up.attn = attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res = curr_res * 2
            self.up.insert(0, up)  # prepend to get consistent order

        # end
        self.norm_out = Normalize(block_in)
        self.conv_out = torch.nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z):
        self.last_z_shape = z.shape

        # timestep embedding
        temb = None

        # z to block_in
        h = self.conv_in(z)

        # middle
        h = self.mid.block_1(h, temb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb)

        # upsampling
        for i_level in reversed(range(self.num_resolutions)):
            for i_block in range(self.num_res_blocks + 1):
                h = self.up[i_level].block[i_block](h, temb)
                if len(self.up[i_level].attn) > 0:
                    h = self.up[i_level].attn[i_block](h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)

        # end
        if self.give_pre_end:
            return h

        h = self.norm_out(h)
        h = nonlinearity(h)
        h = self.conv_out(h)
        if self.tanh_out:
            h = torch.tanh(h)
        return h


# --------------------------------------------------------------------------
# taming/modules/vqvae/quantize.py :: VectorQuantizer2
# --------------------------------------------------------------------------


class VectorQuantizer2(nn.Module):
    """
    Improved version over VectorQuantizer, can be used as a drop-in replacement. Mostly
    avoids costly matrix multiplications and allows for post-hoc remapping of indices.
    """

    # NOTE: due to a bug the beta term was applied to the wrong term. for
    # backwards compatibility we use the buggy version by default, but you can
    # specify legacy=False to fix it.
    def __init__(self, n_e, e_dim, beta, remap=None, unknown_index="random", sane_index_shape=False, legacy=True):
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy

        self.embedding = nn.Embedding(self.n_e, self.e_dim)
        self.embedding.weight.data.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)

        self.remap = remap
        if self.remap is not None:
            if isinstance(self.remap, str):  # the original: a path to a .npy file
                used = torch.tensor(np.load(self.remap))
            else:  # convenience: the array of used indices itself
                used = torch.as_tensor(np.asarray(self.remap))
            self.register_buffer("used", used)
            self.re_embed = self.used.shape[0]
            self.unknown_index = unknown_index  # "random" or "extra" or integer
            if self.unknown_index == "extra":
                self.unknown_index = self.re_embed
                self.re_embed = self.re_embed + 1
        else:
            self.re_embed = n_e

        self.sane_index_shape = sane_index_shape

    def remap_to_used(self, inds):
        ishape = inds.shape
        assert len(ishape) > 1
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        match = (inds[:, :, None] == used[None, None, ...]).long()
        new = match.argmax(-1)
        unknown = match.sum(2) < 1
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, size=new[unknown].shape).to(device=new.device)
        else:
            new[unknown] = self.unknown_index
        return new.reshape(ishape)

    def unmap_to_all(self, inds):
        ishape = inds.shape
        assert len(ishape) > 1
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        if self.re_embed > self.used.shape[0]:  # extra token
            inds[inds >= self.used.shape[0]] = 0  # simply set to zero
        back = torch.gather(used[None, :][inds.shape[0] * [0], :], 1, inds)
        return back.reshape(ishape)

    def forward(self, z, temp=None, rescale_logits=False, return_logits=False):
        assert temp is None or temp == 1.0, "Only for interface compatible with Gumbel"
        assert rescale_logits == False, "Only for interface compatible with Gumbel"  # noqa: E712
        assert return_logits == False, "Only for interface compatible with Gumbel"  # noqa: E712
        # reshape z -> (batch, height, width, channel) and flatten
        z = z.permute(0, 2, 3, 1).contiguous()  # rearrange(z, 'b c h w -> b h w c')
        z_flattened = z.view(-1, self.e_dim)
        # distances from z to embeddings e_j (z - e)^2 = z^2 + e^2 - 2 e * z

        d = (
            torch.sum(z_flattened**2, dim=1, keepdim=True)
            + torch.sum(self.embedding.weight**2, dim=1)
            - 2
            * torch.einsum("bd,dn->bn", z_flattened, self.embedding.weight.permute(1, 0))  # rearrange(w, 'n d -> d n')
        )

        min_encoding_indices = torch.argmin(d, dim=1)
        z_q = self.embedding(min_encoding_indices).view(z.shape)
        perplexity = None
        min_encodings = None

        # compute loss for embedding
        if not self.legacy:
            loss = self.beta * torch.mean((z_q.detach() - z) ** 2) + torch.mean((z_q - z.detach()) ** 2)
        else:
            loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)

        # preserve gradients
        z_q = z + (z_q - z).detach()

        # reshape back to match original input shape
        z_q = z_q.permute(0, 3, 1, 2).contiguous()  # rearrange(z_q, 'b h w c -> b c h w')

        if self.remap is not None:
            min_encoding_indices = min_encoding_indices.reshape(z.shape[0], -1)  # add batch axis
            min_encoding_indices = self.remap_to_used(min_encoding_indices)
            min_encoding_indices = min_encoding_indices.reshape(-1, 1)  # flatten

        if self.sane_index_shape:
            min_encoding_indices = min_encoding_indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])

        return z_q, loss, (perplexity, min_encodings, min_encoding_indices)

    def get_codebook_entry(self, indices, shape):
        # shape specifying (batch, height, width, channel)
        if self.remap is not None:
            indices = indices.reshape(shape[0], -1)  # add batch axis
            indices = self.unmap_to_all(indices)
            indices = indices.reshape(-1)  # flatten again

        # get quantized latent vectors
        z_q = self.embedding(indices)

        if shape is not None:
            z_q = z_q.view(shape)
            # reshape back to match original input shape
            z_q = z_q.permute(0, 3, 1, 2).contiguous()

        return z_q


VectorQuantizer = VectorQuantizer2  # taming/models/vqgan.py imports it under this name


# --------------------------------------------------------------------------
# taming/models/vqgan.py :: VQModel (no loss, no Lightning)
# --------------------------------------------------------------------------


class VQModel(nn.Module):
    def __init__(self, ddconfig: dict, n_embed: int, embed_dim: int, remap=None, sane_index_shape=False):
        super().__init__()
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        # (self.loss = instantiate_from_config(lossconfig) sits here in taming)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25, remap=remap, sane_index_shape=sane_index_shape)
        self.quant_conv = torch.nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode(self, x):
        h = self.encoder(x)
        h = self.quant_conv(h)
        quant, emb_loss, info = self.quantize(h)
        return quant, emb_loss, info

    def encode_to_prequant(self, x):
        # latent-diffusion VQModel / taming GumbelVQ method (not on taming's VQModel)
        h = self.encoder(x)
        h = self.quant_conv(h)
        return h

    def decode(self, quant):
        quant = self.post_quant_conv(quant)
        dec = self.decoder(quant)
        return dec

    def decode_code(self, code_b):
        # As in the original: VectorQuantizer2 has no ``embed_code``, so this
        # raises AttributeError in taming, latent-diffusion and Chameleon too.
        quant_b = self.quantize.embed_code(code_b)
        dec = self.decode(quant_b)
        return dec

    def forward(self, input):
        quant, diff, _ = self.encode(input)
        dec = self.decode(quant)
        return dec, diff

    def get_last_layer(self):
        return self.decoder.conv_out.weight


# --------------------------------------------------------------------------
# helpers used by the tests
# --------------------------------------------------------------------------


@torch.no_grad()
def codes(model: VQModel, x: torch.Tensor) -> torch.Tensor:
    """Indices of ``model.encode(x)``: LongTensor N x h x w.

    ``x``: float N x 3 x H x W in [-1, 1]. These are exactly the indices the
    original's ``encode`` returns in ``info[2]`` (after ``remap_to_used`` when a
    remap is set; note ``unknown_index="random"`` draws from torch's RNG),
    reshaped from the original's flat ``(N*h*w,)`` / ``(N*h*w, 1)`` /
    ``(N, h, w)`` layouts to N x h x w (row-major, as ``encode_to_z`` reads it).
    """
    quant, _, (_, _, ind) = model.encode(x)
    n, _, h, w = quant.shape
    return ind.reshape(n, h, w).long()


@torch.no_grad()
def decode_codes(model: VQModel, codes: torch.Tensor) -> torch.Tensor:
    """Decode N x h x w indices to float N x 3 x H x W, as the original does.

    Same path as taming ``Net2NetTransformer.decode_to_img`` / Chameleon
    ``pil_from_img_toks``: ``quantize.get_codebook_entry`` (which unmaps
    remapped indices with ``unmap_to_all``) with shape (N, h, w, embed_dim),
    then ``post_quant_conv`` and ``decoder``. The input is cloned because
    ``unmap_to_all`` writes into its argument when ``unknown_index="extra"``.
    """
    n, h, w = codes.shape
    shape = (n, h, w, model.quantize.e_dim)
    quant = model.quantize.get_codebook_entry(codes.reshape(-1).clone().long(), shape)
    return model.decode(quant)


# --------------------------------------------------------------------------
# published configurations
# --------------------------------------------------------------------------

PUBLISHED = {
    # taming README: "VQGAN ImageNet (f=16), 16384" -> heibox
    # vqgan_imagenet_f16_16384 (logs/vqgan_imagenet_f16_16384/configs/model.yaml).
    # That yaml is not in the taming repo (only the heibox link); its content
    # was found as third-party copies in the stored code corpus
    # (target taming.models.vqgan.VQModel, monitor val/rec_loss, lossconfig
    # VQLPIPSWithDiscriminator disc_start 0, disc_weight 0.75,
    # disc_num_layers 2, codebook_weight 1.0). Same ddconfig as the repo's
    # configs/imagenet_vqgan.yaml (the 1024-code model, below). No remap.
    "taming_vqgan_imagenet_f16_16384": {
        "ddconfig": {
            "double_z": False,
            "z_channels": 256,
            "resolution": 256,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 128,
            "ch_mult": [1, 1, 2, 2, 4],
            "num_res_blocks": 2,
            "attn_resolutions": [16],
            "dropout": 0.0,
        },
        "n_embed": 16384,
        "embed_dim": 256,
        "remap": None,
    },
    # taming configs/imagenet_vqgan.yaml (in the repo at 3ba01b2).
    "taming_vqgan_imagenet_f16_1024": {
        "ddconfig": {
            "double_z": False,
            "z_channels": 256,
            "resolution": 256,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 128,
            "ch_mult": [1, 1, 2, 2, 4],
            "num_res_blocks": 2,
            "attn_resolutions": [16],
            "dropout": 0.0,
        },
        "n_embed": 1024,
        "embed_dim": 256,
        "remap": None,
    },
    # latent-diffusion models/first_stage_models/vq-f4/config.yaml @ a506df5
    # (target ldm.models.autoencoder.VQModel, monitor val/rec_loss; lossconfig
    # VQLPIPSWithDiscriminator disc_start 0, disc_weight 0.75,
    # codebook_weight 1.0). No attention outside the mid blocks. No remap.
    "ldm_vq_f4": {
        "ddconfig": {
            "double_z": False,
            "z_channels": 3,
            "resolution": 256,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 128,
            "ch_mult": [1, 2, 4],
            "num_res_blocks": 2,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
        "n_embed": 8192,
        "embed_dim": 3,
        "remap": None,
    },
    # Chameleon data/tokenizer/vqgan.yaml: NOT found in the stored corpus
    # (the chameleon repo only downloads it; transformers'
    # convert_chameleon_weights_to_hf.py reads model.params{ddconfig, n_embed,
    # embed_dim, ckpt_path, lossconfig} from it). Values below are the
    # documented ones, matching transformers' ChameleonVQVAEConfig defaults
    # ("similar to ... meta/chameleon-7B": embed_dim 256, num_embeddings 8192,
    # double_latent False, latent_channels 256, resolution 512, in_channels 3,
    # base_channels 128, channel_multiplier [1,1,2,2,4], num_res_blocks 2,
    # attn_resolutions None, dropout 0.0, attn_type "vanilla") and with
    # image_tokenizer.py's hard-coded (1, 32, 32, embed_dim) decode grid for
    # 512 px input (5 levels -> f16). out_ch 3 is not in the HF config.
    # attn_resolutions [] is unverified against the yaml itself.
    "chameleon_vqgan": {
        "ddconfig": {
            "double_z": False,
            "z_channels": 256,
            "resolution": 512,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 128,
            "ch_mult": [1, 1, 2, 2, 4],
            "num_res_blocks": 2,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
        "n_embed": 8192,
        "embed_dim": 256,
        "remap": None,
    },
}
