"""The LSOR conv autoencoder: shapes, size validation, gradients."""
import pytest
import torch

from hpcbrain.models import ConvAutoencoder, LSORDecoder, LSOREncoder


def test_paper_shapes_64():
    # 64³ → four 2× max-pools → 4³, 16 channels: 16·4·4·4 = 1024-d latent (paper)
    torch.manual_seed(0)
    ae = ConvAutoencoder(widths=[16, 32, 64, 16], input_size=64)
    assert ae.latent_dim == 1024 and ae.encoder.latent_dim == 1024
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        z, rec = ae.eval()(x)
    assert z.shape == (1, 1024)
    assert rec.shape == x.shape


def test_shapes_32_and_standalone_encoder():
    # 32³ → 2³, 16 channels: 16·2·2·2 = 128-d latent
    torch.manual_seed(0)
    enc = LSOREncoder(widths=[16, 32, 64, 16], input_size=32)
    dec = LSORDecoder(widths=[16, 32, 64, 16], input_size=32)
    assert enc.latent_dim == 128 == dec.latent_dim
    x = torch.randn(3, 1, 32, 32, 32)
    z = enc(x)
    assert z.shape == (3, 128)
    assert dec(z).shape == (3, 1, 32, 32, 32)


def test_paper_block_structure():
    enc = LSOREncoder(widths=[16, 32, 64, 16], input_size=64)
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv3d)]
    # C16-C32-C64-C16 then the plain Conv16 head
    assert [c.out_channels for c in convs] == [16, 32, 64, 16, 16]
    assert all(c.kernel_size == (3, 3, 3) and c.padding == (1, 1, 1) for c in convs)
    assert sum(isinstance(m, torch.nn.MaxPool3d) for m in enc.modules()) == 4
    bns = [m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert len(bns) == 4
    acts = [m for m in enc.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert len(acts) == 4 and all(a.negative_slope == 0.2 for a in acts)
    dec = LSORDecoder(widths=[16, 32, 64, 16], input_size=64)
    dconvs = [m for m in dec.modules() if isinstance(m, torch.nn.Conv3d)]
    # CD64-CD32-CD16-CD16-Conv1
    assert [c.out_channels for c in dconvs] == [64, 32, 16, 16, 1]
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in dec.modules()) == 4
    assert isinstance(dec.out, torch.nn.Conv3d)  # last conv: no BN, no activation after it


@pytest.mark.parametrize("size,widths", [(30, [16, 32, 64, 16]), (24, [4, 4, 4, 4]), (16, [2] * 5)])
def test_invalid_input_size(size, widths):
    with pytest.raises(ValueError, match="input_size"):
        LSOREncoder(widths=widths, input_size=size)
    with pytest.raises(ValueError, match="input_size"):
        ConvAutoencoder(widths=widths, input_size=size)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    ae = ConvAutoencoder(widths=[4, 8], input_size=16)
    assert ae.latent_dim == 8 * 4 ** 3
    x = torch.randn(2, 1, 16, 16, 16)
    z, rec = ae(x)
    ((rec - x) ** 2).mean().backward()
    for name, p in ae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_wrong_input_shape_is_rejected():
    enc = LSOREncoder(widths=[4, 8], input_size=16)
    with pytest.raises(ValueError):
        enc(torch.randn(2, 1, 32, 32, 32))
