"""Entry point: compose configs/ with key=value overrides and dispatch on ``stage`` (``python train.py --help``).

python train.py stage=stats model.name=smollm2-135m stats.layers=[6] stats.tokens=200000
python train.py stage=trace prompt="{} is located in the city of" subject="The Eiffel Tower"

The stages and the composition are in ``rome/cli.py``, which the installed ``rome`` command runs as well
(``rome stats ...``): an installed wheel carries only the ``rome`` package, so the code lives there.
"""

import sys

from rome.cli import run

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
