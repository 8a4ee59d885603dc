"""The fixed point of each method on a planted low-rank least-squares target, in closed form.

FSLoRA minimises the sketched objective f^S(B, A) = E_S F(W0 + s B S A), not F(W0 + s B A)
(arXiv 2501.19389, eq. 3 and Theorem 4.4: its stationary points are those of f^S). On least
squares with isotropic inputs the difference is an explicit penalty, and its minimiser keeps part
of the error that an unsketched LoRA of the same rank removes. Setting (all clients alike):

    F(W) = 1/2 E||(W - W*) z||^2 + const,  E[z z^T] = I,   Delta = W* - W0 = sum_l sigma_l u_l v_l^T,
    M = s B A = sum_j m_j  (m_j = s b_j a_j^T, rank one),  kappa_i = (r - k_i) / (k_i (r - 1)).

(With E[z z^T] = Sigma, use the spectrum of Delta Sigma^(1/2); every loss below is an excess
F(W0 + M) - F(W*), in the units of F.)

Derivation for FSLoRA, line by line:

1. E[S] = I, so F's cross term vanishes: E_S F(W0 + s B S A) = 1/2 ||M - Delta||^2
   + 1/2 E||s B (S - I) A||^2.
2. E[(S_jj - 1)(S_ll - 1)] = r/k - 1 (j = l) and -(r/k - 1)/(r - 1) (j != l) (Lemma D.3 and the
   exact variance of theory/sketch_moments.py), so with sum_{j != l} <m_j, m_l> = ||M||^2 -
   sum_j ||m_j||^2:   E||s B (S - I) A||^2 = kappa (r sum_j ||m_j||^2 - ||M||^2).
3. Averaging over clients (same data, weights p_i): kappa_bar = sum_i p_i kappa_i, and
   f^S = 1/2 ||M - Delta||^2 + 1/2 kappa_bar (r sum_j ||m_j||^2 - ||M||^2).
4. For a fixed M of rank <= r the smallest sum_j ||m_j||^2 over factorisations is ||M||_*^2 / r:
   sum_j ||m_j||_F >= ||M||_* (triangle inequality; ||m_j||_* = ||m_j||_F for rank one) and
   Cauchy-Schwarz; equality for the equalised factorisation (every ||m_j|| = ||M||_* / r), which
   exists whenever rank M <= r (Mianjy, Arora, Vidal 2018, "On the implicit bias of dropout").
5. So min f^S = min over rank(M) <= r of 1/2 ||M - Delta||^2 + 1/2 kappa_bar (||M||_*^2 - ||M||_F^2).
   The penalty is kappa_bar sum_{l < l'} mu_l mu_l' (mu: singular values of M): unitarily
   invariant, so M shares Delta's singular vectors (von Neumann) and only mu is left:
       g(mu) = 1/2 sum_l (mu_l - sigma_l)^2 + 1/2 kappa_bar ((sum_l mu_l)^2 - sum_l mu_l^2).
6. g is convex (Hessian (1 - kappa_bar) I + kappa_bar 1 1^T, kappa_bar <= 1). On the support of
   the top p values, stationarity gives mu_l = (sigma_l - kappa_bar S_p) / (1 - kappa_bar) with
   S_p = sum_{l<=p} mu_l = sum_{l<=p} sigma_l / (1 + (p - 1) kappa_bar): a soft threshold at
   kappa_bar S_p. The minimiser is the best of these over p <= min(r, rank Delta) with every
   mu_l > 0 (and mu = 0).

Consequences: a rank-one target loses nothing (the penalty is 0 at p = 1); at k = r, kappa = 0
and FSLoRA is rank-r LoRA; at fixed k, a larger r lets more components in but raises kappa
towards 1/k, which shrinks them all (theory/README.md and figures/sketch_bias.png give where
the error is smallest).

The baselines' fixed points on the same problem (fslora_min/methods.py semantics):

- fedavg-min / fedavg-full: rank-R LoRA with R = min_i k_i / r; gradient descent on matrix
  factorisation reaches the best rank-R approximation (Eckart-Young): mu_l = sigma_l, l <= R.
- hetlora: client i trains the first k_i ranks. The nested SVD (m_j = sigma_j u_j v_j^T) makes
  every prefix the best rank-k_i approximation, so every client's gradient is 0: a fixed point
  for any H. Ranks past max_i k_i are never trained (B starts at 0): mu_l = sigma_l, l <= min(r,
  max_i k_i).
- flexlora: the server averages the clients' products sum_i p_i s_i b_i a_i and sends client i
  the best rank-k_i truncation (balanced factors, scale c_i = alpha / k_i). A client with
  k_i < l contributes 0 to the l-th singular value. Gradient descent keeps balanced factors
  aligned with Delta, one scalar per singular value: c b a = mu becomes
  phi_i(mu) = mu (1 - lr c_i (mu - sigma_l))^2 per step, so a round maps
  mu_l -> sum_i p_i [k_i >= l] phi_i^H(mu_l), and mu_l is the largest fixed point of that map
  (iterated from sigma_l down; 0 when the shrinkage by pi_l = sum_i p_i [k_i >= l] beats the H
  steps' growth: the component dies out). With local training run to convergence (H -> infinity)
  mu_l = pi_l sigma_l.
- flora: each round merges sum_i p_i s_i b_i a_i into W: rank accumulates over rounds and the
  fixed point is W* itself (mu = sigma, excess 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FIXED_POINT_METHODS = ("fslora", "fedavg-min", "fedavg-full", "hetlora", "flexlora", "flora")


@dataclass(frozen=True)
class FixedPoint:
    method: str
    singular_values: np.ndarray  # mu_l of the fixed point's update M, paired with sigma_l
    excess_loss: float  # F(W0 + M) - F(W*) = 1/2 sum_l (mu_l - sigma_l)^2
    objective_excess: float  # what the method minimises, above F(W*) (FSLoRA: min f^S - F(W*))


def sketch_penalty_weight(rank: int, client_ranks: tuple[int, ...],
                          weights: tuple[float, ...] | None = None) -> float:
    """kappa_bar = sum_i p_i (r - k_i) / (k_i (r - 1)): the weight of FSLoRA's penalty (step 3)."""
    if rank == 1:
        return 0.0
    p = _weights(client_ranks, weights)
    return float(sum(w * (rank - k) / (k * (rank - 1)) for w, k in zip(p, client_ranks)))


def sketched_objective(mu: np.ndarray, sigma: np.ndarray, kappa: float) -> float:
    """g(mu) = 1/2 sum (mu - sigma)^2 + 1/2 kappa ((sum mu)^2 - sum mu^2): min f^S - F(W*) at M
    with singular values mu aligned with Delta's (step 5)."""
    return float(0.5 * ((mu - sigma) ** 2).sum() + 0.5 * kappa * (mu.sum() ** 2 - (mu**2).sum()))


def sketched_minimiser(sigma: np.ndarray, rank: int, kappa: float) -> np.ndarray:
    """argmin g over mu >= 0 with at most `rank` nonzero: the soft threshold of step 6.

    g is strictly convex for kappa < 1, so its minimiser is unique. At kappa = 1 (every client
    at k = 1) g = const - <mu, sigma> + (sum mu)^2 / 2 is flat along the splits of sum mu =
    sigma_1 over the values tied with sigma_1: every split is a minimiser of f^S, and we return
    the BEST one for F (the equal split, which has the smallest excess 1/2 ||mu - sigma||^2);
    without ties it is mu_1 = sigma_1 alone."""
    if kappa >= 1:
        tied = min(rank, int(np.isclose(sigma, sigma[0], rtol=1e-12, atol=0).sum()))
        mu = np.zeros_like(sigma)
        mu[:tied] = sigma[0] / tied
        return mu
    best, best_val = np.zeros_like(sigma), sketched_objective(np.zeros_like(sigma), sigma, kappa)
    for p in range(1, min(rank, int((sigma > 0).sum())) + 1):
        S = sigma[:p].sum() / (1 + (p - 1) * kappa)
        mu = np.zeros_like(sigma)
        mu[:p] = sigma[:p] if p == 1 else (sigma[:p] - kappa * S) / (1 - kappa)
        if mu[p - 1] > 0 and sketched_objective(mu, sigma, kappa) < best_val:
            best, best_val = mu, sketched_objective(mu, sigma, kappa)
    return best


def flexlora_singular_value(sigma: float, client_ranks: tuple[int, ...], p: np.ndarray, l: int,
                            lr: float, local_steps: int, alpha: float, rounds: int = 20000) -> float:
    """The largest fixed point of mu -> sum_{i: k_i >= l} p_i phi_i^H(mu), phi_i(mu) =
    mu (1 - lr (alpha / k_i) (mu - sigma))^2: FlexLoRA's l-th singular value at finite H."""
    mu = sigma
    for _ in range(rounds):
        new = 0.0
        for w, k in zip(p, client_ranks):
            if k >= l:
                x = mu
                for _ in range(local_steps):
                    x = x * (1 - lr * alpha / k * (x - sigma)) ** 2
                new += w * x
        if abs(new - mu) <= 1e-15 * max(sigma, 1e-300):
            return new
        mu = new
    return mu


def predicted_fixed_point(method: str, spectrum, rank: int, client_ranks: tuple[int, ...],
                          weights: tuple[float, ...] | None = None, lr: float | None = None,
                          local_steps: int | None = None, alpha: float | None = None
                          ) -> FixedPoint:
    """The fixed point of `method` on the planted target with singular values `spectrum`.

    method: one of FIXED_POINT_METHODS; spectrum: sigma_l of Delta (any order; whitened units);
    rank: the global rank r; client_ranks: k_i; weights: p_i (default equal). For flexlora,
    lr, local_steps (H) and alpha give the finite-H fixed point; without them, H -> infinity.
    The other methods' fixed points do not depend on them. excess_loss is F(W0 + M) - F(W*);
    objective_excess is, for fslora, min f^S - F(W*) (for the others, excess_loss again). See
    the module docstring for each closed form and its assumptions (identical clients, isotropic
    inputs, full participation, the method run to its fixed point; for fslora, the small-step
    limit: the runs of theory/bias_runs.py move off it by a few % at H = 2).
    """
    sigma = np.sort(np.asarray(spectrum, dtype=float))[::-1]
    if (sigma < 0).any() or not client_ranks or min(client_ranks) < 1 or max(client_ranks) > rank:
        raise ValueError(f"need spectrum >= 0 and 1 <= k_i <= r = {rank}; got spectrum {spectrum}"
                         f", client_ranks {client_ranks}")
    p = _weights(client_ranks, weights)
    kappa = sketch_penalty_weight(rank, client_ranks, weights)
    ell = np.arange(1, len(sigma) + 1)
    if method == "fslora":
        mu = sketched_minimiser(sigma, rank, kappa)
        return FixedPoint(method, mu, _excess(mu, sigma), sketched_objective(mu, sigma, kappa))
    if method in ("fedavg-min", "fedavg-full", "hetlora"):
        R = {"fedavg-min": min(client_ranks), "fedavg-full": rank,
             "hetlora": min(rank, max(client_ranks))}[method]
        mu = np.where(ell <= R, sigma, 0.0)
    elif method == "flexlora":
        if local_steps is None:
            pi = np.array([sum(w for w, k in zip(p, client_ranks) if k >= l) for l in ell])
            mu = pi * sigma
        else:
            if lr is None or alpha is None:
                raise ValueError("flexlora at finite local_steps needs lr and alpha too")
            mu = np.array([flexlora_singular_value(x, client_ranks, p, l, lr, local_steps, alpha)
                           for l, x in zip(ell, sigma)])
    elif method == "flora":
        mu = sigma.copy()
    else:
        raise ValueError(f"method must be one of {FIXED_POINT_METHODS}, got {method!r}")
    return FixedPoint(method, mu, _excess(mu, sigma), _excess(mu, sigma))


def _excess(mu: np.ndarray, sigma: np.ndarray) -> float:
    return float(0.5 * ((mu - sigma) ** 2).sum())


def _weights(client_ranks, weights) -> np.ndarray:
    p = np.ones(len(client_ranks)) if weights is None else np.asarray(weights, dtype=float)
    if len(p) != len(client_ranks) or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"weights must be {len(client_ranks)} numbers >= 0, got {weights}")
    return p / p.sum()
