"""``data.augment`` on the training device, a whole batch at a time (``data.augment_on: device``).

With augmentation in the DataLoader workers every worker resamples every volume on the CPU
(trilinear grid_sample at S³), which at 64³–128³ costs more than reading it. On the device the
workers only read and decode: each training item carries its key ``augment_key`` = (epoch, item
index), and `BatchAugmentation` redraws the item's parameters from exactly the generator the
worker would have used (`datasets.item_generator(seed, epoch, index)`), then applies them to the
batch where it is (`Transform.apply_batch`). Same draws, same results as in the workers (up to
float rounding of the batched resampling); both scans of a pair get the same draw, as
`PairDataset` gives them in the workers. Batches without keys (validation, the k-means
encoding, un-augmented datasets) pass through untouched.
"""
from __future__ import annotations

from typing import Any

from hpcbrain.data.transforms import Transform

AUGMENT_KEY = "augment_key"
#: the volumes of a batch an item's draw applies to (a pair's two scans share it)
VOLUME_KEYS = ("x", "x_u", "x_v")


class BatchAugmentation:
    """Applies a training set's augmentation on the device (see the module doc)."""

    def __init__(self, transform: Transform, seed: int):
        self.transform = transform
        self.seed = int(seed)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        keys = batch.get(AUGMENT_KEY)
        if keys is None:
            return batch
        from hpcbrain.data.datasets import item_generator

        volumes = [k for k in VOLUME_KEYS if k in batch]
        if not volumes:
            raise ValueError(f"a batch with {AUGMENT_KEY} but none of {VOLUME_KEYS} to augment")
        shape = batch[volumes[0]].shape[1:]
        draws = [self.transform.sample(shape, item_generator(self.seed, int(epoch), int(index)))
                 for epoch, index in keys.tolist()]
        out = {k: v for k, v in batch.items() if k != AUGMENT_KEY}
        for key in volumes:
            out[key] = self.transform.apply_batch(batch[key], draws)
        return out

    def __repr__(self) -> str:
        return f"BatchAugmentation({self.transform!r}, seed={self.seed})"
