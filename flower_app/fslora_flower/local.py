"""A whole Flower deployment on this machine: one SuperLink and N SuperNodes on 127.0.0.1.

    python -m fslora_flower.local --fslora-args "--preset tiny --clients 2 --rounds 2"

starts `flower-superlink` and one `flower-supernode` per client (`--clients`) as subprocesses,
each with its own port and `client-id`, submits this app with `flwr run`, prints its log when
it ends, and stops every process it started, also on failure or Ctrl-C. Across machines the
same three commands run on their own hosts (flower_app/README.md). tests/test_flower.py uses `LocalDeployment`.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fslora_min.pretrain import default_cache_dir

APP_DIR = Path(__file__).resolve().parents[1]  # flower_app/, the folder `flwr run` bundles
REPO = APP_DIR.parent  # fslora_min must be importable by the apps


def flower_command(name: str) -> str:
    """A Flower console script, preferably the one installed beside this Python."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before "
                               f"listening on port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


class LocalDeployment:
    """Context manager: a SuperLink and `faults`-many SuperNodes; `run(...)` submits the app.

    `faults[i]` is client i's fault drill ("" for none; see fslora_flower/client_app.py).
    Logs go to `work/*.log`; every process is stopped on exit, whatever happened.
    """

    def __init__(self, work: Path, faults: list[str]) -> None:
        self.work, self.faults = Path(work), faults
        self.processes: list[subprocess.Popen] = []
        path = os.pathsep.join(p for p in (str(REPO), str(APP_DIR), os.environ.get("PYTHONPATH"))
                               if p)
        self.env = os.environ | {"FLWR_HOME": str(self.work / "flwr_home"), "PYTHONPATH": path,
                                 # one base-model cache for all: the caller's (pretrain.py)
                                 "FSLORA_CACHE": str(default_cache_dir().resolve()),
                                 # Flower posts usage events to its server unless told not to:
                                 # a local deployment talks to 127.0.0.1 only
                                 "FLWR_TELEMETRY_ENABLED": os.environ.get(
                                     "FLWR_TELEMETRY_ENABLED", "0")}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with open(self.work / f"{name}.log", "w") as log:  # the child keeps its own copy
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                 cwd=self.work, start_new_session=True)
        self.processes.append(p)
        return p

    def __enter__(self) -> LocalDeployment:
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            self.link_port = free_port()
            link = self.start("superlink", [
                flower_command("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                "--port", str(self.link_port), "--disable-runtime-dependency-installation"])
            wait_for_port(self.link_port, link, 60)
            for i, fault in enumerate(self.faults):
                config = f"client-id={i}" + (f' fault="{fault}"' if fault else "")
                self.start(f"supernode{i}", [
                    flower_command("flower-supernode"), "--insecure", "--superlink",
                    f"127.0.0.1:{self.link_port}", "--port", str(free_port()),
                    "--node-config", config])
            home = Path(self.env["FLWR_HOME"])
            home.mkdir(parents=True, exist_ok=True)
            (home / "config.toml").write_text(
                '[superlink]\ndefault = "local-deployment"\n\n[superlink.local-deployment]\n'
                f'address = "127.0.0.1:{self.link_port}"\ninsecure = true\n')
        except BaseException:
            self.stop()
            raise
        return self

    def run(self, run_config: dict[str, str | int | float], timeout: float) -> str:
        """`flwr run` this app with `run_config` overrides; waits until it ends; its output."""
        pairs = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        cmd = [flower_command("flwr"), "run", str(APP_DIR), "local-deployment", "--stream",
               "--run-config", pairs]
        done = subprocess.run(cmd, env=self.env, cwd=self.work, capture_output=True,
                              text=True, timeout=timeout)
        out = done.stdout + done.stderr
        if done.returncode:
            raise RuntimeError(f"flwr run exited with {done.returncode}:\n{out[-4000:]}")
        return out

    def stop(self) -> None:
        for p in reversed(self.processes):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)  # the app processes they spawned too
        for p in self.processes:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _toml(value: str | int | float) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"' if isinstance(value, str) \
        else repr(value)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fslora_flower.local", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fslora-args", default="--preset tiny --clients 2 --rounds 2",
                   help="flags of `python -m fslora_min run` (--clients sets the node count)")
    p.add_argument("--work", default="runs/flower-local", help="logs and results folder")
    p.add_argument("--timeout", type=float, default=1800, help="seconds the run may take")
    args = p.parse_args(argv)
    try:
        from fslora_flower.config import federation_of  # names a bad argument before starting
    except ModuleNotFoundError as err:  # the optional extra is missing: say how to add it
        if (err.name or "").split(".")[0] != "flwr":
            raise
        p.error("flwr is not installed: Flower is an optional extra; from the repository "
                "root: pip install -r requirements-flower.txt")
    # builds the federation once here, so the base is pretrained (cached) before the nodes start
    try:
        n = federation_of({"fslora-args": args.fslora_args})[0].federation.num_clients
    except ValueError as err:
        p.error(str(err))
    work = Path(args.work).resolve()
    with LocalDeployment(work, [""] * n) as deployment:
        print(deployment.run({"fslora-args": args.fslora_args, "out-dir": str(work)},
                             args.timeout))
    print(f"wrote {work / 'flower_result.pt'}; logs in {work}")


if __name__ == "__main__":
    main()
