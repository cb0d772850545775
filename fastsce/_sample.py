"""Built-in sample data: soft-label masks and predictions of varying quality.

Soft targets look like real ones: shapes whose borders are blurred, as an
average of several annotators or a smoothed mask would be. Predictions are
logits of the target plus noise that grows from image to image, with one region per image that the model
gets wrong, so the loss concentrates at soft borders and at the mistakes.
"""
import numpy as np


def _box(a, radius, axis):
    """Moving average of width 2*radius+1 along `axis`, edges repeated."""
    pad = [(0, 0)] * a.ndim
    pad[axis] = (radius + 1, radius)
    c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis)
    n = a.shape[axis]
    return (np.take(c, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis)
            - np.take(c, np.arange(n), axis)) / (2 * radius + 1)


def _blur(a, radius, passes=3):
    """Box blur of the last two axes, three times over (close to a Gaussian)."""
    for _ in range(passes):
        a = _box(_box(a, radius, a.ndim - 1), radius, a.ndim - 2)
    return a


def soft_masks(n_images=4, size=512, seed=0):
    """(targets, logits): float32 soft masks in [0, 1] and float32 logits."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    hard = np.zeros((n_images, size, size), np.float32)
    wrong = np.zeros_like(hard)
    for i in range(n_images):
        for _ in range(rng.integers(3, 7)):
            cy, cx, r = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85), rng.uniform(0.05, 0.18)
            hard[i] = np.maximum(hard[i], (yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
        cy, cx = rng.uniform(0.2, 0.8, size=2)
        wrong[i] = (np.abs(yy - cy) < 0.08) & (np.abs(xx - cx) < 0.08)
    targets = np.clip(_blur(hard, max(1, size // 64)), 0.0, 1.0).astype(np.float32)
    noise = np.linspace(0.3, 2.0, n_images, dtype=np.float32)[:, None, None]
    prob = np.clip(np.where(wrong > 0, 1.0 - targets, targets), 1e-4, 1 - 1e-4)
    logits = np.log(prob / (1 - prob)) + noise * rng.standard_normal(hard.shape, np.float32)
    return targets, logits.astype(np.float32)
