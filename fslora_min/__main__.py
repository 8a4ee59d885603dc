"""`python -m fslora_min`: the command line (fslora_min/cli.py). A Ctrl-C while torch and the
rest are still being imported (the first seconds) ends with one line, not a traceback."""

import sys

try:
    from fslora_min.cli import main
except KeyboardInterrupt:
    print("interrupted while starting: nothing was run", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
