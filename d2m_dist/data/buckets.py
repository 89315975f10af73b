"""Resolution buckets: nearest-aspect assignment, resize + centre crop, per-bucket batching.

A bucket is an output size ``(h, w)``. An image goes to the bucket whose aspect
ratio is nearest in log space (so 2:1 and 1:2 are equally far from 1:1), is
scaled to cover the bucket and centre-cropped to it. Batching happens per bucket
inside the stream, so every batch stacks into one tensor.
"""

from __future__ import annotations

import math
from typing import (
    Callable,
    Dict,
    Hashable,
    Iterable,
    Iterator,
    List,
    Sequence,
    Tuple,
    TypeVar,
)

from PIL import Image, ImageOps

from d2m_dist.data.errors import DataError

T = TypeVar("T")
Bucket = Tuple[int, int]


def check_buckets(buckets: Sequence[Sequence[int]]) -> List[Bucket]:
    """Validate a config bucket list ``[[h, w], ...]`` into tuples."""
    out = []
    for b in buckets:
        if len(b) != 2 or int(b[0]) <= 0 or int(b[1]) <= 0:
            raise DataError(f"bucket {list(b)} is not a positive [height, width] pair")
        out.append((int(b[0]), int(b[1])))
    if not out:
        raise DataError("the bucket list is empty")
    return out


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> int:
    """Index of the bucket with the nearest aspect ratio (first one on ties)."""
    target = math.log(height / width)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - target))


def fit_to_bucket(image, bucket: Bucket):
    """Scale a PIL image to cover ``bucket`` (h, w) and centre-crop it to exactly that size."""
    h, w = bucket
    # ImageOps.fit crops to the aspect ratio first, then resizes: less work than
    # resizing the full image, and the same result.
    return ImageOps.fit(image, (w, h), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))


def bucket_batches(
    items: Iterable[T], batch_size: int, group: Callable[[T], Hashable], drop_last: bool
) -> Iterator[List[T]]:
    """Batches of ``batch_size`` items sharing ``group(item)``, in the order they fill.

    At the end of a finite stream the partial batches are flushed in the order
    they were started (deterministic), unless ``drop_last``.
    """
    pending: Dict[Hashable, List[T]] = {}
    for item in items:
        g = group(item)
        batch = pending.setdefault(g, [])
        batch.append(item)
        if len(batch) == batch_size:
            del pending[g]
            yield batch
    if not drop_last:
        yield from (b for b in pending.values() if b)
