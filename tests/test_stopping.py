"""Stopping a run: an interrupted --overwrite keeps the run it was to replace whole, SIGTERM is
handled as Ctrl-C is, and a Ctrl-C while the command is still starting prints no traceback."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fslora_min.checkpoint import CHECKPOINT_NAME
from fslora_min.cli import main
from fslora_min.federation import Federation

ROOT = Path(__file__).resolve().parents[1]
TINY = ["run", "--preset", "tiny", "--clients", "2", "--rank", "4", "--local-steps", "2",
        "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One pretraining cache for the module, for in-process runs and subprocesses alike."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("FSLORA_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def used(cache, tmp_path_factory) -> Path:
    """A finished, checkpointed run: the one an --overwrite is to replace."""
    out = tmp_path_factory.mktemp("used") / "run"
    assert main([*TINY, "--rounds", "2", "--checkpoint-every", "1", "--out", str(out)]) == 0
    return out


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def ctrl_c_at(round_: int):
    play = Federation.run_round

    def run_round(self, t):
        if t == round_:
            raise KeyboardInterrupt
        return play(self, t)
    return run_round


def test_an_overwrite_interrupted_before_its_first_checkpoint_leaves_the_old_run_whole(
        used, tmp_path, capsys, monkeypatch):
    """The issue's repro: `cp -r used ow`, then an --overwrite stopped before it checkpoints."""
    ow = tmp_path / "ow"
    shutil.copytree(used, ow)
    before = contents(ow)
    monkeypatch.setattr(Federation, "run_round", ctrl_c_at(3))
    assert main([*TINY, "--rounds", "500", "--checkpoint-every", "400", "--overwrite",
                 "--out", str(ow)]) == 130
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"nothing to resume; the run that was in {str(ow)!r} is left as it was")
    assert contents(ow) == before


def test_an_overwrite_interrupted_after_its_first_checkpoint_resumes_the_new_run(
        used, tmp_path, capsys, monkeypatch):
    ow = tmp_path / "ow"
    shutil.copytree(used, ow)
    with monkeypatch.context() as mp:
        mp.setattr(Federation, "run_round", ctrl_c_at(3))
        assert main([*TINY, "--rounds", "4", "--checkpoint-every", "2", "--overwrite",
                     "--out", str(ow)]) == 130
    assert sorted(p.name for p in ow.iterdir()) == [CHECKPOINT_NAME]  # the old outputs retired
    assert "--resume" in capsys.readouterr().err
    assert main([*TINY, "--rounds", "4", "--checkpoint-every", "2", "--resume",
                 "--out", str(ow)]) == 0
    assert json.loads((ow / "metrics.json").read_text())["config"]["federation"]["rounds"] == 4


def default_sigint() -> None:
    """A shell without job control starts background jobs with SIGINT ignored, and their
    children inherit that (Python then never raises KeyboardInterrupt): give the command
    SIGINT's default, as a terminal's foreground job has."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args: list[str], cache: Path) -> subprocess.Popen:
    env = os.environ | {"FSLORA_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "fslora_min", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("checkpointed", [True, False])
def test_sigterm_is_handled_as_ctrl_c(checkpointed, used, cache, tmp_path):
    """Like `timeout 14 python -m fslora_min run --preset tiny --rounds 100000 --out t`: exit
    128 + 15, one line, the checkpoint kept to resume from, or no folder left behind."""
    out = tmp_path / "t"
    every = ["--checkpoint-every", "1"] if checkpointed else []
    process = start([*TINY, "--rounds", "100000", *every, "--out", str(out)], cache)
    wait_for(out / CHECKPOINT_NAME if checkpointed else out, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    if checkpointed:
        assert "is checkpointed in" in err and err.strip().endswith("--resume")
    else:
        assert "nothing to resume" in err and not out.exists()


def test_ctrl_c_while_starting_prints_no_traceback(cache, tmp_path):
    process = start([*TINY, "--out", str(tmp_path / "run")], cache)
    time.sleep(0.5)  # torch is still being imported
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert process.returncode in (130, -signal.SIGINT), err  # -SIGINT: before Python's handler


def test_sigterm_inside_an_exec_of_a_string_still_exits_with_143(tmp_path):
    """The rare exit -2 of the test above: SIGTERM's exception leaving an exec of a string (as
    a dataclass being made does) made `python -m` end by SIGINT despite sys.exit(143)."""
    package = tmp_path / "stopper"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(
        "import os, signal, sys, threading\n"
        "from fslora_min.stopping import exit_status, sigterm_as_ctrl_c\n"
        "with sigterm_as_ctrl_c() as received:\n"
        "    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()\n"
        "    try:\n"
        "        exec('import time\\nwhile True: time.sleep(0.01)')\n"
        "    except KeyboardInterrupt:\n"
        "        pass\n"
        "sys.exit(exit_status(received))\n")
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    done = subprocess.run([sys.executable, "-m", "stopper"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, preexec_fn=default_sigint)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
