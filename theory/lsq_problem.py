"""A federated least-squares LoRA problem where every constant of the theory can be measured.

Client i holds inputs Z_i (n x n_i) and targets Y_i (m x n_i) and the loss

    F_i(W) = ||W Z_i - Y_i||_F^2 / (2 n_i),     W = W0 + s B A,  X = [B; A] (flattened, p numbers).

Targets come from W0 + a shared low-rank change + a client-specific change (heterogeneity) + noise.
The three losses of docs/method.md sections 2 and 6, for client i and a sketch with diagonal d = diag(S):

    f_i(X)      = F_i(W0 + s B A)                 plain LoRA loss           (A1 is about this one)
    f~_i(X; S)  = F_i(W0 + s B S A) = f_i(P_S X)  fixed-sketch loss,  P_S(B, A) = (B S^1/2, S^1/2 A)
    f_i^S(X)    = E_S f~_i(X; S)                  sketched loss, exact: the mean over ALL index sets
    f^S(X)      = (1/N) sum_i f_i^S(X)

Since r is small (8), E_S is an exact average over all C(r, k_i) index sets: grad f^S is exact.
The loss broadcasts over leading dimensions (clients, sketches, points, samples), and gradients
of many copies of X at once come from one backward pass over their sum.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from theory.enumeration import all_sketch_diagonals


@dataclass
class LSQConfig:
    m: int = 8  # rows of W (outputs)
    n: int = 8  # columns of W (inputs)
    r: int = 8  # global LoRA rank
    ranks: tuple[int, ...] = (4, 4, 4, 4)  # k_i, one per client: N = len(ranks)
    samples: int = 24  # n_i: data points per client
    batch: int = 4  # minibatch size b of a local SGD step (drawn with replacement)
    target_rank: int = 3  # rank of the change all clients share
    heterogeneity: float = 0.3  # size of each client's own change of the target
    noise: float = 0.1  # label noise
    alpha: float = 8.0  # LoRA alpha: s = alpha / r
    seed: int = 0
    # a planted shared change with these singular values (random singular vectors) in place of
    # the Gaussian rank-`target_rank` one; with `whiten` they are the spectrum F_i sees
    spectrum: tuple[float, ...] = ()
    whiten: bool = False  # make each Z_i Z_i^T / n_i = I / n exactly (isotropic curvature)
    shared_data: bool = False  # every client holds client 0's (Z, Y): sigma_h = 0, c_h = 0


def project(x: torch.Tensor, d: torch.Tensor, m: int, n: int, r: int) -> torch.Tensor:
    """P_S(B, A) = (B S^(1/2), S^(1/2) A): linear, ||P_S||_2^2 = max_j S_jj = r/k; f~_i(X;S) = f_i(P_S X).

    Broadcasts: x (..., p), d (..., r) -> (..., p).
    """
    h = d.sqrt()  # (..., r)
    B = x[..., : m * r].unflatten(-1, (m, r)) * h.unsqueeze(-2)  # (..., m, r)
    A = h.unsqueeze(-1) * x[..., m * r:].unflatten(-1, (r, n))  # (..., r, n)
    return torch.cat([B.flatten(-2), A.flatten(-2)], -1)


def planted_change(spectrum: tuple[float, ...], m: int, n: int,
                   g: torch.Generator) -> torch.Tensor:
    """U diag(spectrum) V^T with Haar-random orthonormal U (m x rho), V (n x rho): (m, n)."""
    rho = len(spectrum)
    if rho > min(m, n):
        raise ValueError(f"spectrum has {rho} values, more than min(m, n) = {min(m, n)}")
    U = torch.linalg.qr(torch.randn(m, rho, generator=g))[0]  # (m, rho)
    V = torch.linalg.qr(torch.randn(n, rho, generator=g))[0]  # (n, rho)
    return (U * torch.tensor(spectrum, dtype=U.dtype)) @ V.T


def whitened(Z: torch.Tensor) -> torch.Tensor:
    """Z_i -> (Z_i Z_i^T / n_i)^(-1/2) Z_i, so the result has Z_i Z_i^T / n_i = I: (..., n, n_i)."""
    ev, Q = torch.linalg.eigh(Z @ Z.transpose(-1, -2) / Z.shape[-1])  # (..., n), (..., n, n)
    return (Q * ev.rsqrt().unsqueeze(-2)) @ Q.transpose(-1, -2) @ Z


class LSQProblem:
    """Data W0, Z (N, n, n_i), Y (N, m, n_i), the initial X^0 (B = 0), and the exact sketched losses."""

    def __init__(self, cfg: LSQConfig) -> None:
        self.cfg = cfg
        m, n, r, N, ni = cfg.m, cfg.n, cfg.r, len(cfg.ranks), cfg.samples
        g = torch.Generator().manual_seed(cfg.seed)
        self.s = cfg.alpha / r  # LoRA scale
        self.W0 = torch.randn(m, n, generator=g) / n**0.5  # (m, n)
        if cfg.spectrum:
            shared = planted_change(cfg.spectrum, m, n, g) * n**0.5  # (m, n); F sees / sqrt(n)
        else:
            shared = (torch.randn(m, cfg.target_rank, generator=g)
                      @ torch.randn(cfg.target_rank, n, generator=g)) / n**0.5  # (m, n)
        own = cfg.heterogeneity * torch.randn(N, m, n, generator=g) / n**0.5  # (N, m, n)
        self.Z = torch.randn(N, n, ni, generator=g) / n**0.5  # (N, n, n_i): E[z z^T] = I / n
        if cfg.whiten:
            self.Z = whitened(self.Z) / n**0.5
        self.Y = ((self.W0 + shared + own) @ self.Z
                  + cfg.noise * torch.randn(N, m, ni, generator=g))  # (N, m, n_i)
        if cfg.shared_data:
            self.Z, self.Y = self.Z[:1].expand_as(self.Z).clone(), self.Y[:1].expand_as(self.Y).clone()
        B0 = torch.zeros(m, r)
        A0 = torch.randn(r, n, generator=g) / n**0.5  # Gaussian A, zero B: X^0 gives W = W0
        self.x0 = torch.cat([B0.reshape(-1), A0.reshape(-1)])  # (p,)
        # every index set of every client, padded to one length with zero weight: (N, C, r), (N, C)
        sets = [all_sketch_diagonals(r, k) for k in cfg.ranks]
        C = max(len(d) for d in sets)
        self.D = torch.zeros(N, C, r)
        self.w = torch.zeros(N, C)
        for i, d in enumerate(sets):
            self.D[i, : len(d)], self.w[i, : len(d)] = d, 1.0 / len(d)

    @property
    def N(self) -> int:
        return len(self.cfg.ranks)

    @property
    def ratios(self) -> tuple[float, ...]:
        return tuple(k / self.cfg.r for k in self.cfg.ranks)

    @property
    def dims(self) -> tuple[int, int, int]:
        return self.cfg.m, self.cfg.n, self.cfg.r

    def loss(self, x: torch.Tensor, Z: torch.Tensor, Y: torch.Tensor,
             d: torch.Tensor) -> torch.Tensor:
        """f~_i(X; S) = ||(W0 + s B S A) Z - Y||^2 / (2 n_i), d = diag(S); d = 1 gives f_i.

        Batched by broadcasting: x (..., p), Z (..., n, n_i), Y (..., m, n_i), d (..., r) -> (...).
        """
        m, n, r = self.dims
        B = x[..., : m * r].unflatten(-1, (m, r))  # (..., m, r)
        A = x[..., m * r:].unflatten(-1, (r, n))  # (..., r, n)
        W = self.W0 + self.s * (B * d.unsqueeze(-2)) @ A  # (..., m, n)
        return 0.5 * ((W @ Z - Y) ** 2).sum((-2, -1)) / Z.shape[-1]

    def client_sketched_losses(self, x: torch.Tensor) -> torch.Tensor:
        """f_i^S(X) = sum_c w_ic f~_i(X; S_c), exact over all index sets c: x (..., p) -> (..., N)."""
        x = x.unsqueeze(-2).unsqueeze(-2)  # (..., 1, 1, p)
        per = self.loss(x, self.Z[:, None], self.Y[:, None], self.D)  # (..., N, C)
        return (per * self.w).sum(-1)

    def sketched_loss(self, x: torch.Tensor) -> torch.Tensor:
        """f^S(X) = (1/N) sum_i f_i^S(X): x (..., p) -> (...)."""
        return self.client_sketched_losses(x).mean(-1)

    def fixed_sketch_grads(self, x: torch.Tensor) -> torch.Tensor:
        """grad f~_i(X; S_c) for every client i and index set c: (N, C, p)."""
        xs = x.detach().expand(*self.D.shape[:2], x.shape[-1]).clone().requires_grad_(True)
        loss = self.loss(xs, self.Z[:, None], self.Y[:, None], self.D).sum()
        return torch.autograd.grad(loss, xs)[0]  # each copy of x gets its own gradient

    def client_sketched_grads(self, x: torch.Tensor) -> torch.Tensor:
        """grad f_i^S(X) = sum_c w_ic grad f~_i(X; S_c): (N, p), exact."""
        return (self.fixed_sketch_grads(x) * self.w[..., None]).sum(1)

    def sketched_grad(self, x: torch.Tensor) -> torch.Tensor:
        """grad f^S(X) = (1/N) sum_i grad f_i^S(X): (p,), exact."""
        return self.client_sketched_grads(x).mean(0)
