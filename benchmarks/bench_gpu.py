"""GPU benchmark: the native CUDA kernels against torch baselines and a copy floor, and the
recorder's training-step overhead, side by side in one run on one GPU.

    python benchmarks/bench_gpu.py [--repeats N] [--rows S] [--keep 0.01 0.1] [--models resnet18 gpt2]
                                   [--skip-overhead] [--out FILE]

- prune_topk on ResNet-18 shapes (CIFAR, 62 tensors, 11.17M values) and GPT-2-small shapes
  (148 tensors, 124.4M values), float16 values, refresh on: pyunlearn.kernels._native_cuda (one call
  for the model, a lent workspace, waiting for its status) against the torch loop (per layer
  Δ, torch.topk of |Δ|, gather, before.copy_(after)) and against the floor: one device-to-
  device copy of the model's float32 parameters (the refresh alone; the prune must also read
  `before`, so 1.5× the copy is its bound). Targets: ≥ 5× the torch loop, ≤ 3× the copy.
  Also pyunlearn's own torch fallback (ops.DevicePruner with kernels="torch": what runs where
  the CUDA module is not built; exact top-k with the CPU's tie rule, the same encoding).
- subtract_sparse of S stored rows (64) against index_add_ per layer and row (indices and Δ
  decoded beforehand, in the baseline's favour). Target: ≥ 5×.
- The recorder's training-step overhead: a CIFAR ResNet-18 (batch 256, bf16 autocast, SGD)
  and a GPT-2-small-shaped transformer (8 × 1024 tokens, bf16 autocast, AdamW), each step
  with and without an UpdateRecorder (keep 0.01), in alternating blocks. Whatever
  pyunlearn.UpdateRecorder does with a CUDA model is measured; if it refuses one, the result
  says "not supported" with its message. Target: ≤ 5%.

Contenders take turns round after round; best and median of N. Times are wall-clock around
each call with torch.cuda.synchronize() before and after. Writes JSON (default
benchmarks/results/gpu.json) with the run's metadata (benchmarks/_meta.py) and prints a table.
Needs a CUDA GPU: exits with status 2 and a message otherwise.

--dry-run checks this script without a GPU: CPU tensors, the kernels compiled over the CPU
emulation (csrc/cuda/emulate.h), tiny shapes, one round. Its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from _support import resnet18_cifar_shapes

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# ---- shapes and models ---------------------------------------------------------------------------

def gpt2_small_shapes(vocab: int = 50257, context: int = 1024, width: int = 768, layers: int = 12):
    """The 148 parameter tensors of GPT-2 small (124.4M values; linear weights as (in, out))."""
    shapes = [("wte.weight", (vocab, width)), ("wpe.weight", (context, width))]
    for i in range(layers):
        p = f"h.{i}"
        shapes += [(f"{p}.ln_1.weight", (width,)), (f"{p}.ln_1.bias", (width,)),
                   (f"{p}.attn.c_attn.weight", (width, 3 * width)), (f"{p}.attn.c_attn.bias", (3 * width,)),
                   (f"{p}.attn.c_proj.weight", (width, width)), (f"{p}.attn.c_proj.bias", (width,)),
                   (f"{p}.ln_2.weight", (width,)), (f"{p}.ln_2.bias", (width,)),
                   (f"{p}.mlp.c_fc.weight", (width, 4 * width)), (f"{p}.mlp.c_fc.bias", (4 * width,)),
                   (f"{p}.mlp.c_proj.weight", (4 * width, width)), (f"{p}.mlp.c_proj.bias", (width,))]
    return shapes + [("ln_f.weight", (width,)), ("ln_f.bias", (width,))]


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18Cifar(nn.Module):
    """The CIFAR ResNet-18 of tests/support.py's resnet18_cifar_shapes (3×3 stem, no max-pool)."""

    def __init__(self, classes=10, width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, in_planes = [], width
        for stage, planes in enumerate((width, 2 * width, 4 * width, 8 * width), start=1):
            blocks = [BasicBlock(in_planes, planes, 2 if stage > 1 else 1), BasicBlock(planes, planes, 1)]
            in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(8 * width, classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class GPT2Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.c_attn, self.attn_proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.c_fc, self.mlp_proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2Small(nn.Module):
    """GPT-2 small's shapes (tied output embedding), for a training step."""

    def __init__(self, vocab=50257, context=1024, width=768, layers=12, heads=12):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.h = nn.ModuleList(GPT2Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.h:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.t()


# ---- timing ----------------------------------------------------------------------------------------

@dataclass
class Timing:
    best_ms: float
    median_ms: float


class Device:
    def __init__(self, device: torch.device, module, dry_run: bool):
        self.device, self.module, self.dry_run = device, module, dry_run

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0


def race(dev: Device, contenders: dict, repeats: int) -> dict[str, Timing]:
    """Times the contenders in turn, round after round, after one untimed call each."""
    samples = {name: [] for name in contenders}
    for fn in contenders.values():
        fn()
    dev.sync()
    for _ in range(repeats):
        for name, fn in contenders.items():
            dev.sync()
            start = time.perf_counter()
            fn()
            dev.sync()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: Timing(round(min(s), 4), round(statistics.median(s), 4)) for name, s in samples.items()}


# ---- prune -----------------------------------------------------------------------------------------

def k_for(numels, keep):
    return [min(n, max(1, math.ceil(keep * n))) for n in numels]


class PruneWork:
    """A snapshot, two `after` sets taken in turn (Δ is never zero), and output buffers."""

    def __init__(self, dev: Device, numels, keep, seed=0):
        gen = torch.Generator(device=dev.device).manual_seed(seed)
        self.dev, self.numels, self.k = dev, list(numels), k_for(numels, keep)
        self.snapshot = [torch.randn(n, device=dev.device, generator=gen) for n in numels]
        self.after = [[b + 1e-3 * torch.randn(n, device=dev.device, generator=gen) for b, n in zip(self.snapshot, numels)]
                      for _ in range(2)]
        self.turn = 0
        total = sum(self.k)
        self.index = torch.empty(total, dtype=torch.int32, device=dev.device)
        self.values = torch.empty(total, dtype=torch.float16, device=dev.device)
        self.scales = torch.empty(len(numels), dtype=torch.float32, device=dev.device)
        if dev.module is not None:
            size = dev.module.prune_workspace_size(self.numels, self.k)
            self.workspace = torch.empty(size, dtype=torch.uint8, device=dev.device)
        self.snapshot_ptrs = [b.data_ptr() for b in self.snapshot]
        self.after_ptrs = [[a.data_ptr() for a in after] for after in self.after]
        # The floor: one copy of the parameters, as flat buffers.
        self.flat_src = torch.randn(sum(numels), device=dev.device, generator=gen)
        self.flat_dst = torch.empty_like(self.flat_src)

    def next(self):
        self.turn ^= 1
        return self.turn

    def native(self, lend_workspace=True):
        turn = self.next()
        extra = {"workspace": self.workspace.data_ptr(), "workspace_size": self.workspace.numel()} if lend_workspace else {}
        status = self.dev.module.prune_topk(self.snapshot_ptrs, self.after_ptrs[turn], self.numels, self.k,
                                            self.index.data_ptr(), self.values.data_ptr(), self.scales.data_ptr(),
                                            "float16", True, self.dev.stream(), **extra)
        if status != -1:
            raise RuntimeError(f"prune_topk reported layer {status} as not finite")

    def torch_fallback(self):
        # Its own snapshot and its own turn (it refreshes the snapshot; the shared turn must
        # keep flipping an odd number of times per round for the other contenders).
        if getattr(self, "fallback", None) is None:
            from pyunlearn.kernels import ops

            self.fallback = ops.DevicePruner([b.clone() for b in self.snapshot], self.after[0], self.k, "float16",
                                             kernels="torch")
            self.fallback_turn = 0
        self.fallback_turn ^= 1
        _, status = self.fallback(self.after[self.fallback_turn])
        return status

    def torch_loop(self):
        after = self.after[self.next()]
        out = []
        for b, a, k in zip(self.snapshot, after, self.k):
            delta = a - b
            _, idx = torch.topk(delta.abs(), k, sorted=False)
            out.append((idx, delta[idx]))
            b.copy_(a)
        return out

    def floor(self):
        self.flat_dst.copy_(self.flat_src)


@dataclass
class PruneResult:
    model: str
    numel: int
    keep: float
    native: Timing | None
    native_own_workspace: Timing | None
    torch_loop: Timing
    copy_floor: Timing
    speedup_vs_torch: float | None = None  # torch / native (best)
    vs_copy_floor: float | None = None  # native / copy (best)
    targets_met: bool | None = None  # >= 5x torch and <= 3x copy
    torch_fallback: Timing | None = None  # pyunlearn's exact torch fallback (ops.DevicePruner, kernels="torch")


def bench_prune(dev, model, numels, keep, repeats) -> PruneResult:
    work = PruneWork(dev, numels, keep)
    contenders = {"torch_loop": work.torch_loop, "torch_fallback": work.torch_fallback, "copy_floor": work.floor}
    if dev.module is not None:
        contenders = {"native": work.native, "native_own_workspace": lambda: work.native(False), **contenders}
    t = race(dev, contenders, repeats)
    r = PruneResult(model, sum(numels), keep, t.get("native"), t.get("native_own_workspace"), t["torch_loop"],
                    t["copy_floor"], torch_fallback=t["torch_fallback"])
    if r.native is not None:
        r.speedup_vs_torch = round(r.torch_loop.best_ms / r.native.best_ms, 2)
        r.vs_copy_floor = round(r.native.best_ms / r.copy_floor.best_ms, 2)
        r.targets_met = r.speedup_vs_torch >= 5 and r.vs_copy_floor <= 3
    return r


# ---- subtract --------------------------------------------------------------------------------------

@dataclass
class SubtractResult:
    model: str
    numel: int
    keep: float
    rows: int
    native: Timing | None
    index_add: Timing
    speedup: float | None = None
    target_met: bool | None = None  # >= 5x


def bench_subtract(dev, model, numels, keep, rows, repeats) -> SubtractResult:
    """Rows made by the native prune of `rows` random steps; the baseline gets them decoded."""
    d = dev.device
    gen = torch.Generator(device=d).manual_seed(1)
    k = k_for(numels, keep)
    total, L = sum(k), len(numels)
    params = [torch.randn(n, device=d, generator=gen) for n in numels]
    offsets = [0]
    for x in k:
        offsets.append(offsets[-1] + x)
    decoded = []  # per row, per layer: (int64 positions, float32 Δ)
    if dev.module is not None:
        index = torch.empty(rows, total, dtype=torch.int32, device=d)
        values = torch.empty(rows, total, dtype=torch.float16, device=d)
        scales = torch.empty(rows, L, dtype=torch.float32, device=d)
        for s in range(rows):
            step = [p + 1e-3 * torch.randn(n, device=d, generator=gen) for p, n in zip(params, numels)]
            status = dev.module.prune_topk([p.data_ptr() for p in params], [a.data_ptr() for a in step], numels, k,
                                           index[s].data_ptr(), values[s].data_ptr(), scales[s].data_ptr(),
                                           "float16", False, dev.stream())
            assert status == -1
            decoded.append([(index[s, offsets[i]:offsets[i + 1]].to(torch.int64).cumsum(0) - 1,
                             values[s, offsets[i]:offsets[i + 1]].float() * scales[s, i]) for i in range(L)])
    else:  # no native module: the baseline alone, on torch.topk rows
        for _ in range(rows):
            row = []
            for n, ki in zip(numels, k):
                delta = 1e-3 * torch.randn(n, device=d, generator=gen)
                idx = torch.topk(delta.abs(), ki, sorted=False).indices.sort().values
                row.append((idx, delta[idx]))
            decoded.append(row)

    def native():
        verdict = dev.module.subtract_sparse([p.data_ptr() for p in params], numels, k, index.data_ptr(),
                                             values.data_ptr(), scales.data_ptr(), rows, "float16", 1e-3, dev.stream())
        if verdict is not None:
            raise RuntimeError(f"subtract_sparse refused a row: {verdict}")

    def index_add():
        for row in decoded:
            for p, (pos, delta) in zip(params, row):
                p.index_add_(0, pos, delta, alpha=-1e-3)

    contenders = {"index_add": index_add}
    if dev.module is not None:
        contenders = {"native": native, **contenders}
    t = race(dev, contenders, repeats)
    r = SubtractResult(model, sum(numels), keep, rows, t.get("native"), t["index_add"])
    if r.native is not None:
        r.speedup = round(r.index_add.best_ms / r.native.best_ms, 2)
        r.target_met = r.speedup >= 5
    return r


# ---- recorder overhead -----------------------------------------------------------------------------

@dataclass
class OverheadResult:
    model: str
    numel: int
    batch: str
    supported: bool
    note: str = ""
    plain_step_ms: Timing | None = None
    recorded_step_ms: Timing | None = None
    overhead_pct_best: float | None = None  # from the best block of each
    overhead_pct_median: float | None = None
    target_met: bool | None = None  # <= 5%


def bench_overhead(dev, name, make_model, make_batch, make_optimizer, rounds, steps_per_block, batch_label):
    """Two identical models, one recorded; blocks of steps alternate between them."""
    from pyunlearn import UpdateRecorder, UpdateStore

    d = dev.device
    torch.manual_seed(0)
    plain, recorded = make_model().to(d), make_model().to(d)
    recorded.load_state_dict(plain.state_dict())
    opt_plain, opt_recorded = make_optimizer(plain), make_optimizer(recorded)
    numel = sum(p.numel() for p in plain.parameters() if p.requires_grad)
    autocast = torch.autocast(device_type=d.type, dtype=torch.bfloat16)
    ids = iter(range(10**9))

    def step(model, opt, rec):
        x, y = make_batch()
        if rec is not None:
            rec.batch(torch.tensor([next(ids) for _ in range(x.shape[0])]))
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = model(x)
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        opt.step()

    with tempfile.TemporaryDirectory() as tmp:
        try:
            store = UpdateStore.create(Path(tmp) / f"{name}.zarr", recorded, keep=0.01)
            rec = UpdateRecorder(recorded, opt_recorded, store)
            step(recorded, opt_recorded, rec)  # a refusal may come at the first step
            dev.sync()
        except Exception as exc:  # noqa: BLE001 - the point is to report it
            return OverheadResult(name, numel, batch_label, False, f"not supported: {type(exc).__name__}: {exc}")
        blocks = {"plain": [], "recorded": []}
        try:
            for _ in range(2):  # warm-up: allocator, cudnn autotuning, the recorder's buffers
                step(plain, opt_plain, None)
                step(recorded, opt_recorded, rec)
            for _ in range(rounds):
                for label, model, opt, r in (("plain", plain, opt_plain, None), ("recorded", recorded, opt_recorded, rec)):
                    dev.sync()
                    start = time.perf_counter()
                    for _ in range(steps_per_block):
                        step(model, opt, r)
                    dev.sync()
                    blocks[label].append((time.perf_counter() - start) * 1e3 / steps_per_block)
            rec.close()
            store.close()
        except Exception as exc:  # noqa: BLE001
            return OverheadResult(name, numel, batch_label, False,
                                  f"failed while recording: {type(exc).__name__}: {exc}")
    plain_t = Timing(round(min(blocks["plain"]), 3), round(statistics.median(blocks["plain"]), 3))
    rec_t = Timing(round(min(blocks["recorded"]), 3), round(statistics.median(blocks["recorded"]), 3))
    best = round(100 * (rec_t.best_ms / plain_t.best_ms - 1), 2)
    median = round(100 * (rec_t.median_ms / plain_t.median_ms - 1), 2)
    return OverheadResult(name, numel, batch_label, True, "", plain_t, rec_t, best, median, median <= 5)


# ---- main ------------------------------------------------------------------------------------------

@dataclass
class Config:
    keeps: tuple[float, ...] = (0.01, 0.1)
    models: tuple[str, ...] = ("resnet18", "gpt2")
    repeats: int = 10
    rows: int = 64
    overhead: bool = True
    overhead_rounds: int = 4
    overhead_steps: int = 10
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)


def load_module(dry_run: bool):
    if dry_run:
        spec = importlib.util.spec_from_file_location("cuda_build", ROOT / "csrc" / "cuda" / "build.py")
        helpers = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(helpers)
        path = helpers.build_emulated(Path(tempfile.mkdtemp(prefix="bench-gpu-emu-")))
        spec = importlib.util.spec_from_file_location("_native_cuda_emu", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module, "emulated (dry run)"
    try:
        from pyunlearn.kernels import _native_cuda
    except ImportError as exc:
        return None, f"not built ({exc}); build with PYUNLEARN_CUDA=1 pip install -e ."
    return _native_cuda, f"built (CUDA runtime {_native_cuda.runtime_version()})"


def model_numels(model: str, dry_run: bool) -> list[int]:
    shapes = resnet18_cifar_shapes() if model == "resnet18" else gpt2_small_shapes()
    numels = [math.prod(s) for _, s in shapes]
    return [max(1, n // 200) for n in numels] if dry_run else numels


def gpu_info(dev: Device, module_state: str) -> dict:
    info = {"device": str(dev.device), "native_cuda": module_state, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda}
    if dev.device.type == "cuda":
        props = torch.cuda.get_device_properties(dev.device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)
    return info


def run(config: Config, dev: Device) -> dict:
    out = {"prune": [], "subtract": [], "overhead": [], "errors": []}

    def attempt(section, what, fn):
        print(f"… {section}: {what}", flush=True)
        try:
            out[section].append(asdict(fn()))
        except Exception as exc:  # noqa: BLE001 - one failing part must not hide the others
            traceback.print_exc()
            out["errors"].append(f"{section} {what}: {type(exc).__name__}: {exc}")
        if dev.device.type == "cuda":
            torch.cuda.empty_cache()

    repeats = 1 if config.dry_run else config.repeats
    rows = min(config.rows, 4) if config.dry_run else config.rows
    for model in config.models:
        numels = model_numels(model, config.dry_run)
        for keep in config.keeps:
            attempt("prune", f"{model} keep {keep}", lambda: bench_prune(dev, model, numels, keep, repeats))
            attempt("subtract", f"{model} keep {keep}",
                    lambda: bench_subtract(dev, model, numels, keep, rows, max(1, repeats // 2)))
    if config.overhead:
        d = dev.device
        small = config.dry_run
        batch = 4 if small else 256
        attempt("overhead", "resnet18", lambda: bench_overhead(
            dev, "resnet18-cifar", lambda: ResNet18Cifar(width=8 if small else 64),
            lambda: (torch.randn(batch, 3, 32, 32, device=d), torch.randint(0, 10, (batch,), device=d)),
            lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
            1 if small else config.overhead_rounds, 2 if small else config.overhead_steps, f"{batch}×3×32×32"))
        vocab, context, width, layers, heads, seqs = (
            (512, 64, 64, 2, 4, 2) if small else (50257, 1024, 768, 12, 12, 8))
        attempt("overhead", "gpt2", lambda: bench_overhead(
            dev, "gpt2-small", lambda: GPT2Small(vocab, context, width, layers, heads),
            lambda: (lambda ids: (ids, torch.roll(ids, -1, 1)))(torch.randint(0, vocab, (seqs, context), device=d)),
            lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4),
            1 if small else config.overhead_rounds, 2 if small else config.overhead_steps, f"{seqs}×{context} tokens"))
    return out


def _ms(t):
    return f"{t['best_ms']:.3f}" if t else "—"


def _x(value):
    return "—" if value is None else value


def table(results: dict) -> str:
    lines = [f"{'prune_topk':<10} {'model':<9} {'keep':>5} {'native ms':>10} {'torch ms':>10} {'fallback':>9} "
             f"{'copy ms':>9} {'speedup':>8} {'/copy':>6} {'targets':>8}"]
    for r in results["prune"]:
        lines.append(f"{'':<10} {r['model']:<9} {r['keep']:>5} {_ms(r['native']):>10} {_ms(r['torch_loop']):>10} "
                     f"{_ms(r['torch_fallback']):>9} {_ms(r['copy_floor']):>9} {_x(r['speedup_vs_torch']):>8} "
                     f"{_x(r['vs_copy_floor']):>6} {str(r['targets_met']):>8}")
    lines.append(f"{'subtract':<10} {'model':<9} {'keep':>5} {'native ms':>10} {'index_add':>10} {'rows':>9} "
                 f"{'speedup':>8} {'target':>8}")
    for r in results["subtract"]:
        lines.append(f"{'':<10} {r['model']:<9} {r['keep']:>5} {_ms(r['native']):>10} {_ms(r['index_add']):>10} "
                     f"{r['rows']:>9} {_x(r['speedup']):>8} {str(r['target_met']):>8}")
    lines.append(f"{'overhead':<10} {'model':<14} {'plain ms':>9} {'recorded':>9} {'best %':>7} {'median %':>9} "
                 f"{'target':>8}")
    for r in results["overhead"]:
        if not r["supported"]:
            lines.append(f"{'':<10} {r['model']:<14} {r['note']}")
            continue
        lines.append(f"{'':<10} {r['model']:<14} {_ms(r['plain_step_ms']):>9} {_ms(r['recorded_step_ms']):>9} "
                     f"{r['overhead_pct_best']:>7} {r['overhead_pct_median']:>9} {str(r['target_met']):>8}")
    for e in results["errors"]:
        lines.append(f"ERROR {e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=Config.repeats)
    parser.add_argument("--rows", type=int, default=Config.rows)
    parser.add_argument("--keep", type=float, nargs="+", default=list(Config.keeps))
    parser.add_argument("--models", nargs="+", choices=["resnet18", "gpt2"], default=list(Config.models))
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="check the script without a GPU (numbers mean nothing)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU that torch can see (torch.cuda.is_available() is False); "
              "nothing was measured. (--dry-run checks the script on the CPU.)", file=sys.stderr)
        return 2
    config = Config(tuple(args.keep), tuple(args.models), args.repeats, args.rows, not args.skip_overhead,
                    dry_run=args.dry_run)
    module, state = load_module(args.dry_run)
    dev = Device(torch.device("cpu" if args.dry_run else "cuda"), module, args.dry_run)
    info = gpu_info(dev, state)
    print(f"GPU benchmark on {info.get('name', info['device'])}; native CUDA module: {state}", flush=True)
    started = time.perf_counter()
    results = run(config, dev)
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(table(results))
    out = args.out or (Path(tempfile.gettempdir()) / "bench_gpu_dry_run.json" if args.dry_run
                       else HERE / "results" / "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    from _meta import run_metadata

    out.write_text(json.dumps({"meta": run_metadata(asdict(config)), "gpu": info, **results}, indent=2) + "\n")
    print(f"wrote {out} ({results['seconds']} s)")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
