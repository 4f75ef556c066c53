"""Goal 5: principal-subspace extraction for LLaVA-1.5-7B-shaped matrices, our method against torch.linalg.svd.

LLaVA-1.5-7B's language model has 32 layers with q, k, v, o of 4096x4096, gate and up of 11008x4096 and down of
4096x11008 (d_out x d_in): 224 target matrices. Each shape is timed with `principal_basis(..., solver="gram")` (the
default) and with the reference, a full float64 `torch.linalg.svd` (what `solver="svd"` runs), on random weights with
the scale of a trained layer; the full SVD of each shape runs once (minutes on 2 cores), ours before and after it so
that a change of machine load shows. Agreement is measured on the same matrix: the same p, the captured energy, and
the largest principal angle between the two subspaces. The extrapolation multiplies per-shape times by the counts
above (down's 4096x11008 SVD is taken as the 11008x4096 one: the same decomposition transposed).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from keeplora_hf.subspace import principal_basis, principal_rank
from measure import configure_threads, timed, write_result

SHAPES = {"q,k,v,o (4096x4096)": (4096, 4096), "gate,up (11008x4096)": (11008, 4096), "down (4096x11008)": (4096, 11008)}
COUNTS = {"q,k,v,o (4096x4096)": 4 * 32, "gate,up (11008x4096)": 2 * 32, "down (4096x11008)": 32}
SVD_OF = {"down (4096x11008)": "gate,up (11008x4096)"}  # transposed shapes share one SVD timing


def _weight(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """A random weight with a decaying spectrum like a trained one: sigma_i ~ i^-0.5 over a Gaussian matrix."""
    g = torch.Generator().manual_seed(seed)
    d_out, d_in = shape
    w = torch.randn(d_out, d_in, generator=g) * 0.02
    scale = torch.arange(1, d_in + 1, dtype=torch.float32) ** -0.25
    return w * scale  # column scaling gives a mildly decaying spectrum (condition ~ d^0.25)


def _svd_reference(weight: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor]:
    _, singular, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    p = principal_rank(singular.square(), energy)
    return vh[:p].T, singular


def run(energy: float, repeats: int, shapes: list[str]) -> dict:
    rows = {}
    for index, label in enumerate(shapes):
        weight = _weight(SHAPES[label], index)
        ours = [timed(lambda: principal_basis(weight, energy, solver="gram")) for _ in range(repeats)]
        basis = principal_basis(weight, energy, solver="gram")
        row = {"shape": SHAPES[label], "ours_gram_s": ours}
        if label not in SVD_OF:
            holder = {}
            row["torch_svd_float64_s"] = timed(lambda: holder.update(zip(("basis", "singular"), _svd_reference(weight, energy))))
            row["ours_gram_after_s"] = [timed(lambda: principal_basis(weight, energy, solver="gram")) for _ in range(repeats)]
            reference = holder["basis"]
            energy_of = lambda b: float((weight.double() @ b.double()).square().sum())  # noqa: E731
            cosines = torch.linalg.svdvals(reference.T @ basis.double()) if basis.shape[1] else torch.ones(1)
            row["agreement"] = {
                "p_ours": basis.shape[1],
                "p_svd": reference.shape[1],
                "captured_energy_relative_difference": abs(energy_of(basis) - energy_of(reference)) / energy_of(reference),
                "largest_principal_angle_rad": float(torch.arccos(cosines.min().clamp(-1, 1))),
                "p_over_d_in": basis.shape[1] / SHAPES[label][1],
            }
            del holder
        rows[label] = row
        print(label, row, flush=True)
    per_shape = {}
    for label in shapes:
        ours = statistics.median(rows[label]["ours_gram_s"] + rows[label].get("ours_gram_after_s", []))
        svd = rows[SVD_OF.get(label, label)].get("torch_svd_float64_s")
        per_shape[label] = {"ours_s": ours, "torch_svd_s": svd, "speedup": svd / ours if svd else None, "count": COUNTS[label]}
    total_ours = sum(v["ours_s"] * v["count"] for v in per_shape.values())
    total_svd = sum(v["torch_svd_s"] * v["count"] for v in per_shape.values() if v["torch_svd_s"])
    return {
        "principal_energy": energy,
        "repeats": repeats,
        "shapes": rows,
        "per_shape": per_shape,
        "extrapolation_224_layers": {
            "ours_hours": total_ours / 3600,
            "torch_svd_hours": total_svd / 3600,
            "speedup": total_svd / total_ours,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--energy", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    args = parser.parse_args()
    configure_threads(None)
    result = run(args.energy, args.repeats, args.shapes)
    print(write_result("principal_7b_shapes", result))


if __name__ == "__main__":
    main()
