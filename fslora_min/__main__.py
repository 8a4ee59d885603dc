"""`python -m fslora_min`: `compare ...` is the study (fslora_min/study/cli.py), anything else
the demo or `run` (fslora_min/cli.py). The entry point is the one place the method's package
hands over to the study beside it; no module of the method imports the study. A Ctrl-C while
torch and the rest are still being imported (the first seconds) ends with one line, not a
traceback."""

import sys

try:
    if sys.argv[1:2] == ["compare"]:
        from fslora_min.study.cli import main

        argv = sys.argv[2:]
    else:
        from fslora_min.cli import main

        argv = sys.argv[1:]
except KeyboardInterrupt:
    print("interrupted while starting: nothing was run", file=sys.stderr)
    sys.exit(130)

sys.exit(main(argv))
