import sys

from fslora_min.cli import main

sys.exit(main())
