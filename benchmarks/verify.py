"""Independent check of the quality benchmark: recompute the checkerboard KL from the saved samples
with numpy alone (no flowspec, no torch) and compare with the numbers in quality.json.

The exact cell masses are computed here from the board of docs/math.md, "The checkerboard" (uniform
on the 8 squares of side 2 with floor(x / 2) + floor(y / 2) even, on [-4, 4]^2, density 1/32): the mass of a
histogram cell is its overlap area with those squares over 32. KL = sum_{P > 0} P log(P / max(Q, 1e-10)),
Q the fraction of all samples in the cell (samples off the board are lost mass).

    python -m benchmarks.verify                              # benchmarks/results/cpu/quality.json
    python -m benchmarks.verify benchmarks/results/gpu/quality.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def cell_masses(bins: int = 50, half: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    edges = np.linspace(-half, half, bins + 1)
    squares = np.arange(-4, 4, 2.0)  # left edges of the 4 squares per axis

    def overlap(lo, hi):  # (bins, 4): length of [lo_i, hi_i] inside square j
        return np.clip(np.minimum(hi[:, None], squares[None] + 2) - np.maximum(lo[:, None], squares[None]), 0, None)

    ox = overlap(edges[:-1], edges[1:])
    idx = np.floor(squares / 2).astype(int)
    dark = ((idx[:, None] + idx[None, :]) % 2 == 0).astype(float)  # (square x, square y)
    area = ox @ dark @ ox.T  # (cell x, cell y): overlap area with dark squares
    return area / 32.0, edges


def kl(samples: np.ndarray, bins: int = 50) -> float:
    p, edges = cell_masses(bins)
    counts, _, _ = np.histogram2d(samples[:, 0].astype(np.float64), samples[:, 1].astype(np.float64),
                                  bins=[edges, edges])
    q = counts / samples.shape[0]
    m = p > 0
    return float(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], 1e-10))))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", nargs="?", default=str(ROOT / "benchmarks/results/cpu/quality.json"))
    ap.add_argument("--out", default=None, help="default: <stem>-verify.json beside the result")
    a = ap.parse_args(argv)
    path = Path(a.result).resolve()
    record = json.loads(path.read_text())
    npz = np.load(path.with_name(path.stem + "-samples.npz"))
    checks, worst = [], 0.0
    for run in record["results"]["runs"]:
        for row, vals in run["rows"].items():
            if "kl" not in vals:
                continue
            x = npz[f"{run['method']}-seed{run['seed']}/{row}"]
            mine = kl(x)
            diff = abs(mine - vals["kl"])
            worst = max(worst, diff)
            checks.append({"method": run["method"], "seed": run["seed"], "row": row, "reported": vals["kl"],
                           "recomputed": mine, "abs_diff": diff, "n": int(x.shape[0])})
    source = str(path.relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)
    result = {"benchmark": "verify", "source": source,
              "checked": len(checks), "max_abs_diff": worst, "checks": checks}
    out = Path(a.out) if a.out else path.with_name(path.stem + "-verify.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nverify: {len(checks)} KL values recomputed from saved samples with numpy; "
          f"max |difference| = {worst:.2e}; written to {out}")
    return result


if __name__ == "__main__":
    main()
