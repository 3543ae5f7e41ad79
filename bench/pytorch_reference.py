"""PyTorch reference for `reprise bench`: the same models, data, batch, optimiser and threads.

`reprise bench` runs this script (with Debian's python3-torch) next to its own training loop so
that both speeds come from one run on one machine. Each architecture mirrors src/models/*.rs
exactly: layer sizes, which layers have a bias (the classifier never does), BatchNorm, pooling,
the ViT's pre-norm blocks with exact GELU and a cls-token readout. Data: the first
128·⌊5000/128⌋ images of data/mnist_5k.csv.gz in file order, values/255 scaled to [-1, 1] as
src/methods/supervised.rs does; SGD lr 0.05 momentum 0.9, cross-entropy. Each step is timed on
its own after the warm-up steps and the median is reported, which is robust to other processes
sharing the machine.

`conv4-maml` is a meta-learning step instead (src/models/functional.rs and `MamlLearner` in
src/cli/bench.rs): the functional Conv-4 of Bayesian TAML (conv 3×3 with bias → BatchNorm on the
batch's statistics, shift only, eps 1e-3 → ReLU → max-pool 2, ×4, then a linear head with bias),
written with torch.nn.functional and parameters passed as tensors. Each batch is a task: support =
its first half, query = its second half. One step: support loss at (body, zero head), its gradient
by torch.autograd.grad (first order: no create_graph), fast weights θ − 0.5·g, query loss at them,
backward to the body, SGD as above on the body (the head is not meta-learned). `mlp-maml` is the
same step for the functional MLP 784-256-128-10 (biases, ReLU; no zero head: every parameter takes
the inner step, lr 0.1, and is meta-learned). `wamal` is report 002's training step (see
`WamalTrainer`).

Usage: python3 bench/pytorch_reference.py [--model NAME]... [--threads N] [--steps N]
       [--warmup N] [--batch N] [--data PATH] [--clock wall|cpu] [--device cpu|cuda[:N]] [--json]
       python3 bench/pytorch_reference.py --serve [--threads N] [--batch N] [--data PATH]
       [--clock wall|cpu] [--device cpu|cuda[:N]]
With --serve (how `reprise bench` drives it, alternating rounds of its own steps and ours so
that both see the same machine load) it reads lines `MODEL STEPS` on stdin, trains that model
STEPS more steps (building it on first use) and answers one JSON line with the step times.
With --device cuda the model and the batches live on the GPU and each step is timed up to the end
of its GPU work (torch.cuda.synchronize).
"""

import argparse
import gzip
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Mlp(nn.Module):
    """flatten → Linear(CHW, 256m) → ReLU → Linear(256m, 128m) → ReLU → classifier."""

    def __init__(self, c, h, w, classes, m=1):
        super().__init__()
        self.fc1 = nn.Linear(c * h * w, 256 * m)
        self.fc2 = nn.Linear(256 * m, 128 * m)
        self.classifier = nn.Linear(128 * m, classes, bias=False)

    def forward(self, x):
        x = F.relu(self.fc1(x.flatten(1)))
        return self.classifier(F.relu(self.fc2(x)))


class Cnn(nn.Module):
    """conv3×3(32m) → ReLU → pool → conv3×3(64m) → ReLU → pool → Linear(128m) → ReLU → classifier."""

    def __init__(self, c, h, w, classes, m=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 32 * m, 3, padding=1)
        self.conv2 = nn.Conv2d(32 * m, 64 * m, 3, padding=1)
        self.fc = nn.Linear(64 * m * (h // 4) * (w // 4), 128 * m)
        self.classifier = nn.Linear(128 * m, classes, bias=False)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.classifier(F.relu(self.fc(x.flatten(1))))


class ConvBn(nn.Module):
    def __init__(self, cin, cout, k, stride):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.first = ConvBn(cin, cout, 3, stride)
        self.second = ConvBn(cout, cout, 3, 1)
        self.shortcut = ConvBn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        h = self.second(F.relu(self.first(x)))
        skip = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(h + skip)


class ResNet(nn.Module):
    """stem conv/BN/ReLU (16m) → blocks 16m, 32m, 64m (stride 1, 2, 2) → global mean → classifier."""

    def __init__(self, c, h, w, classes, m=1):
        super().__init__()
        widths = [16 * m, 32 * m, 64 * m]
        self.stem = ConvBn(c, widths[0], 3, 1)
        stages, cin = [], widths[0]
        for i, cout in enumerate(widths):
            stages.append(BasicBlock(cin, cout, 1 if i == 0 else 2))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(widths[2], classes, bias=False)

    def forward(self, x):
        h = self.stages(F.relu(self.stem(x)))
        return self.classifier(h.flatten(2).mean(2))


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.heads = heads

    def forward(self, x):
        n, t, d = x.shape
        dh = d // self.heads
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, dh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(dh))).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, d, mlp, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.attn = Attention(d, heads)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)
        self.fc1 = nn.Linear(d, mlp)
        self.fc2 = nn.Linear(mlp, d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Vit(nn.Module):
    """patch conv (patch = H/4, dim 64m) + cls token + position embedding → 2 pre-norm blocks
    (4 heads, MLP 128m, exact GELU) → final LayerNorm of the cls token → classifier."""

    def __init__(self, c, h, w, classes, m=1):
        super().__init__()
        patch, d = h // 4, 64 * m
        tokens = (h // patch) * (w // patch)
        self.patch_embed = nn.Conv2d(c, d, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, 128 * m, 4) for _ in range(2)])
        self.norm = nn.LayerNorm(d, eps=1e-5)
        self.classifier = nn.Linear(d, classes, bias=False)

    def forward(self, x):
        n = x.shape[0]
        p = self.patch_embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(n, -1, -1), p], 1) + self.pos_embed
        h = self.blocks(h)
        return self.classifier(self.norm(h[:, 0]))


class Conv4(nn.Module):
    """4 × [conv3×3 (32m, no bias) → BN → ReLU → maxpool 2 (skipped below 2×2)] → flatten → classifier."""

    def __init__(self, c, h, w, classes, m=1):
        super().__init__()
        width = 32 * m
        self.convs, self.bns, self.pools = nn.ModuleList(), nn.ModuleList(), []
        cin = c
        for _ in range(4):
            pool = h >= 2 and w >= 2
            if pool:
                h, w = h // 2, w // 2
            self.convs.append(nn.Conv2d(cin, width, 3, padding=1, bias=False))
            self.bns.append(nn.BatchNorm2d(width))
            self.pools.append(pool)
            cin = width
        self.classifier = nn.Linear(width * h * w, classes, bias=False)

    def forward(self, x):
        for conv, bn, pool in zip(self.convs, self.bns, self.pools):
            x = F.relu(bn(conv(x)))
            if pool:
                x = F.max_pool2d(x, 2)
        return self.classifier(x.flatten(1))


class FunctionalConv4:
    """Bayesian TAML's learner with its parameters as arguments: 4 × [conv3×3 (hidden, with bias)
    → BatchNorm with the batch's statistics, shift only, eps 1e-3 → ReLU → maxpool 2 (skipped
    below 2×2)] → flatten → linear head with bias. Parameters: per block (weight, bias, shift),
    then the head's (weight, bias)."""

    def __init__(self, c, h, w, classes, hidden=32, eps=1e-3):
        self.eps, self.classes = eps, classes
        self.pools, self.body = [], []
        cin = c
        for _ in range(4):
            pool = h >= 2 and w >= 2
            if pool:
                h, w = h // 2, w // 2
            self.pools.append(pool)
            conv = nn.Conv2d(cin, hidden, 3, padding=1)  # PyTorch's default initialisation
            self.body += [conv.weight.detach().clone().requires_grad_(),
                          conv.bias.detach().clone().requires_grad_(),
                          torch.zeros(hidden, requires_grad=True)]
            cin = hidden
        self.dim = hidden * h * w

    def zero_head(self, device):
        return [torch.zeros(self.classes, self.dim, device=device, requires_grad=True),
                torch.zeros(self.classes, device=device, requires_grad=True)]

    def forward(self, params, x):
        for b, pool in enumerate(self.pools):
            weight, bias, shift = params[3 * b:3 * b + 3]
            x = F.conv2d(x, weight, bias, padding=1)
            x = F.relu(F.batch_norm(x, None, None, None, shift, training=True, eps=self.eps))
            if pool:
                x = F.max_pool2d(x, 2)
        return F.linear(x.flatten(1), params[-2], params[-1])


class FunctionalMlp:
    """`mlp-maml`'s network with its parameters as arguments: linear layers with biases and ReLU
    between them (784-256-128-10, PyTorch's default initialisation). Parameters: per layer
    (weight, bias). Every parameter is meta-learned, so there is no separate head."""

    WIDTHS = (784, 256, 128, 10)

    def __init__(self):
        self.body = []
        for fan_in, fan_out in zip(self.WIDTHS, self.WIDTHS[1:]):
            layer = nn.Linear(fan_in, fan_out)
            self.body += [layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()]

    def zero_head(self, device):
        return []

    def forward(self, params, x):
        h = x.flatten(1)
        layers = len(params) // 2
        for i in range(layers):
            h = F.linear(h, params[2 * i], params[2 * i + 1])
            if i + 1 < layers:
                h = F.relu(h)
        return h


class MamlTrainer:
    """`conv4-maml` and `mlp-maml`: one first-order MAML step per batch (see the module
    docstring)."""

    INNER_LR = {"conv4-maml": 0.5, "mlp-maml": 0.1}

    def __init__(self, name, batches, clock=time.perf_counter, device="cpu"):
        torch.manual_seed(0)
        self.net = FunctionalMlp() if name == "mlp-maml" else FunctionalConv4(1, 28, 28, 10)
        self.inner_lr = self.INNER_LR[name]
        for p in self.net.body:
            p.data = p.data.to(device)
        self.device = device
        self.sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        self.opt = torch.optim.SGD(self.net.body, lr=0.05, momentum=0.9)
        self.batches = batches
        self.clock = clock
        self.step = 0

    def run(self, steps):
        """Train `steps` steps; the wall time of each."""
        times = []
        for _ in range(steps):
            x, y = self.batches[self.step % len(self.batches)]
            self.step += 1
            half = len(y) // 2
            self.sync()
            t0 = self.clock()
            self.opt.zero_grad(set_to_none=True)
            theta = self.net.body + self.net.zero_head(self.device)
            support = F.cross_entropy(self.net.forward(theta, x[:half]), y[:half])
            grads = torch.autograd.grad(support, theta)
            fast = [p - self.inner_lr * g for p, g in zip(theta, grads)]
            F.cross_entropy(self.net.forward(fast, x[half:]), y[half:]).backward()
            self.opt.step()
            self.sync()
            times.append(self.clock() - t0)
        return times


class WamalTrainer:
    """`wamal`: report 002's training step (src/methods/wamal, `WamalLearner` in src/cli/bench.rs).

    Two networks of the same shape, parameters as tensors: a backbone 784 → 128 → 64 (ReLU after
    both layers) and two heads Lin(64, 64)-ReLU-Lin(64, k). The multi-task network θ1 has a primary
    head (k = 5: the digit mod 5) and an auxiliary head (k = 10 = Σψ, ψ = 2); the generator θ2 a
    label head (k = 10), masked to the primary class's block, and a weight head (k = 1) → sigmoid
    s, w = 2^(2·15·s − 15). Loss: the focal loss on probabilities, γ = 2. Per batch: level 1,
    θ1 ← SGD(lr 0.01, momentum 0.9) on L1 = mean ℓ(p, y) + mean w·ℓ(q, ŷ) with θ2 fixed; level 2,
    θ1⁺ = θ1 − 0.01·∇L1 (create_graph), M = mean ℓ(p(θ1⁺), y) + 0.2 Σ ȳ log ȳ, θ2 ← SGD(lr 1e-3,
    weight decay 5e-4) on ∇θ2 M (second order through the unrolled step)."""

    PSI, PRIMARY, RANGE, GAMMA = 2, 5, 15.0, 2.0

    def __init__(self, name, batches, clock=time.perf_counter, device="cpu"):
        torch.manual_seed(0)

        def part(widths):
            out = []
            for fan_in, fan_out in zip(widths, widths[1:]):
                layer = nn.Linear(fan_in, fan_out)
                out += [layer.weight.detach().clone().to(device).requires_grad_(), layer.bias.detach().clone().to(device).requires_grad_()]
            return out

        k = self.PSI * self.PRIMARY
        self.theta = part([784, 128, 64]) + part([64, 64, self.PRIMARY]) + part([64, 64, k])
        self.phi = part([784, 128, 64]) + part([64, 64, k]) + part([64, 64, 1])
        self.opt = torch.optim.SGD(self.theta, lr=0.01, momentum=0.9)
        self.gen_opt = torch.optim.SGD(self.phi, lr=1e-3, weight_decay=5e-4)
        self.blocks = torch.arange(k, device=device) // self.PSI
        self.device = device
        self.sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        self.batches = batches
        self.clock = clock
        self.step = 0

    @staticmethod
    def two_layer(p, x, relu_last):
        o = F.linear(F.relu(F.linear(x, p[0], p[1])), p[2], p[3])
        return F.relu(o) if relu_last else o

    def learner(self, theta, x):
        f = self.two_layer(theta[0:4], x, True)
        return self.two_layer(theta[4:8], f, False), self.two_layer(theta[8:12], f, False)

    def generator(self, x, mask):
        f = self.two_layer(self.phi[0:4], x, True)
        a = self.two_layer(self.phi[4:8], f, False)
        e = torch.exp(a - a.masked_fill(mask == 0, float("-inf")).amax(1, keepdim=True)) * mask
        labels = e / (e.sum(1, keepdim=True) + 1e-12)
        s = torch.sigmoid(self.two_layer(self.phi[8:12], f, False).squeeze(1))
        return labels, torch.exp2(2 * self.RANGE * s - self.RANGE)

    def focal(self, logits, targets):
        p = F.softmax(logits, dim=1)
        return -(targets * (1 - p) ** self.GAMMA * torch.log(p + 1e-20)).sum(1)

    def run(self, steps):
        """Train `steps` steps; the wall time of each."""
        times = []
        for _ in range(steps):
            x, y = self.batches[self.step % len(self.batches)]
            self.step += 1
            self.sync()
            t0 = self.clock()
            x = x.flatten(1)
            primary = y % self.PRIMARY
            onehot = F.one_hot(primary, self.PRIMARY).to(x.dtype)
            mask = (self.blocks[None, :] == primary[:, None]).to(x.dtype)
            # Level 1: θ1 on L1, the generator's outputs fixed.
            self.opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                target, w = self.generator(x, mask)
            p, q = self.learner(self.theta, x)
            (self.focal(p, onehot).mean() + (w * self.focal(q, target)).mean()).backward()
            self.opt.step()
            # Level 2: θ2 through one unrolled step of θ1.
            self.gen_opt.zero_grad(set_to_none=True)
            target, w = self.generator(x, mask)
            p, q = self.learner(self.theta, x)
            l1 = self.focal(p, onehot).mean() + (w * self.focal(q, target)).mean()
            grads = torch.autograd.grad(l1, self.theta, create_graph=True)
            fast = [t - 0.01 * g for t, g in zip(self.theta, grads)]
            p_fast, _ = self.learner(fast, x)
            mean_label = target.mean(0)
            meta = self.focal(p_fast, onehot).mean() + 0.2 * (mean_label * torch.log(mean_label + 1e-20)).sum()
            self.phi_grads = torch.autograd.grad(meta, self.phi)
            for t, g in zip(self.phi, self.phi_grads):
                t.grad = g
            self.gen_opt.step()
            self.sync()
            times.append(self.clock() - t0)
        return times


# name → (class, width multiplier); the names `reprise bench` uses.
MODELS = {
    "mlp-512": (Mlp, 2),  # 784-512-256-10
    "mlp": (Mlp, 1),  # 784-256-128-10, the report's MLP
    "cnn": (Cnn, 1),
    "resnet": (ResNet, 1),
    "vit": (Vit, 1),
    "conv4": (Conv4, 1),
}
# Meta-learning steps: name → trainer class.
META = {"conv4-maml": MamlTrainer, "mlp-maml": MamlTrainer, "wamal": WamalTrainer}


def load_batches(path, batch):
    """The first ⌊N/batch⌋ full batches of the CSV (784 pixels then the label per row)."""
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(rows[:, :784] / 255.0 * 2.0 - 1.0).reshape(-1, 1, 28, 28).contiguous()
    y = torch.from_numpy(rows[:, 784].astype(np.int64))
    n = (len(y) // batch) * batch
    return list(zip(x[:n].split(batch), y[:n].split(batch)))


class Trainer:
    """One model, its optimiser and its position in the batch sequence."""

    def __init__(self, name, batches, clock=time.perf_counter, device="cpu"):
        cls, m = MODELS[name]
        torch.manual_seed(0)
        self.model = cls(1, 28, 28, 10, m).to(device)
        self.model.train()
        # CUDA calls return before the GPU has run them: wait for it at both ends of a step.
        self.sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.batches = batches
        self.clock = clock
        self.step = 0

    def run(self, steps):
        """Train `steps` steps; the wall time of each."""
        times = []
        for _ in range(steps):
            x, y = self.batches[self.step % len(self.batches)]
            self.step += 1
            self.sync()
            t0 = self.clock()
            self.opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            self.opt.step()
            self.sync()
            times.append(self.clock() - t0)
        return times


def make_trainer(name, batches, clock=time.perf_counter, device="cpu"):
    return META.get(name, Trainer)(name, batches, clock, device)


def bench(name, batches, steps, warmup, clock=time.perf_counter, device="cpu"):
    trainer = make_trainer(name, batches, clock, device)
    trainer.run(warmup)
    times = trainer.run(steps)
    med = sorted(times)[len(times) // 2]
    return {
        "model": name,
        "median_step_s": med,
        "samples_per_s": len(batches[0][1]) / med,
        "step_s": times,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def device_problem(device, clock):
    """Why `device` cannot be benchmarked here (None if it can)."""
    if device == "cpu":
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return f"unknown device {device!r}: use cpu, cuda or cuda:N"
    if dev.type != "cuda":
        return f"unknown device {device!r}: use cpu, cuda or cuda:N"
    if not torch.cuda.is_available():
        return f"--device {device}: this PyTorch ({torch.__version__}) sees no CUDA GPU"
    if (dev.index or 0) >= torch.cuda.device_count():
        return f"--device {device}: there are {torch.cuda.device_count()} CUDA GPUs"
    if clock == "cpu":
        return "--clock cpu counts only the CPU's time, not the GPU's work: use --clock wall"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", choices=sorted(MODELS) + sorted(META))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--data", default="data/mnist_5k.csv.gz")
    ap.add_argument("--json", action="store_true", help="one JSON object per model on stdout")
    ap.add_argument("--serve", action="store_true", help="answer `MODEL STEPS` lines on stdin")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="time steps by elapsed time or by the process's CPU time (all threads)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    a = ap.parse_args()
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    torch.set_num_threads(a.threads)
    problem = device_problem(a.device, a.clock)
    if problem:
        if a.serve:
            print(json.dumps({"error": problem}), flush=True)
        else:
            print(f"pytorch_reference.py: {problem}", file=sys.stderr)
        return 2
    batches = [(x.to(a.device), y.to(a.device)) for x, y in load_batches(a.data, a.batch)]
    if a.serve:
        hello = {"ready": True, "threads": torch.get_num_threads(), "torch": torch.__version__}
        if a.device != "cpu":
            hello["device_name"] = torch.cuda.get_device_name(torch.device(a.device))
        print(json.dumps(hello), flush=True)
        trainers = {}
        for line in sys.stdin:
            parts = line.split()
            if len(parts) != 2 or (parts[0] not in MODELS and parts[0] not in META):
                print(json.dumps({"error": f"bad request {line.strip()!r}"}), flush=True)
                continue
            name, steps = parts[0], int(parts[1])
            if name not in trainers:
                trainers[name] = make_trainer(name, batches, clock, a.device)
            print(json.dumps({"model": name, "step_s": trainers[name].run(steps)}), flush=True)
        return 0
    for name in a.model or list(MODELS) + list(META):
        r = bench(name, batches, a.steps, a.warmup, clock, a.device)
        if a.json:
            print(json.dumps(r), flush=True)
        else:
            print(f"{name:8} {r['samples_per_s']:10.0f} samples/s  "
                  f"({1000 * r['median_step_s']:.1f} ms/step, {r['threads']} threads)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
