"""Stage ``list_source``: list the image source into ``data/source.json`` (cheap, always run).

DVC cannot see inside ``data.root`` or a tar pattern (they are param strings); this stage runs
on every ``dvc repro`` (``always_changed``), and ``prepare`` depends on its output, so a source
with files added, removed or changed reruns ``prepare``. See ``pipeline/data/listing.py``.
"""

from __future__ import annotations


from pipeline.config import Params
from pipeline.paths import outputs


def run(params: Params) -> None:
    from pipeline.data.listing import describe, source_listing, write_listing

    listing = source_listing(params.data)
    changed = write_listing(outputs("list_source").listing, listing)
    print(f"{describe(listing)}{'' if changed else ' (unchanged)'}", flush=True)


if __name__ == "__main__":
    from stages.cli import stage_entry

    stage_entry("list-source")
