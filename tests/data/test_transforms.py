from dataclasses import dataclass

import pytest
import torch

from hpcbrain.data.transforms import (
    Compose,
    Cutout,
    GaussianNoise,
    HemisphereFlip,
    RandomAffine,
    affine_transform,
    build_augmentation,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def volume(shape=(1, 6, 5, 7), seed=0):
    return torch.rand(shape, generator=gen(seed))


# --- hemisphere flip --------------------------------------------------------------------------
def test_flip_mirrors_the_left_right_axis_of_an_asymmetric_volume():
    x = torch.zeros(1, 4, 3, 2)
    x[0, 0, 1, 1] = 1.0  # a single voxel at the far left (x = 0 in RAS+)
    x[0, 1, 2, 0] = 2.0
    y = HemisphereFlip(p=1)(x, gen())
    expected = torch.zeros_like(x)
    expected[0, 3, 1, 1] = 1.0
    expected[0, 2, 2, 0] = 2.0
    assert torch.equal(y, expected)


def test_flip_is_its_own_inverse():
    x = volume()
    flip = HemisphereFlip(p=1)
    assert not torch.equal(flip(x, gen()), x)
    assert torch.equal(flip(flip(x, gen()), gen()), x)


# --- rotation and translation -----------------------------------------------------------------
def test_zero_rotation_and_translation_is_identity():
    x = volume()
    assert torch.allclose(affine_transform(x), x, atol=1e-5)
    assert torch.allclose(RandomAffine(0.0, 0.0, p=1)(x, gen()), x, atol=1e-5)


def test_integer_translation_shifts_by_that_many_voxels():
    x = volume((2, 6, 5, 7))
    y = affine_transform(x, translation_vox=(2, 0, -1))
    # Content moves +2 along D and −1 along W; vacated voxels are zero.
    assert torch.allclose(y[:, 2:, :, :-1], x[:, :-2, :, 1:], atol=1e-5)
    assert torch.all(y[:, :2] == 0) and torch.all(y[..., -1] == 0)


@pytest.mark.parametrize("axis, dims", [(0, (2, 3)), (1, (3, 1)), (2, (1, 2))])
def test_quarter_turn_equals_rot90(axis, dims):
    x = volume((1, 5, 5, 5))
    angles = [0.0, 0.0, 0.0]
    angles[axis] = 90.0
    assert torch.allclose(affine_transform(x, rotation_deg=angles),
                          torch.rot90(x, 1, dims=dims), atol=1e-4)


def test_random_affine_stays_within_bounds_and_is_seeded():
    transform = RandomAffine(rotation_deg=5.0, translation_vox=2.0, p=1)
    for seed in range(20):
        angles, shift = transform.sample((1, 8, 8, 8), gen(seed))
        assert all(abs(a) <= 5.0 for a in angles) and all(abs(t) <= 2.0 for t in shift)
    x = volume((1, 8, 8, 8))
    assert torch.equal(transform(x, gen(3)), transform(x, gen(3)))
    assert not torch.equal(transform(x, gen(3)), transform(x, gen(4)))


# --- cutout ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_cutout_zeroes_exactly_a_box_of_the_given_size(seed):
    x = torch.ones(2, 8, 9, 10)
    y = Cutout(3, p=1)(x, gen(seed))
    zeros = (y == 0).nonzero()
    assert zeros.shape[0] == 2 * 3 ** 3
    for axis in (1, 2, 3):
        coords = zeros[:, axis]
        assert int(coords.max() - coords.min()) == 2  # 3 consecutive voxels on every axis
    assert torch.equal(y[0] == 0, y[1] == 0)  # same box in every channel
    assert torch.all(x == 1)  # input untouched


def test_cutout_larger_than_the_volume_is_clipped():
    assert torch.all(Cutout(20, p=1)(torch.ones(1, 4, 4, 4), gen()) == 0)


def test_cutout_is_seeded():
    x = torch.ones(1, 16, 16, 16)
    cutout = Cutout(4, p=1)
    assert torch.equal(cutout(x, gen(1)), cutout(x, gen(1)))
    assert not torch.equal(cutout(x, gen(1)), cutout(x, gen(2)))


# --- noise -------------------------------------------------------------------------------------
def test_noise_has_the_configured_std():
    x = torch.full((1, 32, 32, 32), 5.0)
    noise = GaussianNoise(0.3, p=1)(x, gen()) - x
    assert abs(float(noise.std()) - 0.3) < 0.01
    assert abs(float(noise.mean())) < 0.01


def test_noise_is_seeded():
    x = torch.zeros(1, 8, 8, 8)
    noise = GaussianNoise(1.0, p=1)
    assert torch.equal(noise(x, gen(1)), noise(x, gen(1)))
    assert not torch.equal(noise(x, gen(1)), noise(x, gen(2)))


# --- probability, composition, pairs -----------------------------------------------------------
def test_probability_zero_is_identity_and_half_fires_about_half_the_time():
    x = volume()
    assert torch.equal(HemisphereFlip(p=0)(x, gen()), x)
    flip = HemisphereFlip(p=0.5)
    fired = sum(flip.sample(x.shape, gen(seed)) is not None for seed in range(400))
    assert 150 < fired < 250


def test_probability_of_one_transform_does_not_change_what_the_others_draw():
    shape = (1, 8, 8, 8)
    with_cutout = Compose([Cutout(3, p=1), GaussianNoise(1.0, p=1)]).sample(shape, gen(7))
    without = Compose([Cutout(3, p=0), GaussianNoise(1.0, p=1)]).sample(shape, gen(7))
    assert without[0] is None and with_cutout[1] == without[1]


def full_pipeline():
    return Compose([HemisphereFlip(p=1), RandomAffine(10.0, 2.0, p=1), Cutout(3, p=1),
                    GaussianNoise(0.1, p=1)])


def test_compose_is_deterministic_for_a_generator_seed():
    x = volume((1, 8, 8, 8))
    t = full_pipeline()
    assert torch.equal(t(x, gen(5)), t(x, gen(5)))
    assert not torch.equal(t(x, gen(5)), t(x, gen(6)))


def test_apply_pair_uses_identical_parameters():
    x_u, x_v = volume((1, 8, 8, 8), seed=1), volume((1, 8, 8, 8), seed=2)
    t = full_pipeline()
    y_u, y_v = t.apply_pair(x_u, x_v, gen(9))
    assert torch.equal(y_u, t(x_u, gen(9)))
    assert torch.equal(y_v, t(x_v, gen(9)))
    same_u, same_v = t.apply_pair(x_u, x_u.clone(), gen(9))
    assert torch.equal(same_u, same_v)


def test_apply_many_rejects_mismatched_or_non_volume_shapes():
    with pytest.raises(ValueError, match="share a shape"):
        full_pipeline().apply_pair(torch.zeros(1, 8, 8, 8), torch.zeros(1, 8, 8, 7), gen())
    with pytest.raises(ValueError, match=r"\[C, D, H, W\]"):
        HemisphereFlip()(torch.zeros(8, 8, 8), gen())


# --- build_augmentation -----------------------------------------------------------------------
def test_build_augmentation_from_a_config_section():
    cfg = {"flip": True, "rotation_deg": 5.0, "translation_vox": 1.0, "cutout_size": 4,
           "noise_std": 0.05, "p": 0.3}
    t = build_augmentation(cfg)
    assert [type(s) for s in t.transforms] == [HemisphereFlip, RandomAffine, Cutout,
                                               GaussianNoise]
    assert all(s.p == 0.3 for s in t.transforms)
    assert t.transforms[1].rotation_deg == 5.0 and t.transforms[2].size == 4
    assert t.transforms[3].std == 0.05


def test_build_augmentation_accepts_omegaconf_and_dataclasses():
    from omegaconf import OmegaConf

    @dataclass
    class Augment:
        flip: bool = True
        rotation_deg: float = 0.0
        translation_vox: float = 0.0
        cutout_size: int = 0
        noise_std: float = 0.1
        p: float = 0.5

    for cfg in (Augment(), OmegaConf.structured(Augment)):
        t = build_augmentation(cfg)
        assert [type(s) for s in t.transforms] == [HemisphereFlip, GaussianNoise]


def test_build_augmentation_off_and_errors():
    assert build_augmentation(None) is None
    assert build_augmentation({}) is None
    assert build_augmentation({"flip": True, "p": 0.0}) is None
    with pytest.raises(ValueError, match="unknown keys"):
        build_augmentation({"rotaton_deg": 5})
    with pytest.raises(ValueError, match="p must lie"):
        build_augmentation({"flip": True, "p": 1.5})
    with pytest.raises(ValueError, match="noise_std"):
        build_augmentation({"noise_std": -1})


def test_a_whole_batch_on_its_device_equals_each_item_alone():
    """apply_batch is the device path: every transform at p 0.5, so in a batch of 8 some items
    fire and some do not; each item's result must be what its own draw gives it alone."""
    pipeline = build_augmentation({"flip": True, "rotation_deg": 10, "translation_vox": 2,
                                   "cutout_size": 4, "noise_std": 0.1, "p": 0.5})
    x = torch.randn(8, 1, 12, 10, 9, generator=torch.Generator().manual_seed(3))
    draws, alone = [], []
    for b in range(8):
        generator = torch.Generator().manual_seed(100 + b)
        alone.append(pipeline(x[b], generator))
        draws.append(pipeline.sample(x.shape[1:], torch.Generator().manual_seed(100 + b)))
    for j in range(4):                      # each transform fires for some items, not all
        assert 0 < sum(draw[j] is not None for draw in draws) < 8, j
    batch = pipeline.apply_batch(x, draws)
    torch.testing.assert_close(batch, torch.stack(alone), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B, C, D, H, W\] batch and B parameter draws"):
        pipeline.apply_batch(x, draws[:7])
