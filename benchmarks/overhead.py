"""Overhead: the LSD training step flowspec compiles from specs/checkerboard-lsd.toml against the same
step written by hand in plain PyTorch (this file), timed interleaved in one process.

The hand-written loop is an independent implementation of the LSD step (docs/math.md, "Lagrangian"):
its own checkerboard sampler, Gaussian base with the data std, linear interpolant, 4 x 512 GELU MLP on [x, emb(s),
emb(t - s)] with sinusoidal embeddings, eta = 0.75 time sampling, the Lagrangian residual through
forward-mode dual tensors with each linear layer's tangent as one product u W^T (what flowspec's jvp
does; PyTorch's generic rule spends a second product on the weight's zero tangent), RAdam,
global-norm clipping at 10 and a warmed-up EMA. It imports nothing from flowspec except to copy the
compiled model's initial weights (same init) and, once, to check that both give the same loss on the
same batch and times (so the two time the same computation). Being a plain loop it has no
learning-rate schedule object and no non-finite check; those are flowspec's overhead.

    python -m benchmarks.overhead                     # CPU default: batch 1024
    python -m benchmarks.overhead --batch 4096 --device cuda --reps 30 --inner 20
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from benchmarks.common import (
    compile_method,
    default_out,
    interleaved,
    print_table,
    ratios,
    resolve_device,
    setup_threads,
    summary,
    write_result,
)
from flowspec import engine

TARGET = 1.03  # the compiled step within 3% of the hand-written one


class SinusoidalTime(nn.Module):
    """[sin(1000 t f_k), cos(1000 t f_k)], f_k = 10000^(-k / half), k < half."""

    def __init__(self, dim: int = 32):
        super().__init__()
        half = dim // 2
        self.register_buffer("f", torch.tensor([10000.0 ** (-k / half) for k in range(half)]), persistent=False)

    def forward(self, t):
        a = 1000.0 * t[:, None] * self.f
        return torch.cat([a.sin(), a.cos()], 1)


class TangentLinear(nn.Linear):
    """nn.Linear whose forward-mode tangent is u W^T alone (the weights carry no tangent here)."""

    def forward(self, x):
        p, u = fwAD.unpack_dual(x)
        if u is None:
            return super().forward(x)
        return fwAD.make_dual(super().forward(p), nn.functional.linear(u, self.weight))


class HandMLP(nn.Module):
    def __init__(self, width: int, depth: int, emb: int = 32):
        super().__init__()
        self.es, self.ed = SinusoidalTime(emb), SinusoidalTime(emb)
        dims = [2 + 2 * emb] + [width] * depth
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [TangentLinear(a, b), nn.GELU()]
        mods.append(TangentLinear(width, 2))
        self.body = nn.Sequential(*mods)

    def v(self, s, t, x):
        return self.body(torch.cat([x, self.es(s), self.ed(t - s)], 1))

    def X(self, s, t, x):
        return x + (t - s)[:, None] * self.v(s, t, x)


def checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    """Uniform on the 8 dark cells of the 4 x 4 board on [-4, 4]^2 (docs/math.md, "The checkerboard")."""
    u = torch.rand(n, 3, generator=g)
    a = 4 * u[:, 0] - 2
    b = u[:, 1] - 2 * (u[:, 2] < 0.5).float() + torch.floor(a).remainder(2)
    return 2 * torch.stack([a, b], 1)


class HandLSD:
    """One LSD step, written out."""

    def __init__(self, net: HandMLP, batch: int, device, seed: int, eta: float = 0.75, lr: float = 1e-3,
                 clip: float = 10.0, ema: float = 0.999):
        self.net, self.batch, self.device, self.eta, self.clip, self.decay = net, batch, device, eta, clip, ema
        self.opt = torch.optim.RAdam(net.parameters(), lr=lr)
        self.ema = [p.detach().clone() for p in net.parameters()]
        self.updates = 0
        self.c = torch.full((2,), 4 / math.sqrt(3), device=device)  # data std of the board: 2 * 2 / sqrt(3)
        self.g_data = torch.Generator().manual_seed(seed + 1)
        self.g = torch.Generator(device).manual_seed(seed + 2)

    def loss(self, x0, x1, s, t, nd):
        net = self.net
        # diagonal: flow matching on I_t = (1 - t) x0 + t x1, dI/dt = x1 - x0
        td = t[:nd]
        it = (1 - td)[:, None] * x0[:nd] + td[:, None] * x1[:nd]
        diag = (net.v(td, td, it) - (x1[:nd] - x0[:nd])).pow(2).sum()
        # off-diagonal: r = d/dt X_{s,t}(I_s) - sg(v_{t,t}(sg X_{s,t}(I_s)))
        so, to = s[nd:], t[nd:]
        xs = (1 - so)[:, None] * x0[nd:] + so[:, None] * x1[nd:]
        with fwAD.dual_level():
            X, dX = fwAD.unpack_dual(net.X(so, fwAD.make_dual(to, torch.ones_like(to)), xs))
        with torch.no_grad():
            b = net.v(to, to, X.detach())
        off = (dX - b).pow(2).sum()
        return (diag + off) / x0.shape[0]

    def draw(self):
        n = self.batch
        x1 = checkerboard(n, self.g_data).to(self.device)
        x0 = torch.randn(n, 2, device=self.device, generator=self.g) * self.c
        nd = int(round(self.eta * n))
        td = torch.rand(nd, device=self.device, generator=self.g)
        pair = torch.rand(n - nd, 2, device=self.device, generator=self.g)
        s = torch.cat([td, pair.min(1).values])
        t = torch.cat([td, pair.max(1).values])
        return x0, x1, s, t, nd

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(*self.draw())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip)
        self.opt.step()
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for e, p in zip(self.ema, self.net.parameters()):
                e.mul_(d).add_(p, alpha=1 - d)
        return loss


def same_computation(graph, hand: HandLSD, device) -> float:
    """Relative difference of the two losses (and gradients) on one shared batch and set of times."""
    from flowspec.objectives.base import Batch

    x0, x1, s, t, nd = hand.draw()
    graph.model.zero_grad(set_to_none=True)
    hand.net.zero_grad(set_to_none=True)
    a = graph.objective.loss_at(graph.model, graph.interpolant, graph.teacher, Batch(x0=x0, x1=x1), s, t, nd).loss
    b = hand.loss(x0, x1, s, t, nd)
    a.backward()
    b.backward()
    ga = torch.cat([p.grad.flatten() for p in graph.model.parameters()])
    gb = torch.cat([p.grad.flatten() for p in hand.net.parameters()])
    graph.model.zero_grad(set_to_none=True)
    hand.net.zero_grad(set_to_none=True)
    return max(float((a - b).detach().abs() / b.detach().abs()), float((ga - gb).norm() / gb.norm()))


#: the spec settings that give flowspec the hand-written loop's network and recipe (overhead compares
#: frameworks on one computation, not networks: docs/networks.md compares those)
HAND_NETWORK = ['network.time_embedding="positional"', 'network.times="s_dt"', "network.scale=1.0",
                'network.activation="gelu"', 'train.optimizer="radam"', 'train.ema_schedule="warmup"']


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--inner", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    started = time.perf_counter()
    threads = setup_threads(a.threads)
    device = resolve_device(a.device)
    graph = compile_method("lsd", a.batch, device, a.width, a.depth, a.seed, extra=HAND_NETWORK)
    net = HandMLP(a.width, a.depth).to(device)
    with torch.no_grad():  # same initial weights (the compiled model's parameters, in order)
        src = list(graph.model.parameters())
        dst = list(net.parameters())
        assert [q.shape for q in src] == [q.shape for q in dst], "architectures differ"
        for d, q in zip(dst, src):
            d.copy_(q)
    hand = HandLSD(net, a.batch, device, a.seed)
    mismatch = same_computation(graph, hand, device)
    times = interleaved({"flowspec": lambda: engine.step(graph), "hand": hand.step}, device, a.reps, a.inner, a.warmup)
    r = summary(ratios(times["flowspec"], times["hand"]))
    results = {"flowspec_ms": summary(times["flowspec"]), "hand_ms": summary(times["hand"]), "ratio": r,
               "overhead_percent": 100 * (r["median"] - 1), "target_ratio": TARGET,
               "meets_target": r["median"] <= TARGET, "loss_grad_relative_mismatch": mismatch,
               "rounds_flowspec_ms": times["flowspec"], "rounds_hand_ms": times["hand"]}
    config = {"batch": a.batch, "width": a.width, "depth": a.depth, "reps": a.reps, "inner": a.inner,
              "warmup": a.warmup, "threads": threads, "seed": a.seed, "method": "lsd"}
    out = write_result(a.out or default_out("overhead", device), "overhead", device, config, results, started)
    print_table(f"Overhead on {device} (LSD, {a.depth} x {a.width} MLP, batch {a.batch}, {threads} thread(s)); "
                f"loss/grad mismatch {mismatch:.1e}; written to {out}",
                ["step", "ms/step (median)", "ratio flowspec/hand [IQR]", "target"],
                [["hand-written", f"{results['hand_ms']['median']:.2f}", "1", ""],
                 ["flowspec", f"{results['flowspec_ms']['median']:.2f}",
                  f"{r['median']:.4f} [{r['p25']:.4f}, {r['p75']:.4f}]", f"<= {TARGET}"]])
    return results


if __name__ == "__main__":
    main()
