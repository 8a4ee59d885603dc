"""LEAF's Shakespeare task (Caldas et al. 2018, arXiv 1812.01097): each client is one speaking
role of one play, and learns to predict the next character of what that role says.

- The text is the 37 plays shipped in data/shakespeare/ (fslora_min/shakespeare_text.py).
- `parse_play` turns a play into (role, line) pairs: a role's name stands alone on a line after
  a blank line (upper case, "HAMLET." / "THESEUS", or, in the plays printed that way, title case
  with a full stop, "Ham."); what follows, up to the next name or act / scene heading, is that
  role's speech. Stage directions, in [brackets] (a few close with "}" or open with "{"), inline
  or over several lines, are removed, and so are lines with no letter.
- Domain shift: the base model is pretrained on every line of the plays NOT in
  `federated_plays` (by default the comedies, histories and Pericles), and the clients are roles
  of `federated_plays` (by default the First Folio's tragedies); the base never reads a line
  that a client holds.
- A client is a (play, role) of `federated_plays` that speaks at least `min_chars` characters;
  N of them are drawn uniformly (seeded). Its lines, joined by newlines, are split once: the last
  `heldout_fraction` of its characters, cut at a line boundary, is its held-out text, the rest
  its training text, so no window spans the split. Each part is cut into windows of
  `seq_len + 1` characters with a stride of `seq_len` (every character but the first is a
  target once): inputs w[:-1], next-character targets w[1:]. Client sizes differ, as in LEAF,
  and the data-size weights of FlexLoRA and FLoRA follow them.
- The global held-out set pools every client's held-out windows (LEAF's pooled test set).
- The vocabulary `VOCAB` (78 characters) is the newline that joins lines and every character
  the spoken lines use: space, 14 punctuation marks, 10 digits and 52 letters; case is kept (a
  role's capitals are its style). A test checks that it is exactly that set.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterator

import torch

from fslora_min.data import ClientData, FederatedData
from fslora_min.rng import PRETRAIN, ROLES, generator
from fslora_min.shakespeare_text import load_plays

VOCAB = ("\n !\"&'(),-./:;?_0123456789"
         "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
CHAR_ID = {c: i for i, c in enumerate(VOCAB)}
# The First Folio's "Tragedies" (Cymbeline and Troilus and Cressida included, as it prints them).
TRAGEDIES = ("antony_and_cleopatra", "coriolanus", "cymbeline", "hamlet", "julius_caesar", "lear",
             "macbeth", "othello", "romeo_and_juliet", "timon_of_athens",
             "tragedy_of_titus_andronicus", "troilus_and_cressida")

# [Exit.]  [Enter X,\n and Y.]  {Aside.]: innermost first, never across a blank line
DIRECTION = re.compile(r"[\[{](?:[^\[\]{}\n]|\n(?![ \t]*\n))*[\]}]")
PARAGRAPHS = re.compile(r"(\n[ \t]*\n)")
HEADING = re.compile(r"(ACT|Act|SCENE|Scene)(\s+([IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b"
                     r"|[.:]|$)|(THE )?(PROLOGUE|EPILOGUE|INDUCTION)\.?$"
                     r"|[IVX]+\.?$")  # the last: a song's stanza number
CAPS_NAME = re.compile(r"[A-Z][A-Z'&\- .]*")  # HAMLET.  FIRST CITIZEN.  THESEUS  MRS. PAGE.
TITLE_NAME = re.compile(r"([A-Z0-9][a-z]*\.? ){0,3}[A-Z][a-z]*\.")  # Ham.  1 Clown.  Lady Cap.


def encode(text: str) -> torch.Tensor:
    """(len(text),) character ids; a ValueError names a character outside VOCAB."""
    try:
        return torch.tensor([CHAR_ID[c] for c in text], dtype=torch.long)
    except KeyError as err:
        raise ValueError(f"character {err.args[0]!r} is not in the Shakespeare vocabulary") from None


def decode(ids: torch.Tensor) -> str:
    return "".join(VOCAB[i] for i in ids.tolist())


def strip_directions(text: str) -> str:
    """`text` without its stage directions, every newline kept (so blank lines stay blank).

    Well-formed directions go first, innermost first (one prints "[Enter two [BRITISH]
    CAPTAINS.]"). What is left is malformed: an opening bracket never closed runs to the end of
    its paragraph ("[Enter MENENIUS" then a blank line), and a closing bracket never opened ends
    a direction that began with its paragraph ("[Enter Reapers: they join]\\nwith the Nymphs
    ... vanish.]").
    """
    while True:
        text, n = DIRECTION.subn("", text)
        if not n:
            break
    out = []
    for para in PARAGRAPHS.split(text):
        if not any(c in para for c in "[]{}"):
            out.append(para)
            continue
        kept, depth = [], 0
        for c in para:
            if c in "[{":
                depth += 1
            elif c in "]}":
                if depth:
                    depth -= 1
                else:
                    kept = [k for k in kept if k == "\n"]
            elif c == "\n" or not depth:
                kept.append(c)
        out.append("".join(kept))
    return "".join(out)


def parse_play(text: str) -> list[tuple[str, str]]:
    """(ROLE, line) pairs in the order spoken; headings, stage directions and other text dropped.

    A play is printed with either upper-case or title-case names; the kind with more candidate
    lines wins, so a title-case speech line such as "Ay." is never taken for a name in the
    upper-case plays.
    """
    lines = [line.strip() for line in strip_directions(text).splitlines()]
    after_blank = [i == 0 or not lines[i - 1] for i in range(len(lines))]
    heading = [a and HEADING.match(s) is not None for s, a in zip(lines, after_blank)]
    caps = [a and not h and len(s) < 40 and CAPS_NAME.fullmatch(s) is not None
            for s, a, h in zip(lines, after_blank, heading)]
    title = [a and not h and TITLE_NAME.fullmatch(s) is not None
             for s, a, h in zip(lines, after_blank, heading)]
    is_name = caps if sum(caps) >= sum(title) else title
    pairs, role = [], None
    for line, name, head in zip(lines, is_name, heading):
        if name:
            role = line.rstrip(".-").upper()
        elif head:
            role = None  # a new act or scene: the location text after it is nobody's speech
        elif role is not None and any(c.isalpha() for c in line):
            pairs.append((role, line))
    return pairs


@functools.lru_cache(maxsize=1)
def parsed_plays() -> dict[str, list[tuple[str, str]]]:
    """{play: (role, line) pairs} of the shipped text (parsed once per process)."""
    return {name: parse_play(text) for name, text in load_plays().items()}


def role_lines(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """{role: its lines in order}, roles in order of first speech."""
    roles: dict[str, list[str]] = {}
    for role, line in pairs:
        roles.setdefault(role, []).append(line)
    return roles


def split_lines(lines: list[str], heldout_fraction: float) -> tuple[str, str]:
    """(training text, held-out text): the held-out text is the longest run of LAST lines with
    at most `heldout_fraction` of the characters; both join their lines with newlines."""
    budget, held, j = heldout_fraction * len("\n".join(lines)), 0, len(lines)
    while j > 0 and held + len(lines[j - 1]) + (j < len(lines)) <= budget:
        held += len(lines[j - 1]) + (j < len(lines))  # the line and its newline, if any
        j -= 1
    return "\n".join(lines[:j]), "\n".join(lines[j:])


def char_windows(text: str, seq_len: int) -> torch.Tensor:
    """(n, seq_len + 1) character windows of `text` at stride seq_len (the last partial dropped)."""
    ids = encode(text)
    if len(ids) < seq_len + 1:
        return torch.empty(0, seq_len + 1, dtype=torch.long)
    return ids.unfold(0, seq_len + 1, seq_len).clone()


@dataclass
class ShakespeareConfig:
    seq_len: int = 64  # characters per window fed to the model (<= its context)
    min_chars: int = 5000  # a (play, role) speaking fewer characters is no client
    heldout_fraction: float = 0.1  # the END of each client's text, cut at a line boundary
    federated_plays: tuple[str, ...] = TRAGEDIES  # clients' plays; the others pretrain the base
    seed: int = 0  # which eligible roles become the clients

    def __post_init__(self) -> None:
        for name in ("seq_len", "min_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ShakespeareConfig.{name} must be a positive integer, "
                                 f"got {value!r}")
        if not 0.0 < self.heldout_fraction < 1.0:  # also false for NaN
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction!r}")
        self.federated_plays = tuple(self.federated_plays)
        if not self.federated_plays:
            raise ValueError("federated_plays must name at least one play")

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)


def check_plays(cfg: ShakespeareConfig, plays: dict) -> None:
    unknown = sorted(set(cfg.federated_plays) - set(plays))
    if unknown:
        raise ValueError(f"federated_plays: {unknown} are not among the plays {sorted(plays)}")
    if len(set(cfg.federated_plays)) == len(plays):
        raise ValueError("federated_plays names every play: none is left to pretrain the base")


def eligible_roles(cfg: ShakespeareConfig) -> list[tuple[str, str, list[str]]]:
    """(play, role, lines) of every role of `federated_plays` with at least `min_chars`."""
    plays = parsed_plays()
    check_plays(cfg, plays)
    return [(play, role, lines) for play in sorted(set(cfg.federated_plays))
            for role, lines in role_lines(plays[play]).items()
            if len("\n".join(lines)) >= cfg.min_chars]


def make_shakespeare_data(cfg: ShakespeareConfig, n_clients: int) -> FederatedData:
    """N clients drawn uniformly from the eligible roles, each split at the end of its lines."""
    roles = eligible_roles(cfg)
    if not isinstance(n_clients, int) or not 1 <= n_clients <= len(roles):
        raise ValueError(f"--clients {n_clients!r}: the Shakespeare task has {len(roles)} roles "
                         f"of at least min_chars={cfg.min_chars} characters in its plays")
    pick = torch.randperm(len(roles), generator=generator(cfg.seed, ROLES))[:n_clients]
    clients = []
    for play, role, lines in (roles[i] for i in sorted(pick.tolist())):
        train, held = (char_windows(t, cfg.seq_len)
                       for t in split_lines(lines, cfg.heldout_fraction))
        if not len(train) or not len(held):
            raise ValueError(f"{play}/{role}: no {'training' if not len(train) else 'held-out'} "
                             f"window of {cfg.seq_len + 1} characters; raise min_chars "
                             f"({cfg.min_chars}) or heldout_fraction ({cfg.heldout_fraction})")
        clients.append(ClientData(train, held, name=f"{play}/{role}"))
    return FederatedData(clients, torch.cat([c.heldout for c in clients]))


def pretraining_text(cfg: ShakespeareConfig) -> str:
    """Every spoken line of the plays outside `federated_plays`, in order, one per line."""
    plays = parsed_plays()
    check_plays(cfg, plays)
    return "\n".join(line for play in sorted(set(plays) - set(cfg.federated_plays))
                     for _, line in plays[play])


def shakespeare_pretraining_batches(cfg: ShakespeareConfig, batch_size: int,
                                    seed: int) -> Iterator[torch.Tensor]:
    """An endless stream of (batch_size, seq_len + 1) windows at uniform random offsets."""
    ids = encode(pretraining_text(cfg))
    g = generator(seed, PRETRAIN)
    offsets = torch.arange(cfg.seq_len + 1)
    while True:
        starts = torch.randint(len(ids) - cfg.seq_len, (batch_size, 1), generator=g)
        yield ids[starts + offsets]
