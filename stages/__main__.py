"""``python -m stages`` is ``cop``."""

from stages.cli import main

main(prog_name="cop")
