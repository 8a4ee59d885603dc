"""FSLoRA and its baselines as small strategy objects plugged into ONE federation loop.

The loop (fslora_min/federation.py) asks a `Method` these things each round:
  1. `sketches(server, k_i, generator)`: which ranks client i trains, at which diagonal values;
  2. `downlink(server, sketches)`: the compact factors b_0 (m x k_i), a_0 (k_i x n) it starts at,
     which of them it trains, and any frozen ranks it folds beside W0 (CompactFactors);
  3. `numbers_down(downlink)`: how many numbers that message costs;
  4. `client_upload(update, downlink)` and `numbers_up(update, downlink)`: what the client
     sends of its trained deltas, and how many numbers that costs;
  5. `aggregate(server, updates, downlinks)`: how the server turns the uploads into its new state.
Before the run, `global_rank(r, client_ranks, full_rank)` and `trained_ranks(client_ranks, r)`
say what rank the server holds and what rank each client actually trains (docs/method.md section 5),
and `trainable_numbers(k, R, m, n)` what a client trains per module (its memory).
The methods published since FSLoRA (Fed-PLoRA, FLASC, FFA-LoRA, RoLoRA, FedEx-LoRA) are
fslora_min/rivals.py; every method by name, fslora_min/registry.py. The per-rank normalizer
(RB-LoRA's data weighting among them) is the server's switch, ServerConfig.aggregation.

LoRA scale convention (one for all methods): the global model is W0 + s B A with s = alpha / R
(R the server's rank); a client trains W0 + s_i b a with s_i = s * (diagonal value of its
sketch). FSLoRA, FedAvg-LoRA, FlexLoRA and FLoRA give a rank-k_i client s_i = alpha / k_i (the
ordinary LoRA scale of its own rank; for FSLoRA it is s * r / k_i); HetLoRA trains a prefix of
the global rank-r LoRA at the global s = alpha / r (no rescaling), as in its paper;
`hetlora-rescaled` trains the same prefix at alpha / k_i, the convention of the FSLoRA authors'
baseline code (docs/method.md section 5).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from fslora_min.client import ClientUpdate, Downlink
from fslora_min.importance import importance_sketch, rank_importance, top_k_index
from fslora_min.lora import CompactFactors, lora_scale
from fslora_min.server import Server
from fslora_min.sketch import Sketch, full_sketch, sample_module_sketches


def payload_numbers(downlink: Downlink) -> int:
    """Numbers in a message of per-module factor pairs (index sets, a few bytes, not counted)."""
    return sum(factor_numbers(f) for f in downlink.values())


def factor_numbers(f: CompactFactors) -> int:
    """b and a, and the fold's factors when there is one (Fed-PLoRA's frozen ranks travel too)."""
    return f.b.numel() + f.a.numel() + (0 if f.fold is None else factor_numbers(f.fold))


class Method:
    """FSLoRA (docs/method.md section 3): uniform random k_i-subsets at sketch weight r / k_i,
    padded average.

    The other methods override only the pieces in which they differ.
    """

    name = "fslora"
    server_step = True  # the server moves the global factors by eta_g times the aggregate

    def global_rank(self, r: int, client_ranks: list[int], full_rank: int) -> int:
        """R, the rank the server holds; `full_rank` = max over modules of min(m, n)."""
        return r

    def trained_ranks(self, client_ranks: list[int], r: int) -> list[int]:
        """The rank each client trains: its k_i unless the method ignores it."""
        return list(client_ranks)

    def sketches(self, server: Server, k: int, generator: torch.Generator) -> dict[str, Sketch]:
        return sample_module_sketches(server.module_names, server.rank, k, generator)

    def downlink(self, server: Server, sketches: dict[str, Sketch]) -> Downlink:
        return server.downlink(sketches)

    def numbers_down(self, downlink: Downlink) -> int:
        return payload_numbers(downlink)

    def client_upload(self, update: ClientUpdate, downlink: Downlink) -> ClientUpdate:
        """What the client makes of its trained deltas before sending them (FSLoRA: all)."""
        return update

    def numbers_up(self, update: ClientUpdate, downlink: Downlink) -> int:
        """Numbers uploaded: the deltas of the factors the client trained (a frozen factor's
        delta is exactly zero and is not sent)."""
        total = 0
        for name, (db, da) in update.deltas.items():
            f = downlink.get(name)
            total += (db.numel() * (f is None or f.train_b)
                      + da.numel() * (f is None or f.train_a))
        return total

    def trainable_numbers(self, client_rank: int, rank: int, m: int, n: int) -> int:
        """Numbers a client of rank k_i trains on one m x n module (its memory scales with it)."""
        return client_rank * (m + n)

    def aggregate(self, server: Server, updates: list[ClientUpdate],
                  downlinks: list[Downlink]) -> None:
        server.apply_updates(updates)

    def state_dict(self) -> dict:
        """What a checkpoint needs beyond the server's state to resume exactly (FSLoRA: none)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FedAvgLoRA(Method):
    """Every client trains all R ranks; R = min_i k_i (feasible) or R = r (the upper reference)."""

    def __init__(self, full: bool) -> None:
        self.full = full
        self.name = "fedavg-full" if full else "fedavg-min"

    def global_rank(self, r: int, client_ranks: list[int], full_rank: int) -> int:
        return r if self.full else min(client_ranks)

    def trained_ranks(self, client_ranks: list[int], r: int) -> list[int]:
        return [r if self.full else min(client_ranks)] * len(client_ranks)

    def sketches(self, server: Server, k: int, generator: torch.Generator) -> dict[str, Sketch]:
        return {name: full_sketch(server.rank) for name in server.module_names}


class HetLoRA(Method):
    """Client i always trains the FIRST k_i ranks at the global scale (diagonal value 1).

    The server zero-pads and averages over the participants (ServerConfig.aggregation, as for
    FSLoRA): rank j moves by (clients covering j) / |P| of their mean delta.
    """

    name = "hetlora"
    prefix_weight: float | None = 1.0  # the diagonal value at the prefix (None: r / k_i)

    def sketches(self, server: Server, k: int, generator: torch.Generator) -> dict[str, Sketch]:
        return {name: Sketch(torch.arange(k), server.rank, weight=self.prefix_weight)
                for name in server.module_names}


class RescaledHetLoRA(HetLoRA):
    """HetLoRA whose client trains its prefix at s r / k_i (alpha / k_i with the plain LoRA
    scale): diagonal value r / k_i, FSLoRA's sketch weight on HetLoRA's fixed first k_i ranks.

    The convention of the FSLoRA authors' baseline code. It matters because it sets the size of
    a small client's step: under SGD a client's step on its product b a grows like its scale
    squared, so at alpha / k_i a rank-k_i client moves (r / k_i)^2 times as far as at alpha / r
    for one lr; each convention has its own best lr, and the two rows can order differently
    against FSLoRA. With every k_i = r they coincide: HetLoRA, and FedAvg-LoRA, step for step.
    """

    name = "hetlora-rescaled"
    prefix_weight = None


class TopKImportance(Method):
    """Ablation: the k_i ranks of largest |b_j| |a_j| per module, scale r / k_i, no reweighting."""

    name = "fslora-topk"

    def sketches(self, server: Server, k: int, generator: torch.Generator) -> dict[str, Sketch]:
        return {name: Sketch(top_k_index(rank_importance(m.lora_B, m.lora_A), k, generator),
                             server.rank)
                for name, m in server.modules.items()}


class ReweightedImportance(Method):
    """Ablation: P(j in I) = pi_j from |b_j| |a_j|, diagonal 1 / pi_j, so E[S] = I still."""

    name = "fslora-importance"

    def __init__(self, uniform_mix: float = 0.5) -> None:
        self.uniform_mix = uniform_mix

    def sketches(self, server: Server, k: int, generator: torch.Generator) -> dict[str, Sketch]:
        return {name: importance_sketch(rank_importance(m.lora_B, m.lora_A), k,
                                        self.uniform_mix, generator)
                for name, m in server.modules.items()}


def client_scale_weight(server: Server, r: int, k: int) -> float:
    """The diagonal value that gives a rank-k client the FSLoRA scale s(r) * r / k (= alpha/k),
    with the layers' own alpha and rsLoRA choice (their rank R may differ from r)."""
    layer = next(iter(server.modules.values()))
    return lora_scale(layer.alpha, r, layer.rslora) * r / k / layer.scale


class ProductMethod(Method):
    """Methods whose server works on products dW_i = s_i b_i a_i rather than on padded factors.

    Client i trains a rank-k_i LoRA of its own (the sketch's indices 0..k_i-1 only label it)
    at scale s_i = alpha / k_i. Aggregation weights p_i are the clients' data sizes, normalised
    over the participants. The server sets the global model itself: eta_g is not used.
    """

    server_step = False

    def __init__(self, r: int, seed_generator: torch.Generator) -> None:
        self.r = r  # the configured global rank, whose FSLoRA scale the clients get
        self.init_stream = seed_generator  # fresh LoRA initialisations

    def state_dict(self) -> dict:
        return {"init_stream": self.init_stream.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.init_stream.set_state(state["init_stream"])

    def sketches(self, server: Server, k: int, generator: torch.Generator) -> dict[str, Sketch]:
        w = client_scale_weight(server, self.r, k)
        return {name: Sketch(torch.arange(k), server.rank, weight=w)
                for name in server.module_names}

    def fresh_factors(self, server: Server, name: str, sketch: Sketch) -> CompactFactors:
        """A new rank-k LoRA: b = 0 (m x k), a Kaiming-uniform (k x n), as LoRALinear inits."""
        m, n = server.shapes[name]
        layer = server.modules[name]
        a = torch.empty(sketch.k, n, dtype=layer.lora_A.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=self.init_stream)
        return CompactFactors(torch.zeros(m, sketch.k, dtype=layer.lora_B.dtype,
                                          device=layer.lora_B.device),
                              a.to(layer.lora_A.device), sketch)


def client_products(server: Server, updates: list[ClientUpdate], downlinks: list[Downlink],
                    weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """dW = sum_i p_i s_i (b_0 + db)(a_0 + da) (m x n per module), p_i = `weights`, by
    default n_i / sum_j n_j."""
    total = sum(u.num_examples for u in updates)
    if weights is None:
        weights = [u.num_examples / total for u in updates]
    out: dict[str, torch.Tensor] = {}
    for update, down, p in zip(updates, downlinks, weights):
        for name, (db, da) in update.deltas.items():
            f = down[name]
            s_i = server.modules[name].scale * f.sketch.sketch_weight
            prod = p * s_i * (f.b + db) @ (f.a + da)  # (m, n)
            out[name] = prod if name not in out else out[name] + prod
    return out


class FlexLoRA(ProductMethod):
    """FlexLoRA (Bai et al. 2024): the server keeps dW = sum_i p_i s_i B_i A_i and sends client i
    the best rank-k_i factorisation of it by truncated SVD.

    dW has rank up to sum_i k_i, so the server stores it exactly as a LoRA of rank
    R = max min(m, n) (any m x n matrix is one): B = U sqrt(Sigma / s), A = sqrt(Sigma / s) V^T.
    In the first round dW = 0 and clients start a fresh LoRA.
    """

    name = "flexlora"

    def __init__(self, r: int, seed_generator: torch.Generator) -> None:
        super().__init__(r, seed_generator)
        self.svds: dict[str, SVD] = {}  # SVD of each module's dW, computed once per round

    def state_dict(self) -> dict:
        return super().state_dict() | {"svds": {n: tuple(s) for n, s in self.svds.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.svds = dict(state["svds"])

    def global_rank(self, r: int, client_ranks: list[int], full_rank: int) -> int:
        return max(r, full_rank)

    def downlink(self, server: Server, sketches: dict[str, Sketch]) -> Downlink:
        out = {}
        for name, sk in sketches.items():
            layer = server.modules[name]
            if not layer.lora_B.detach().any():  # dW = 0: the first round
                out[name] = self.fresh_factors(server, name, sk)
                continue
            if name not in self.svds:
                self.svds[name] = torch.linalg.svd(layer.delta_weight().detach().double(),
                                                   full_matrices=False)
            b, a = truncated_factors(self.svds[name], sk.k, layer.scale * sk.sketch_weight)
            out[name] = CompactFactors(b.to(layer.lora_B), a.to(layer.lora_A), sk)
        return out

    def products(self, server: Server, updates: list[ClientUpdate],
                 downlinks: list[Downlink]) -> dict[str, torch.Tensor]:
        """The global update dW per module (raFLoRA reweights it by rank partition)."""
        return client_products(server, updates, downlinks)

    def aggregate(self, server: Server, updates: list[ClientUpdate],
                  downlinks: list[Downlink]) -> None:
        server.count_coverage(updates)
        self.svds = {}
        for name, dw in self.products(server, updates, downlinks).items():
            layer = server.modules[name]
            self.svds[name] = torch.linalg.svd(dw.double(), full_matrices=False)
            b, a = truncated_factors(self.svds[name], layer.r, layer.scale)
            with torch.no_grad():
                layer.lora_B.copy_(b), layer.lora_A.copy_(a)


SVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U (m, q), Sigma (q,), V^T (q, n)


def truncated_factors(svd: SVD, k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """b = U_k sqrt(Sigma_k / c), a = sqrt(Sigma_k / c) V_k^T: c b a = best rank-k approx of dW."""
    U, sigma, Vh = svd
    root = (sigma[:k] / scale).sqrt()  # (k,)
    b = U[:, :k] * root[None, :]  # (m, k)
    a = root[:, None] * Vh[:k]  # (k, n)
    if b.shape[1] < k:  # dW has fewer than k singular values (min(m, n) < k): pad with zeros
        b = torch.cat([b, b.new_zeros(b.shape[0], k - b.shape[1])], 1)
        a = torch.cat([a, a.new_zeros(k - a.shape[0], a.shape[1])], 0)
    return b, a


class FLoRA(ProductMethod):
    """FLoRA (Wang et al. 2024): stack the clients' factors, merge into W0, restart fresh LoRAs.

    With B_st = [p_1 s_1 B_1, ..., p_M s_M B_M] (m x sum k_i) and A_st = [A_1; ...; A_M], the
    stacked product B_st A_st = sum_i p_i s_i B_i A_i exactly. Every client downloads the stack
    (sum_i k_i (m + n) numbers) to merge it into its W0: FLoRA's download cost.
    """

    name = "flora"

    def __init__(self, r: int, seed_generator: torch.Generator) -> None:
        super().__init__(r, seed_generator)
        self.stack_numbers = 0  # size of the last broadcast stack

    def state_dict(self) -> dict:
        return super().state_dict() | {"stack_numbers": self.stack_numbers}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.stack_numbers = state["stack_numbers"]

    def downlink(self, server: Server, sketches: dict[str, Sketch]) -> Downlink:
        return {name: self.fresh_factors(server, name, sk) for name, sk in sketches.items()}

    def numbers_down(self, downlink: Downlink) -> int:
        return self.stack_numbers  # the fresh a is drawn on the client from a shared seed

    def aggregate(self, server: Server, updates: list[ClientUpdate],
                  downlinks: list[Downlink]) -> None:
        server.count_coverage(updates)
        stacks = stack_factors(server, updates, downlinks)
        self.stack_numbers = sum(b.numel() + a.numel() for b, a in stacks.values())
        with torch.no_grad():
            for name, (b, a) in stacks.items():
                server.modules[name].weight += b @ a  # W0 <- W0 + sum_i p_i s_i B_i A_i


def stack_factors(server: Server, updates: list[ClientUpdate],
                  downlinks: list[Downlink]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(B_st (m x sum k), A_st (sum k x n)) per module, weights p_i s_i folded into B."""
    total = sum(u.num_examples for u in updates)
    bs: dict[str, list[torch.Tensor]] = {}
    as_: dict[str, list[torch.Tensor]] = {}
    for update, down in zip(updates, downlinks):
        p = update.num_examples / total
        for name, (db, da) in update.deltas.items():
            f = down[name]
            s_i = server.modules[name].scale * f.sketch.sketch_weight
            bs.setdefault(name, []).append(p * s_i * (f.b + db))  # (m, k_i)
            as_.setdefault(name, []).append(f.a + da)  # (k_i, n)
    return {name: (torch.cat(bs[name], 1), torch.cat(as_[name], 0)) for name in bs}
