#!/usr/bin/env python3
"""Side-by-side throughput benchmark: `ccnet complexity` against its Python peer
(complexity_peer.py: Pillow JPEG + scikit-image blob_log), same images, same J and B.

    python3 host/benches/complexity_bench.py [--ccnet BIN] [--datasets DIR] [NAME...]

BIN defaults to $CARGO_TARGET_DIR/release/ccnet (else target/release/ccnet in the
repository; build it with `cargo build --release -p ccnet-host`). DIR defaults to
$CCNET_DATASETS, else ../shared/datasets beside the repository. NAMEs default to the
seven datasets of docs/complexity.md.

For each dataset, one after the other:
  1. ccnet with RAYON_NUM_THREADS=1 (`ccnet complexity DIR --json`, all eight measures);
  2. the peer with OMP_NUM_THREADS=1 (J and B only);
  3. ccnet with RAYON_NUM_THREADS=2.
ccnet's CPU time is the whole command's user + system time (start-up, decoding and
mask checks included), from getrusage of the child. The peer's CPU time is its
measuring loop's `time.process_time()` (decoding included, interpreter start-up and
imports excluded: about a second per dataset in the peer's favour). Wall-clock times
are printed too, but on a shared machine only CPU time is comparable.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_NAMES = ["isbi2012_em", "drive", "dsb2018_nuclei", "glas", "isic2017", "kvasir_seg", "busi"]
ONE_THREAD = {k: "1" for k in ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"]}


def run(cmd, env):
    """(stdout, child CPU seconds, wall seconds) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{p.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return p.stdout, cpu, wall


def versions():
    import numpy, PIL, scipy, skimage  # noqa: E401 (only for the record)
    return (f"Python {platform.python_version()}, numpy {numpy.__version__}, scipy {scipy.__version__}, "
            f"scikit-image {skimage.__version__}, Pillow {PIL.__version__}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    ap.add_argument("--ccnet", type=Path, default=target / "release" / "ccnet")
    ap.add_argument("--datasets", type=Path,
                    default=Path(os.environ.get("CCNET_DATASETS", REPO.parent / "shared" / "datasets")))
    ap.add_argument("names", nargs="*", default=DEFAULT_NAMES)
    a = ap.parse_args()
    if not a.ccnet.is_file():
        sys.exit(f"{a.ccnet}: no ccnet binary (cargo build --release -p ccnet-host, or --ccnet)")
    print(f"# {versions()}; ccnet {a.ccnet}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    rows = []
    for name in a.names:
        d = a.datasets / name
        out, c1, w1 = run([a.ccnet, "complexity", d, "--json"], {"RAYON_NUM_THREADS": "1"})
        rep = json.loads(out)["datasets"][0]
        out, pcpu_all, pwall = run([sys.executable, HERE / "complexity_peer.py", "--json", d], ONE_THREAD)
        peer = json.loads(out.strip().splitlines()[-1])
        _, c2, w2 = run([a.ccnet, "complexity", d, "--json"], {"RAYON_NUM_THREADS": "2"})
        n = rep["images"]
        assert n == peer["images"], f"{name}: ccnet saw {n} images, the peer {peer['images']}"
        r = dict(name=name, n=n, pj=peer["j"], cj=rep["mean"]["j"], pb=peer["b"], cb=rep["mean"]["b"],
                 peer_cpu=peer["cpu_s"], peer_cpu_all=pcpu_all, peer_wall=pwall,
                 c1_cpu=c1, c1_wall=w1, c2_cpu=c2, c2_wall=w2)
        rows.append(r)
        print(f"{name:<16} n={n:4d}  peer {n / r['peer_cpu']:6.2f} img/CPU-s  "
              f"ccnet 1 thread {n / c1:6.1f} img/CPU-s  ratio {r['peer_cpu'] / c1:5.1f}x  "
              f"ccnet 2 threads {n / c2:6.1f} img/CPU-s, {n / w2:6.1f} img/s wall", flush=True)
    tot = {k: sum(r[k] for r in rows) for k in ["n", "peer_cpu", "peer_cpu_all", "peer_wall",
                                                 "c1_cpu", "c1_wall", "c2_cpu", "c2_wall"]}
    print(f"# load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| dataset | peer J / ccnet J | peer B / ccnet B | peer img/CPU-s | ccnet img/CPU-s (1 thread) "
          "| ratio | ccnet 2 threads img/CPU-s | ccnet 2 threads img/s (wall) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["n"]
        print(f"| {r['name']} | {r['pj']:.4f} / {r['cj']:.4f} | {r['pb']:.4f} / {r['cb']:.4f} "
              f"| {n / r['peer_cpu']:.2f} | {n / r['c1_cpu']:.1f} | {r['peer_cpu'] / r['c1_cpu']:.1f}× "
              f"| {n / r['c2_cpu']:.1f} | {n / r['c2_wall']:.1f} |")
    n = tot["n"]
    print(f"| all {n} images | | | {n / tot['peer_cpu']:.2f} | {n / tot['c1_cpu']:.1f} "
          f"| {tot['peer_cpu'] / tot['c1_cpu']:.1f}× | {n / tot['c2_cpu']:.1f} | {n / tot['c2_wall']:.1f} |")
    print(f"\nCPU seconds: peer loop {tot['peer_cpu']:.1f} (whole peer processes {tot['peer_cpu_all']:.1f}), "
          f"ccnet 1 thread {tot['c1_cpu']:.2f}, ccnet 2 threads {tot['c2_cpu']:.2f}; wall seconds: "
          f"peer {tot['peer_wall']:.1f}, ccnet 1 thread {tot['c1_wall']:.2f}, 2 threads {tot['c2_wall']:.2f}")
    print(f"ratio with the whole peer processes (start-up and imports counted): "
          f"{tot['peer_cpu_all'] / tot['c1_cpu']:.1f}×")


if __name__ == "__main__":
    main()
