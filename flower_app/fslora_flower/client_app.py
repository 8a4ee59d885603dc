"""FSLoRA's client side as a Flower ClientApp: `train_client` on the compact factors it is sent.

Each SuperNode hosts one client, named by its node config: `client-id=i`. Per round it
decodes its downlink (compact factors and index sets), runs the in-process client's
`train_client` for H local steps on its own data shard, and replies with the deltas and the
index sets (fslora_flower/codec.py). Its minibatch stream lives in the node's context state
between rounds, so its draws are those of client i in the in-process federation.

Fault drills (node config `fault`): "die@T" ends the ClientApp process in round T before it
replies (a device lost mid-round); "nan@T" replies in round T with NaN deltas (an update that
fails validation); "junk@T" replies with a record that is not an update at all. The server
must carry on with the other replies in every case.
"""

from __future__ import annotations

import os

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fslora_flower.codec import decode_downlink, encode_update
from fslora_flower.config import federation_of
from fslora_min.client import train_client
from fslora_min.data import Minibatches
from fslora_min.federation import mask_stream

app = ClientApp()
STREAM = "minibatches"


def client_id_of(context: Context) -> int:
    value = context.node_config.get("client-id")
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"this SuperNode needs --node-config 'client-id=<i>' with i >= 0, "
                         f"got {value!r}")
    return value


def save_stream(stream: Minibatches, state: RecordDict) -> None:
    s = stream.state_dict()
    arrays = {"generator": s["generator"]} | ({} if s["order"] is None else {"order": s["order"]})
    state[STREAM] = ArrayRecord(torch_state_dict=arrays)
    state[STREAM + "/position"] = ConfigRecord({"position": s["position"]})


def load_stream(stream: Minibatches, state: RecordDict) -> None:
    if STREAM not in state:  # the first round: the stream as seeded
        return
    arrays = state[STREAM].to_torch_state_dict()
    stream.load_state_dict({"generator": arrays["generator"], "order": arrays.get("order"),
                            "position": int(state[STREAM + "/position"]["position"])})


def fault_now(context: Context, kind: str, server_round: int) -> bool:
    return context.node_config.get("fault") == f"{kind}@{server_round}"


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which client this node hosts."""
    return Message(RecordDict({"client": ConfigRecord({"client_id": client_id_of(context)})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    mine = client_id_of(context)
    client_id, downlink = decode_downlink(msg.content)
    if client_id != mine:
        raise ValueError(f"a downlink for client {client_id} reached the node of client {mine}")
    server_round = int(msg.metadata.group_id)
    if fault_now(context, "die", server_round):
        os._exit(1)  # the device is gone: no reply, no clean-up
    if fault_now(context, "junk", server_round):
        return Message(RecordDict({"junk": ConfigRecord({"junk": 1})}), reply_to=msg)
    _, federation, _ = federation_of(context.run_config)
    stream = federation.batch_streams[mine]
    load_stream(stream, context.state)
    model = federation.server.model
    update = train_client(model, mine, downlink, stream, federation.client_cfg,
                          len(federation.data.clients[mine].train),
                          mask_stream(federation.fed.seed, server_round, mine,
                                      next(model.parameters()).device),
                          federation.data.scored_from)
    save_stream(stream, context.state)
    if fault_now(context, "nan", server_round):
        update.deltas = {n: (torch.full_like(db, float("nan")), da)
                         for n, (db, da) in update.deltas.items()}
    return Message(encode_update(update), reply_to=msg)
