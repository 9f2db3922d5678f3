"""One thin script per DVC stage (``python -m stages.<name>``, what dvc.yaml runs) and ``cop``
(``cli.py``).

dvc.yaml calls whichever ``python`` is first on ``PATH``. When that is not the project's
environment, say so in one line instead of a ModuleNotFoundError deep in an import.
"""

import importlib.util
import sys

_missing = [m for m in ("typer", "pydantic", "yaml", "torch") if importlib.util.find_spec(m) is None]
if _missing:
    sys.exit(f"error: {sys.executable} lacks the project's packages ({', '.join(_missing)}) "
             "(hint: run `source .venv/bin/activate` in this shell first; `bash scripts/setup.sh` "
             "creates .venv)")
