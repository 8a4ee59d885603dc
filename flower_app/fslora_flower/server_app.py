"""FSLoRA's server side as a Flower ServerApp: find the clients' nodes, run the strategy, save.

Run config: `fslora-args` (see fslora_flower/config.py), `timeout` (seconds a round waits for
replies), `out-dir` (where `flower_result.pt` goes: the global factors and per-round records,
loaded with `torch.load(..., weights_only=True)`) and `wait-for-nodes` (seconds to wait until
every client's SuperNode has connected).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fslora_flower.config import federation_of
from fslora_flower.strategy import FSLoRAStrategy
from fslora_min.federation import Federation
from fslora_min.lora import global_factors

app = ServerApp()
RESULT_NAME = "flower_result.pt"


def discover_clients(grid: Grid, num_clients: int, wait_s: float) -> dict[int, int]:
    """client id -> node id, asking every connected node which client it hosts."""
    deadline = time.monotonic() + wait_s
    while True:
        asked = [grid.create_message(RecordDict({"ask": ConfigRecord({})}), MessageType.QUERY,
                                     node, "discover") for node in grid.get_node_ids()]
        nodes: dict[int, int] = {}
        for reply in grid.send_and_receive(asked, timeout=30):
            if not reply.has_error():
                i = int(reply.content["client"]["client_id"])
                if i in nodes:
                    raise ValueError(f"two SuperNodes both host client {i}")
                nodes[i] = reply.metadata.src_node_id
        if len(nodes) >= num_clients or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def factor_tensors(federation: Federation) -> dict[str, torch.Tensor]:
    """The server's global LoRA factors, named "<module>/B" and "<module>/A"."""
    return {f"{name}/{which}": t.detach().cpu()
            for name, (B, A) in global_factors(federation.server.model).items()
            for which, t in (("B", B), ("A", A))}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, federation, info = federation_of(context.run_config)
    fed = cfg.federation
    nodes = discover_clients(grid, fed.num_clients,
                             float(context.run_config.get("wait-for-nodes", 60)))
    strategy = FSLoRAStrategy(federation, nodes)
    strategy.start(grid, ArrayRecord(), num_rounds=fed.rounds,
                   timeout=float(context.run_config.get("timeout", 600)))
    out = Path(str(context.run_config.get("out-dir", cfg.out_dir)))
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"factors": factor_tensors(federation),
                "records": [asdict(r) for r in federation.history.rounds],
                "wire": strategy.wire, "info": info}, out / RESULT_NAME)
