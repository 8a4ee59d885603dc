"""raFLoRA (Wu, Hu, Min, Wang; arXiv 2602.13486, 2026): FlexLoRA's SVD allocation with
rank-partitioned aggregation.

The paper finds that with heterogeneous ranks and SVD-based allocation (FlexLoRA) the global
update's energy collapses into the smallest shared rank: component l is averaged with weight
p_i over every participant, but only the clients with k_i >= l contribute to it, so it shrinks
by pi_l = sum_{i: k_i >= l} p_i each round (theory/sketch_bias.py: FlexLoRA's mu_l = pi_l sigma_l
at H -> infinity). raFLoRA splits each client's update into rank partitions and averages each
partition over the clients that hold it.

What we assumed (only the abstract and summaries were reachable, not the method section): the
partitions are the rank indices themselves (client i's factors, received as a truncated SVD of
the global update, have their j-th column/row on the j-th singular direction; partitions between
consecutive distinct k_i give the same weights, since P_j is constant on each), and the
"effective client contributions" are the data weights renormalised within a partition:

    dW = sum_j sum_{i: k_i > j} (p_i / P_j) s_i b_ij a_ij^T,   P_j = sum_{i: k_i > j} p_i.

Its relation to `--aggregation coverage` (server.index_normalizer): the same per-index
normaliser, applied to FlexLoRA's products instead of FSLoRA's / HetLoRA's padded factor deltas.
With every k_i equal, P_j = 1 and raFLoRA is FlexLoRA.
"""

from __future__ import annotations

import torch

from fslora_min.client import ClientUpdate, Downlink
from fslora_min.methods import FlexLoRA
from fslora_min.server import Server


def partition_weights(ranks: list[int], weights: list[float]) -> list[torch.Tensor]:
    """Client i's weight on its rank index j: p_i / P_j, P_j = sum_{i': k_i' > j} p_i'."""
    cover = torch.zeros(max(ranks), dtype=torch.float64)
    for k, p in zip(ranks, weights):
        cover[:k] += p
    return [p / cover[:k] for k, p in zip(ranks, weights)]


def partitioned_products(server: Server, updates: list[ClientUpdate],
                         downlinks: list[Downlink]) -> dict[str, torch.Tensor]:
    """dW = sum_i s_i (b_0 + db) diag(p_i / P_j) (a_0 + da): each rank index averaged over the
    clients that hold it (p_i: data sizes, as client_products)."""
    total = sum(u.num_examples for u in updates)
    p = [u.num_examples / total for u in updates]
    out: dict[str, torch.Tensor] = {}
    for name in updates[0].deltas:
        ranks = [down[name].sketch.k for down in downlinks]
        for update, down, w in zip(updates, downlinks, partition_weights(ranks, p)):
            f, (db, da) = down[name], update.deltas[name]
            s_i = server.modules[name].scale * f.sketch.sketch_weight
            prod = s_i * ((f.b + db) * w.to(db)[None, :]) @ (f.a + da)  # (m, n)
            out[name] = prod if name not in out else out[name] + prod
    return out


class RaFLoRA(FlexLoRA):
    """FlexLoRA's clients, downlink and server SVD; the global update is rank-partitioned
    (module docstring)."""

    name = "raflora"

    def products(self, server: Server, updates: list[ClientUpdate],
                 downlinks: list[Downlink]) -> dict[str, torch.Tensor]:
        return partitioned_products(server, updates, downlinks)
