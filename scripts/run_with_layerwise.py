"""The edgequant CLI with edgequant/layerwise.py as it is at a git revision, the rest as checked out: times a change
to the layer passes against its parent in one working tree (scripts/time_cpu_build.sh).

    python scripts/run_with_layerwise.py REV build MODEL ...     (REV "-": the working tree's layerwise.py)
"""

import subprocess
import sys
import types
from pathlib import Path

import edgequant

rev, args = sys.argv[1], sys.argv[2:]
if rev != "-":
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "-C", str(root), "show", f"{rev}:edgequant/layerwise.py"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("edgequant.layerwise")
    module.__package__ = "edgequant"
    sys.modules[module.__name__] = edgequant.layerwise = module
    exec(compile(source, f"{rev}:edgequant/layerwise.py", "exec"), module.__dict__)

from edgequant.cli import main  # noqa: E402  (after the module swap)

sys.exit(main(args))
