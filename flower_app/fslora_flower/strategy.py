"""FSLoRA's server side as a Flower strategy: the in-process federation's own halves of a round.

`Strategy.start` (flwr) drives the rounds; per round this strategy
  configure_train: `Federation.plan_round` samples the participants and their sketches and
                   builds their downlinks; each becomes one message to that client's node;
  aggregate_train: the replies are decoded into ClientUpdates and handed, with the positions
                   of the participants that replied, to `Federation.close_round`, which screens
                   them (fslora_min/validation.py), aggregates the good ones with the method's
                   rule, accounts the bytes and evaluates.
No FSLoRA logic lives here: only the mapping between clients and Flower nodes and the codec.
A participant that sent no reply (its node died or timed out) or an error counts as dropped
out; a reply that cannot be decoded or fails screening is rejected with its reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fslora_flower.codec import decode_update, encode_downlink, message_bytes, payload_bytes
from fslora_min.client import ClientUpdate
from fslora_min.federation import Federation, RoundPlan


class FSLoRAStrategy(Strategy):
    """Runs `federation`'s rounds over Flower nodes; `nodes[i]` is client i's node id."""

    def __init__(self, federation: Federation, nodes: dict[int, int]) -> None:
        missing = sorted(set(range(federation.fed.num_clients)) - set(nodes))
        if missing:
            raise ValueError(f"no Flower node hosts clients {missing}")
        self.federation, self.nodes = federation, nodes
        self.plan: RoundPlan | None = None
        self.started = 0.0
        self.sent: dict[int, Message] = {}  # participant position -> its message
        self.round_wire: dict[int, dict] = {}  # participant position -> its bytes this round
        self.wire: list[dict] = []  # per round, per participant: message bytes vs accounting

    def summary(self) -> None:
        fed = self.federation
        print(f"FSLoRAStrategy: {fed.method.name}, {fed.fed.num_clients} clients, "
              f"r = {fed.server.rank}, client ranks {fed.client_ranks}", flush=True)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.started = time.perf_counter()
        self.plan = plan = self.federation.plan_round()
        rank = self.federation.server.rank
        self.sent = {p: grid.create_message(encode_downlink(plan.downlinks[p], i, rank),
                                            MessageType.TRAIN, self.nodes[i],
                                            str(server_round))
                     for p, i in enumerate(plan.participants) if not plan.fails[p]}
        self.round_wire = {p: {"client": plan.participants[p], "down_bytes": message_bytes(msg),
                               "down_payload_bytes": payload_bytes(msg),
                               "up_bytes": 0, "up_payload_bytes": 0}
                           for p, msg in self.sent.items()}
        return list(self.sent.values())

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        plan = self.plan
        position = {msg.metadata.message_id: p for p, msg in self.sent.items()}
        wire = self.round_wire
        got: dict[int, ClientUpdate] = {}  # participant position -> its decoded update
        unreadable: list[tuple[int, str]] = []
        for reply in replies:
            p = position.get(reply.metadata.reply_to_message_id)
            if p is None or reply.has_error():
                continue  # not ours, or the ClientApp failed: the participant dropped out
            wire[p]["up_bytes"] = message_bytes(reply)
            try:
                got[p] = decode_update(reply.content, plan.downlinks[p])
            except (KeyError, TypeError, ValueError) as err:
                unreadable.append((plan.participants[p], f"malformed reply: {err}"))
                continue
            wire[p]["up_payload_bytes"] = payload_bytes(reply)
        live = sorted(got)  # the in-process order, whatever order the replies came in
        record = self.federation.close_round(server_round, plan, live, [got[p] for p in live],
                                             self.started, unreadable)
        self.federation.record_round(record)
        self.wire.append({"round": server_round, "participants": list(wire.values()),
                          "accounted_down_bytes": record.bytes_down,
                          "accounted_up_bytes": record.bytes_up})
        metrics = {"heldout_loss": record.heldout_loss if record.heldout_loss is not None
                   else float("nan"), "rejected": len(record.rejected),
                   "dropped": len(record.dropped)}
        # no arrays back to Flower's loop: the global factors live in `federation`, and
        # serializing them every round would be work nobody reads
        return None, MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # the server evaluates the global model itself, in `close_round`

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        return None
