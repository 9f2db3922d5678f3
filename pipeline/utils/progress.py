"""Progress bars with rates and ETA on long work; silent on non-zero ranks and when asked."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

from pipeline.utils.dist import get_dist

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", initial: int = 0) -> tqdm:
    disable = (not get_dist().is_main) or os.environ.get("COP_NO_PROGRESS") == "1"
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable,
                dynamic_ncols=True, file=sys.stderr, smoothing=0.1)
