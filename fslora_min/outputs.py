"""The run's output folder: refused before any training when it cannot take the run, made
and checked writable, emptied of what a failed command made, and the earlier run's files
retired only once --overwrite has something to replace them with."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fslora_min.checkpoint import CHECKPOINT_NAME

OUTPUTS = ("metrics.json", "curves.png")  # what `write_outputs` writes
RUN_FILES = ("metrics.json", CHECKPOINT_NAME)  # a folder holding one of them holds a run


def check_out_dir(out: str, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is made or trained, an output folder that cannot take this run:
    a finished or checkpointed run without --resume or --overwrite, or --resume without a
    checkpoint."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in the output folder and --overwrite "
                         "replaces it: give one of them")
    folder = Path(out)
    if resume and not (folder / CHECKPOINT_NAME).is_file():
        raise ValueError(f"--resume: no checkpoint to resume from in {out!r} "
                         f"(run with --checkpoint-every N first)")
    held = [name for name in RUN_FILES if (folder / name).exists()]
    if held and not (resume or overwrite):
        raise ValueError(f"{out!r} already holds a run ({', '.join(held)}): continue it with "
                         f"--resume, replace it with --overwrite, or choose another --out")


def remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:  # not empty: it and its parents hold something
            return


@contextmanager
def output_folder(out: str, resume: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """The checked (`check_out_dir`), created and writable output folder; the folders it made
    are removed again if the run fails or is interrupted before writing anything there."""
    check_out_dir(out, resume, overwrite)
    folder = Path(out)
    made = [f for f in (folder, *folder.parents) if not f.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        remove_empty(made)
        raise ValueError(f"argument --out: {out!r} is not writable: {err.strerror}") from None
    before = set(folder.rglob("*"))
    try:
        yield folder
    except BaseException:  # what the command made and left empty goes (compare's OUT/TASK/)
        new = sorted((p for p in folder.rglob("*") if p.is_dir() and p not in before),
                     key=lambda p: len(p.parts), reverse=True)
        remove_empty(new + made)
        raise


def retire(out: Path, names: tuple[str, ...]) -> None:
    """Remove the files `names` of the earlier run that --overwrite replaces in `out`."""
    for name in names:
        (out / name).unlink(missing_ok=True)
