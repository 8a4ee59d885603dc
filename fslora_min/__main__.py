"""`python -m fslora_min`: `compare ...` is the study (fslora_min/study/cli.py), anything else
the demo or `run` (fslora_min/cli.py). The entry point is the one place the method's package
hands over to the study beside it; no module of the method imports the study.

A Ctrl-C while torch and the rest are still being imported (the first seconds) ends the process
at once with one line: a KeyboardInterrupt raised inside a library's import can be caught
there and leave that library half-imported, to fail later with a traceback."""

import os
import signal
import sys


def stop_while_starting(signum: int, frame: object) -> None:
    print("interrupted while starting: nothing was run", file=sys.stderr)
    os._exit(128 + signum)  # nothing has been written yet


starting = signal.getsignal(signal.SIGINT)
if starting is signal.default_int_handler:  # not when the shell started us ignoring Ctrl-C
    signal.signal(signal.SIGINT, stop_while_starting)
if sys.argv[1:2] == ["compare"]:
    from fslora_min.study.cli import main

    argv = sys.argv[2:]
else:
    from fslora_min.cli import main

    argv = sys.argv[1:]
signal.signal(signal.SIGINT, starting)

sys.exit(main(argv))
