"""Peak memory of the two largest CPU workloads, each measured in a fresh process.

    OMP_NUM_THREADS=1 python tests/bench_memory.py                 # both cases, default sizes
    OMP_NUM_THREADS=1 python tests/bench_memory.py eval --n 30000 --dim 1800 --chunk 4096
    OMP_NUM_THREADS=1 python tests/bench_memory.py gat --nodes 100000 --triples 1000000 --dim 300

* eval: utils.evaluate_alignment on n test pairs of random (2n, dim) embeddings, i.e. n x n
  candidates in both directions with CSLS, chunked by ``--chunk`` query rows (train.py's
  --eval_chunk); 1800 = 6 modalities x 300, the fused size of the paper's configuration.
* gat: forward and backward of layers.GraphStructureEncoder (2 layers, 2 heads, diagonal weight)
  over a random graph of ``--triples`` (head, tail) pairs, stored as both directions plus self
  loops, as train.py builds it.

Peak memory is the process's peak resident set size (resource.getrusage ru_maxrss), which
includes the Python interpreter, torch and the inputs; "inputs" is the RSS once the inputs exist,
so peak - inputs is what the computation itself adds. Not collected by pytest (bench_*).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layers import GraphStructureEncoder, SparseGraph  # noqa: E402
from utils import evaluate_alignment  # noqa: E402


def rss_gib(current: bool = False) -> float:
    if current:  # the resident set now, from /proc (Linux)
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def bench_eval(n: int, dim: int, chunk: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(2 * n, dim, generator=gen)  # (2n, D): left entities 0..n-1, right n..2n-1
    pairs = np.stack([np.arange(n), np.arange(n, 2 * n)], 1)  # (n, 2)
    inputs = rss_gib(current=True)
    tic = time.perf_counter()
    res = evaluate_alignment(emb, pairs, csls_k=3, use_csls=True, chunk=chunk)
    return {"case": f"evaluate_alignment n={n} x {n} dim={dim} chunk={chunk} csls_k=3",
            "seconds": time.perf_counter() - tic, "inputs_gib": inputs, "peak_gib": rss_gib(),
            "check": f"mrr={res['avg']['mrr']:.5f} (random embeddings: about H_n / n)"}


def bench_gat(nodes: int, triples: int, dim: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    heads = torch.randint(0, nodes, (triples,), generator=gen)
    tails = torch.randint(0, nodes, (triples,), generator=gen)
    graph = SparseGraph.undirected_with_self_loops(heads, tails, nodes)
    del heads, tails
    torch.manual_seed(0)
    encoder = GraphStructureEncoder(nodes, dim, heads=2, layers=2)
    inputs = rss_gib(current=True)
    tic = time.perf_counter()
    out = encoder(graph)  # (N, D)
    out.square().mean().backward()
    grad = encoder.entity.weight.grad
    return {"case": f"GAT forward+backward nodes={nodes} triples={triples} directed_edges={graph.num_edges} "
                    f"dim={dim} heads=2 layers=2",
            "seconds": time.perf_counter() - tic, "inputs_gib": inputs, "peak_gib": rss_gib(),
            "check": f"grad finite: {bool(torch.isfinite(grad).all())}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", nargs="?", choices=("eval", "gat"), help="one case in this process (default: both, "
                   "each in a fresh process)")
    p.add_argument("--n", type=int, default=30000, help="eval: test pairs (candidates per direction)")
    p.add_argument("--dim", type=int, default=None, help="embedding size (default: 1800 for eval, 300 for gat)")
    p.add_argument("--chunk", type=int, default=4096, help="eval: query rows per block")
    p.add_argument("--nodes", type=int, default=100000, help="gat: entities")
    p.add_argument("--triples", type=int, default=1000000, help="gat: (head, tail) pairs")
    args = p.parse_args()
    if args.case is None:
        extra = sys.argv[1:]
        for case in ("eval", "gat"):
            subprocess.run([sys.executable, __file__, case, *extra], check=True)
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    if args.case == "eval":
        r = bench_eval(args.n, args.dim or 1800, args.chunk)
    else:
        r = bench_gat(args.nodes, args.triples, args.dim or 300)
    print(f"{r['case']}: peak RSS {r['peak_gib']:.2f} GiB (inputs {r['inputs_gib']:.2f} GiB), "
          f"{r['seconds']:.1f} s; {r['check']}", flush=True)


if __name__ == "__main__":
    main()
