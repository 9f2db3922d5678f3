"""Images in: sources, the ADM/MAR center crop, the embedded synthetic set, prepared shards.

- :mod:`~pipeline.data.crop`       ``center_crop_arr``, ``center_crop_mask``, ``to_model_input``
- :mod:`~pipeline.data.synthetic`  the generated default set (shape x texture classes, masks)
- :mod:`~pipeline.data.sources`    image folders (ImageNet layouts) and webdataset tars
- :mod:`~pipeline.data.decode`     untrusted bytes -> RGB, or a recorded reason to skip
- :mod:`~pipeline.data.imageset`   the shard format: writer and the ``ImageSet`` reader
- :mod:`~pipeline.data.units`      per-shard work (torch-free, for spawned workers)
- :mod:`~pipeline.data.build`      the ``prepare`` stage: plan, resume, ranks, metrics
"""

from pipeline.data.crop import center_crop_arr, to_model_input
from pipeline.data.imageset import FORMAT, ImageSet

__all__ = ["FORMAT", "ImageSet", "center_crop_arr", "to_model_input"]
