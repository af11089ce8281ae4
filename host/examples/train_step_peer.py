#!/usr/bin/env python3
"""PyTorch CPU peer of train_step_bench.rs: the same U-Net (models/src/unet.rs with the
training recipe's batch norm), the same loss (cross-entropy + foreground soft Dice), Adam,
batch 4, the same thread count.

    python3 host/examples/train_step_peer.py [--alphas 1/16,1/8,1/4] [--sizes 128,256]
        [--batch 4] [--iters 3] [--warmup 1] [--threads 2] [--what train,infer]

Prints `bench <train|infer> alpha=<a> size=<s> batch=<b> mode=torch ms=<median>` lines,
the format of the Rust bench.
"""
import argparse
import statistics
import time
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F

WIDTHS = [64, 128, 256, 512]
BOTTLENECK = 1024


def scale(base, alpha):
    # round_half_up(base * alpha), exact (shared/src/alpha.rs).
    n, d = base * alpha.numerator, alpha.denominator
    c = (2 * n + d) // (2 * d)
    assert c > 0
    return c


def conv_bn_relu(cin, cout):
    # Hidden layer with batch norm: 3x3 same conv without bias, BN(eps 1e-5), ReLU.
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1), nn.ReLU(inplace=True)]


class UNet(nn.Module):
    def __init__(self, alpha, in_channels=1, classes=2):
        super().__init__()
        w = [scale(b, alpha) for b in WIDTHS]
        bott = scale(BOTTLENECK, alpha)
        self.enc = nn.ModuleList()
        c = in_channels
        for wi in w:
            self.enc.append(nn.Sequential(*conv_bn_relu(c, wi), *conv_bn_relu(wi, wi)))
            c = wi
        self.mid = nn.Sequential(*conv_bn_relu(c, bott), *conv_bn_relu(bott, bott))
        c = bott
        self.ups = nn.ModuleList()
        self.dec = nn.ModuleList()
        for wi in reversed(w):
            self.ups.append(nn.ConvTranspose2d(c, wi, 2, stride=2, bias=True))
            self.dec.append(nn.Sequential(*conv_bn_relu(2 * wi, wi), *conv_bn_relu(wi, wi)))
            c = wi
        self.head = nn.Conv2d(c, classes, 1, bias=True)

    def forward(self, x):
        skips = []
        for block in self.enc:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2, 2)
        x = self.mid(x)
        for up, block, skip in zip(self.ups, self.dec, reversed(skips)):
            x = block(torch.cat([skip, up(x)], dim=1))
        return self.head(x)


def loss_fn(logits, onehot):
    # host/src/train/loss.rs: CE + (1 - soft Dice over foreground classes, batch sums).
    logp = F.log_softmax(logits, dim=1)
    ce = -(logp * onehot).sum(1).mean()
    p = logp.exp()[:, 1:]
    y = onehot[:, 1:]
    per_class = lambda t: t.transpose(0, 1).flatten(1).sum(-1)
    dice = (2 * per_class(p * y) + 1) / (per_class(p) + per_class(y) + 1)
    return ce + (1 - dice.mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--alphas", default="1/16,1/8,1/4")
    ap.add_argument("--sizes", default="128,256")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--what", default="train,infer")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"# torch {torch.__version__} CPU, {torch.get_num_threads()} threads, "
          f"batch {a.batch}, median of {a.iters} after {a.warmup} warm-up")
    for alpha_s in a.alphas.split(","):
        alpha = Fraction(alpha_s)
        for s in [int(v) for v in a.sizes.split(",")]:
            x = torch.randn(a.batch, 1, s, s)
            fg = (torch.rand(a.batch, 1, s, s) < 0.3).float()
            y = torch.cat([1 - fg, fg], dim=1)
            for what in a.what.split(","):
                net = UNet(alpha)
                opt = torch.optim.Adam(net.parameters(), lr=1e-3)
                times = []
                for i in range(a.warmup + a.iters):
                    t = time.perf_counter()
                    if what == "train":
                        net.train()
                        opt.zero_grad(set_to_none=True)
                        l = loss_fn(net(x), y)
                        l.backward()
                        opt.step()
                        float(l.detach())
                    else:
                        net.eval()
                        with torch.no_grad():
                            float(net(x).sum())
                    dt = time.perf_counter() - t
                    if i >= a.warmup:
                        times.append(dt)
                print(f"bench {what} alpha={alpha_s} size={s} batch={a.batch} mode=torch "
                      f"ms={1e3 * statistics.median(times):.1f}", flush=True)


if __name__ == "__main__":
    main()
