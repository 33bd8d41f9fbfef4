"""View augmentation (alice_ds.sampler.augment): the fast rotation equals MONAI's, the noise is seeded."""

import numpy as np
import torch


def test_fast_rotation_equals_monai_rotate():
    """`rotate` replaces MONAI's resampling (not its angles or matrix): same volume for the same
    angles, also for a non-cubic view; and ViewAugment's rotation equals MONAI's RandRotate run
    with the seed it drew."""
    from monai.transforms import RandRotate, Rotate

    from alice_ds.sampler.augment import SEED_LIMIT, ViewAugment, rotate

    view = torch.rand(1, 14, 18, 22, generator=torch.Generator().manual_seed(0))
    for angles in ((0.2, -0.15, 0.1), (0.0, 0.0, 0.26), (-0.26, 0.26, -0.26)):
        want = Rotate(angle=angles, keep_size=True, mode="bilinear", padding_mode="zeros")(view)
        torch.testing.assert_close(rotate(view, angles), want.as_tensor(), atol=1e-4, rtol=0)
    rng = np.random.default_rng(3)
    seed = int(np.random.default_rng(3).integers(SEED_LIMIT))  # the draw ViewAugment will make
    got = ViewAugment(15.0, 1.0, noise_std=0.0)(view, rng)
    rad = np.radians(15.0)
    monai = RandRotate(range_x=rad, range_y=rad, range_z=rad, prob=1.0, keep_size=True,
                       mode="bilinear", padding_mode="zeros")
    monai.set_random_state(seed=seed)
    want = monai(view).as_tensor().clamp(0, 1)
    assert (got - view).abs().mean() > 0.05  # it did rotate
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_noise_is_seeded_gaussian_of_the_configured_sigma():
    from alice_ds.sampler.augment import ViewAugment

    view = torch.full((1, 24, 24, 24), 0.5)
    aug = ViewAugment(0.0, 0.0, noise_std=0.1)
    a = aug(view, np.random.default_rng(7))
    assert torch.equal(a, aug(view, np.random.default_rng(7)))  # same generator state, same noise
    assert not torch.equal(a, aug(view, np.random.default_rng(8)))
    assert torch.equal(view, torch.full_like(view, 0.5))  # the input is left alone
    d = (a - 0.5).flatten()  # 13824 draws; 0.5 +- 5 sigma is never clipped
    assert abs(float(d.mean())) < 0.005 and abs(float(d.std()) - 0.1) < 0.003
