"""`python -m fslora_min`: `compare ...` is the study (fslora_min/study/cli.py), anything else
the demo or `run` (fslora_min/cli.py). The entry point is the one place the method's package
hands over to the study beside it; no module of the method imports the study."""

import sys

if sys.argv[1:2] == ["compare"]:
    from fslora_min.study.cli import main

    sys.exit(main(sys.argv[2:]))

from fslora_min.cli import main

sys.exit(main())
