#!/usr/bin/env python3
"""Host latency of the device engine against PyTorch CPU and tract on the same U-Net.

    python3 device/benches/latency_compare.py [--side 256] [--alphas 16 8] [--runs 30]

1. Builds `device/bench-peers` (its own cargo workspace: tract is not part of the main
   workspace) and writes, for every alpha = 1/DEN, the U-Net with deterministic weights
   (ReLUs fused as packing does) as an f32 container plus the same graph and weights for
   PyTorch, one input image and the device engine's logits on it
   (under target/latency-compare/).
2. Builds the identical network in PyTorch from those weights (F.conv2d, ...), checks its
   logits against the device engine's, exports it to ONNX (logits and arg-max mask).
3. Times, on that input (median of RUNS after 2 warm-up runs, the whole network up to the
   mask): the device engine (release, fast kernels, one thread), PyTorch CPU with 1 and
   2 threads, tract with 1 thread (whose logits are checked against the device's too).
4. Prints the table of median milliseconds and the ratios device / peer.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4


def build_peers():
    cmd = ["cargo", "build", "--release", "--message-format=json-render-diagnostics",
           "--manifest-path", str(ROOT / "device/bench-peers/Cargo.toml")]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    exe = None
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
            exe = msg["executable"]
    if exe is None:
        sys.exit("cargo did not report the ccnet-bench-peers executable")
    return exe


class GraphNet(torch.nn.Module):
    """The ccnet graph (serde JSON of `ccnet_shared::graph::Op`) run with torch ops."""

    def __init__(self, spec, weights):
        super().__init__()
        self.graph = spec["graph"]
        self.params = {}
        for i, t in enumerate(spec["tensors"]):
            v = torch.from_numpy(weights[t["offset"]:t["offset"] + t["len"]].copy())
            dims = [d for d in t["dims"] if d != 0] or [1]
            # Conv weights are [out, in, k, k] (transposed: [in, out, k, k]); biases [out].
            v = v.reshape(dims if t["role"] == "Weight" else [-1])
            name = f"p{i}"
            self.register_buffer(name, v)
            self.params[(t["node"], t["role"])] = name

    def p(self, node, role):
        name = self.params.get((node, role))
        return None if name is None else getattr(self, name)

    def forward(self, x):
        vals = []
        out = None
        for i, op in enumerate(self.graph):
            (kind, a), = op.items() if isinstance(op, dict) else ((op, None),)
            if kind == "Input":
                y = x
            elif kind == "Conv2d":
                y = F.conv2d(vals[a["input"]], self.p(i, "Weight"), self.p(i, "Bias"),
                             stride=a["stride"], padding=a["padding"], dilation=a["dilation"])
                y = F.relu(y) if a["relu"] else y
            elif kind == "ConvTranspose2d":
                y = F.conv_transpose2d(vals[a["input"]], self.p(i, "Weight"), self.p(i, "Bias"),
                                       stride=a["stride"], padding=a["padding"])
                y = F.relu(y) if a["relu"] else y
            elif kind == "Relu":
                y = F.relu(vals[a["input"]])
            elif kind == "MaxPool":
                y = F.max_pool2d(vals[a["input"]], a["kernel"], a["stride"])
            elif kind == "Upsample":
                y = F.interpolate(vals[a["input"]], scale_factor=a["factor"], mode="nearest")
            elif kind == "Concat":
                y = torch.cat([vals[a["a"]], vals[a["b"]]], dim=1)
            elif kind == "Add":
                y = vals[a["a"]] + vals[a["b"]]
            elif kind == "Softmax":
                y = torch.softmax(vals[a["input"]], dim=1)
            elif kind == "Argmax":
                y = torch.argmax(vals[a["input"]], dim=1, keepdim=True)
            else:
                raise ValueError(f"unsupported op {kind}")
            vals.append(y)
        return vals[self.logits], vals[-1]


def load_net(d, den):
    spec = json.loads((d / f"unet_a{den}.json").read_text())
    w = np.fromfile(d / f"unet_a{den}.bin", dtype="<f4")
    net = GraphNet(spec, w).eval()
    net.logits = spec["logits_node"]
    return net


def time_torch(net, x, threads, runs):
    torch.set_num_threads(threads)
    ts = []
    with torch.inference_mode():
        for i in range(runs + 2):
            t = time.perf_counter()
            net(x)
            if i >= 2:
                ts.append((time.perf_counter() - t) * 1e3)
    return float(np.median(ts)), float(np.min(ts))


def run_peer(exe, args):
    out = subprocess.run([exe, *map(str, args)], check=True, stdout=subprocess.PIPE,
                         text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--alphas", type=int, nargs="+", default=[16, 8],
                    help="denominators DEN of alpha = 1/DEN")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "target/latency-compare"))
    args = ap.parse_args()
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    exe = build_peers()
    subprocess.run([exe, "gen", str(d), str(args.side), *map(str, args.alphas)], check=True)
    x_np = np.fromfile(d / f"input_{args.side}.bin", dtype="<f4")
    x = torch.from_numpy(x_np.copy()).reshape(1, 1, args.side, args.side)
    rows = []
    for den in args.alphas:
        net = load_net(d, den)
        torch.set_num_threads(1)
        with torch.inference_mode():
            logits, _ = net(x)
        want = np.fromfile(d / f"logits_a{den}.bin", dtype="<f4")
        diff_torch = float(np.abs(logits.numpy().ravel() - want).max())
        onnx = d / f"unet_a{den}.onnx"
        torch.onnx.export(net, (x,), str(onnx), input_names=["x"],
                          output_names=["logits", "mask"], opset_version=17, dynamo=False)
        dev = run_peer(exe, ["device", d / f"unet_a{den}.ccn", args.side, args.runs])
        tr = run_peer(exe, ["tract", onnx, args.side, args.runs, d / f"input_{args.side}.bin",
                            d / f"logits_a{den}.bin"])
        diff_tract = float(tr["max_abs_diff_vs_device"])
        t1 = time_torch(net, x, 1, args.runs)
        t2 = time_torch(net, x, 2, args.runs)
        rows.append((den, (float(dev["median_ms"]), float(dev["min_ms"])), t1, t2,
                     (float(tr["median_ms"]), float(tr["min_ms"])), diff_torch, diff_tract))
        if max(diff_torch, diff_tract) > TOL:
            print(f"WARNING: alpha=1/{den}: logits differ by more than {TOL}", file=sys.stderr)
    print()
    load = os.getloadavg()
    print(f"U-Net, 1 input channel, {args.side}x{args.side}, f32, {args.runs} runs after 2 warm-up "
          f"runs (torch {torch.__version__}, {os.cpu_count()} CPUs, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end)")
    for k, what in ((0, "median"), (1, "minimum")):
        print(f"\n{what} ms:")
        print("| alpha | device 1T | PyTorch 1T | PyTorch 2T | tract 1T "
              "| device/PyTorch 1T | device/PyTorch 2T | device/tract 1T "
              "| max abs logit diff vs device: torch, tract |")
        print("|---|---|---|---|---|---|---|---|---|")
        for den, dv, t1, t2, tr, d1, d2 in rows:
            dv, t1, t2, tr = dv[k], t1[k], t2[k], tr[k]
            print(f"| 1/{den} | {dv:.2f} | {t1:.2f} | {t2:.2f} | {tr:.2f} | {dv / t1:.2f} "
                  f"| {dv / t2:.2f} | {dv / tr:.2f} | {d1:.1e}, {d2:.1e} |")

if __name__ == "__main__":
    main()
