"""The methods published since FSLoRA, as strategy objects of the same loop (fslora_min/methods.py
says what a `Method` is asked each round): Fed-PLoRA, FLASC, FFA-LoRA, RoLoRA, FedEx-LoRA.
raFLoRA, FlexLoRA's SVD with rank-partitioned aggregation, is beside them in
fslora_min/raflora.py.

Each docstring names the paper and the choices we made where it leaves one open. They answer
questions the FSLoRA paper did not ask (the study's `recent` table, fslora_min/study/).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fslora_min.client import ClientUpdate, Downlink
from fslora_min.methods import FedAvgLoRA, Method, client_products, payload_numbers
from fslora_min.server import Server
from fslora_min.sketch import Sketch, sample_index_set


class FedPLoRA(Method):
    """Fed-PLoRA (Zhang, Hu, Xu; ICLR 2026; arXiv 2602.16936): Select-N-Fold.

    The global LoRA is read as R parallel rank-1 modules, s B A = s sum_j B[:, j] A[j, :].
    Client i trains N_i = k_i of them and FOLDS the other R - k_i into its frozen weights,
    W0_i = W0 + s sum_{j not in I} B[:, j] A[j, :] (`fold_weights`), so it starts at exactly
    the global model; its trained modules keep the global scale s (diagonal value 1). FSLoRA
    instead rescales the k_i trained ones by R / k_i and leaves the rest out of the forward.
    Choices (what we could read of the paper, its abstract and summaries, leaves them open):
      - I is a uniform k_i-subset per (client, round, module), drawn from the same stream and
        in the same order as FSLoRA's, so on one seed both methods train the same indices;
      - the client downloads the whole global LoRA, R (m + n) numbers per module (the fold
        needs every module), and uploads the deltas of the k_i trained ones;
      - the server pads and averages them with its per-rank normalizer (`--aggregation`:
        "coverage" or "data" average each rank-1 module over the clients that trained it);
      - in simulation the fold is a frozen low-rank term beside W0 (CompactFactors.fold):
        the numbers of a folded W0 up to float rounding, without a W0 copy per client.
    With every N_i = R nothing is folded and it is FedAvg-LoRA at rank R, step for step.
    """

    name = "fed-plora"

    def sketches(self, server: Server, client_rank: int,
                 generator: torch.Generator) -> dict[str, Sketch]:
        return {name: Sketch(sample_index_set(server.rank, client_rank, generator),
                             server.rank, weight=1.0)
                for name in server.module_names}

    def downlink(self, server: Server, sketches: dict[str, Sketch]) -> Downlink:
        out = server.downlink(sketches)
        for name, f in out.items():
            rest = complement(f.sketch.indices, server.rank)
            if rest.numel():  # N_i < R: the untrained rank-1 modules go into the frozen base
                f.fold = server.downlink({name: Sketch(rest, server.rank, weight=1.0)})[name]
        return out


def complement(index: torch.Tensor, r: int) -> torch.Tensor:
    """{0..r-1} minus I, sorted: the ranks a Fed-PLoRA client folds."""
    keep = torch.ones(r, dtype=torch.bool)
    keep[index.cpu()] = False
    return torch.arange(r)[keep]


def fold_weights(weight: torch.Tensor, scale: float, B: torch.Tensor, A: torch.Tensor,
                 index: torch.Tensor) -> torch.Tensor:
    """W0_i = W0 + s sum_{j not in I} B[:, j] A[j, :] (Fed-PLoRA's fold, formed densely: for
    tests and figures; training adds it factored, CompactFactors.fold)."""
    rest = complement(index, B.shape[1]).to(B.device)
    return weight + scale * B[:, rest] @ A[rest]  # (m, n)


@dataclass(frozen=True)
class SparseSketch(Sketch):
    """All R ranks at diagonal value 1, with messages of only `entries` values per module."""

    entries: int = 0


def top_k_entries(b: torch.Tensor, a: torch.Tensor,
                  entries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `entries` largest |x| of [vec(b); vec(a)], zero the rest (FLASC's top-k)."""
    flat = torch.cat([b.flatten(), a.flatten()])  # (R (m + n),)
    if entries >= flat.numel():
        return b, a
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(entries).indices] = True
    flat = torch.where(keep, flat, torch.zeros_like(flat))
    return flat[:b.numel()].view_as(b), flat[b.numel():].view_as(a)


class FLASC(Method):
    """FLASC (Kuo, Raje, Rajesh, Smith; arXiv 2406.05233): dense local LoRA, sparse messages.

    Every client trains the whole rank-R LoRA (its memory is R's, whatever its budget); what
    it is sent and what it sends are the top entries by magnitude: the download is the top-d
    of the global [B; A], the client starts from that sparse copy, and it uploads the top-d of
    its deltas; the server averages the sparse deltas into its dense factors.
    Choices: top-k is taken jointly over a module's b and a; each sent entry costs its value
    and its position, `1 + position_numbers` numbers (position_numbers = 1: an int32 position
    beside a float32 value), so at client i's budget k_i the message carries
    d_i = k_i (m + n) // (1 + position_numbers) entries per module and costs FSLoRA's k_i
    (m + n) numbers each way, byte for byte by the same accounting (one number less when
    k_i (m + n) is odd). `client_ranks` are the budgets k_i: they set the bytes, not the rank.
    With position_numbers = 0 and every k_i = R nothing is dropped: FedAvg-LoRA at rank R.
    """

    name = "flasc"

    def __init__(self, position_numbers: int = 1) -> None:
        self.position_numbers = position_numbers

    def entries(self, client_rank: int, rank: int, m: int, n: int) -> int:
        """d_i = min(k_i (m + n) // (1 + position numbers), R (m + n)): entries per message."""
        return min(client_rank * (m + n) // (1 + self.position_numbers), rank * (m + n))

    def trainable_numbers(self, client_rank: int, rank: int, m: int, n: int) -> int:
        return rank * (m + n)

    def sketches(self, server: Server, client_rank: int,
                 generator: torch.Generator) -> dict[str, Sketch]:
        return {name: SparseSketch(torch.arange(server.rank), server.rank, 1.0,
                                  self.entries(client_rank, server.rank, *server.shapes[name]))
                for name in server.module_names}

    def downlink(self, server: Server, sketches: dict[str, Sketch]) -> Downlink:
        out = server.downlink(sketches)
        for f in out.values():
            f.b, f.a = top_k_entries(f.b, f.a, f.sketch.entries)
        return out

    def numbers_down(self, downlink: Downlink) -> int:
        return sum((1 + self.position_numbers) * f.sketch.entries for f in downlink.values())

    def client_upload(self, update: ClientUpdate, downlink: Downlink) -> ClientUpdate:
        deltas = {name: top_k_entries(db, da, downlink[name].sketch.entries)
                  for name, (db, da) in update.deltas.items()}
        return ClientUpdate(update.client_id, update.sketches, deltas, update.num_examples,
                            update.trainable_parameters)

    def numbers_up(self, update: ClientUpdate, downlink: Downlink) -> int:
        return self.numbers_down(downlink)


class FFALoRA(FedAvgLoRA):
    """FFA-LoRA (Sun, Li, Wang, Ding; ICLR 2024): A stays at its random init; only B trains.

    With A shared, sum_i p_i B_i A = (sum_i p_i B_i) A: averaging is exact. Choices: every
    client at rank R = min_i k_i (feasible, as fedavg-min); the download is B only (A is
    regenerated from the shared init seed), the upload dB only, the memory R m per module.
    """

    def __init__(self) -> None:
        super().__init__(full=False)
        self.name = "ffa-lora"

    def downlink(self, server: Server, sketches: dict[str, Sketch]) -> Downlink:
        out = server.downlink(sketches)
        for f in out.values():
            f.train_a = False
        return out

    def numbers_down(self, downlink: Downlink) -> int:
        return sum(f.b.numel() for f in downlink.values())

    def trainable_numbers(self, client_rank: int, rank: int, m: int, n: int) -> int:
        return client_rank * m


class RoLoRA(FedAvgLoRA):
    """RoLoRA (Chen, Ju, Dalal, Zhu, Williams; arXiv 2409.02346): alternate the factors.

    Clients train B with A frozen until B has been aggregated once, then A with B frozen, and
    so on; with one factor shared by all, the average of the products is the product of the
    averages. Choices: B first (at init B = 0, so A's gradient s B^T G is zero and an A round
    would be wasted); the phase moves on at each aggregation (a round in which nobody reports
    retries the same factor); every client at rank R = min_i k_i; the download is both
    factors, the upload the trained one; memory R max(m, n) per module.
    """

    def __init__(self) -> None:
        super().__init__(full=False)
        self.name = "rolora"
        self.train_b = True  # the factor this round's clients train

    def downlink(self, server: Server, sketches: dict[str, Sketch]) -> Downlink:
        out = server.downlink(sketches)
        for f in out.values():
            f.train_b, f.train_a = self.train_b, not self.train_b
        return out

    def aggregate(self, server: Server, updates: list[ClientUpdate],
                  downlinks: list[Downlink]) -> None:
        server.apply_updates(updates)
        self.train_b = not self.train_b

    def trainable_numbers(self, client_rank: int, rank: int, m: int, n: int) -> int:
        return client_rank * max(m, n)

    def state_dict(self) -> dict:
        return {"train_b": self.train_b}

    def load_state_dict(self, state: dict) -> None:
        self.train_b = state["train_b"]


def aggregation_weights(server: Server, updates: list[ClientUpdate]) -> list[float]:
    """p_i of a full-rank average under the server's normalizer: n_i / sum n ("data"), else 1/M."""
    if server.cfg.aggregation == "data":
        total = sum(u.num_examples for u in updates)
        return [u.num_examples / total for u in updates]
    return [1.0 / len(updates)] * len(updates)


def fedex_residual(target: torch.Tensor, scale: float, B: torch.Tensor,
                   A: torch.Tensor) -> torch.Tensor:
    """FedEx-LoRA's residual, folded into W0: target - s B A, where target is the exact server
    step on the product, s [(1 - eta_g) B_0 A_0 + eta_g sum_i p_i B_i A_i] (m x n)."""
    return target - scale * B @ A


class FedExLoRA(FedAvgLoRA):
    """FedEx-LoRA (Singhal, Ponkshe, Vepakomma; arXiv 2410.09432): exact aggregation.

    The server averages B and A as FedAvg-LoRA does, then folds the residual (`fedex_residual`)
    into W0, so the global model is exactly the average of the clients' models,
    W0 + s sum_i p_i B_i A_i (eta_g = 1). Choices: every client at rank R = min_i k_i; p_i are
    the server normalizer's (`aggregation_weights`); with eta_g != 1 or a FedOpt server the
    target is the server step applied to the product. The residual has rank <= (M + 1) R, so a
    client downloads it as min(m n, (M + 1) R (m + n)) numbers per module besides B and A
    (counted in the next round's download; exact under full participation, where no client
    misses a fold).
    """

    def __init__(self) -> None:
        super().__init__(full=False)
        self.name = "fedex-lora"
        self.residual_numbers = 0  # size of the last fold's message

    def numbers_down(self, downlink: Downlink) -> int:
        return payload_numbers(downlink) + self.residual_numbers

    def aggregate(self, server: Server, updates: list[ClientUpdate],
                  downlinks: list[Downlink]) -> None:
        eta = server.cfg.server_lr
        before = {name: layer.delta_weight().detach() for name, layer in server.modules.items()}
        products = client_products(server, updates, downlinks, aggregation_weights(server, updates))
        server.apply_updates(updates)
        self.residual_numbers = 0
        with torch.no_grad():
            for name, product in products.items():
                layer = server.modules[name]
                target = (1 - eta) * before[name] + eta * product  # (m, n)
                layer.weight += fedex_residual(target, layer.scale, layer.lora_B, layer.lora_A)
                m, n = server.shapes[name]
                self.residual_numbers += min(m * n, (len(updates) + 1) * layer.r * (m + n))

    def state_dict(self) -> dict:
        return {"residual_numbers": self.residual_numbers}

    def load_state_dict(self, state: dict) -> None:
        self.residual_numbers = state["residual_numbers"]
