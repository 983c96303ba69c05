"""
Latency and throughput of DiT-Nano generators on CPU, CUDA (incl. Jetson) and MPS, and the paper's
design-space sweep (Tables 2, 5, 6): every design timed (study.py joins quality and draws Figure 4).

    python bench.py --d 7 --w 192 --h 12                # 50k images at batch 128, CFG 1.5 and 1, default modes
    python bench.py --params 5M --modes bf16-weights+lut+compile+graph   # the fastest CUDA mode alone
    python bench.py --ckpt runs/d5w64h8_toy-lpips/ckpt.pt --device cpu --threads 2 --n 1024
    python bench.py --sweep --json sweep.json           # Table 6's designs; then python study.py --timings sweep.json
    python bench.py --pick --max-params 5M --max-ms 20 --device cpu   # the best design for this device (pick.py)
    python bench.py --params 5M --onnx dit5m.onnx       # Jetson: export, then time it with the printed trtexec
    python bench.py --params 5M --train                 # distill.py's training step (LPIPS-VGG at 224): img/s
    python bench.py --loader /data/EDM-Cond-CIFAR       # distill.py's batches from GET's pairs: ms per batch, memory

    from bench import latency
    r = latency((5, 64, 8), n=1024, batch=128, mode="lut", cfg_scale=1.5, device="cpu", repeats=3)
    r["images_per_s"], r["seconds_per_50k"], r["max_err"]

A mode is a precision and optional transforms joined by '+': fp32 | tf32 | bf16 | fp16 (autocast) |
bf16-weights (weights and activations in bf16), then lut (per-class adaLN lookup table), compile
(torch.compile), graph (CUDA graph of one whole batch). Every mode's images are compared with the plain
fp32 model's before it is timed. Timing: warm-up, then the median (and min-max) of repeats, each of which
generates all n images batch by batch (noise drawn on the device); CUDA is timed with CUDA events.
Why these modes: the 5M design needs 1.94 GFLOP per image per pass (97 TFLOP for 50k images without guidance, a
0.1 s floor on an H100 in bf16), yet small DiTs are bound by memory traffic and kernel launches, so the levers are
bf16, one fused batch for guidance's two halves, the adaLN lookup table, torch.compile and CUDA graphs; on a
Jetson, TensorRT from the ONNX export.
"""
import contextlib
import copy
import importlib.util
import inspect
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections import namedtuple

import torch
import torch.nn as nn

import common
import dit
import pick
import sample
from common import (UsageError, check_number, compile_problem, exit_on_usage_error, hardware, pick_device,
                    positive_ints, writable_file, write_json)


def get_parser():
    p, g = dit.design_parser(__doc__, "model (default: the paper's 5M design (7,192,12)); random weights unless --ckpt")
    dit.add_mlp_ratio_flag(g)
    g.add_argument("--ckpt", help="time a trained checkpoint's EMA weights instead")
    g = p.add_argument_group("timing")
    g.add_argument("--n", type=int, help="images per repeat (default 50,000; a CPU --sweep: 256, extrapolated)")
    g.add_argument("--batch", type=int, help="images per batch (sampling: 128, the paper's; CFG runs 2x in one pass. "
                   "--train: 256, the paper's, on CUDA; 16 on a CPU)")
    g.add_argument("--cfg-scale", type=float, nargs="+", help="CFG scales to time (default: 1.5, the paper's, as "
                   "one fused 2B batch, and 1, one pass; only 1 for a --ckpt trained on unconditional pairs)")
    g.add_argument("--modes", help="comma-separated modes, e.g. fp32,bf16+lut,bf16-weights+lut+compile+graph "
                   "(default: a set per device; --sweep: the device's fastest)")
    g.add_argument("--compile-mode", choices=COMPILE_MODES, help="torch.compile mode (default: max-autotune on "
                   "CUDA, max-autotune-no-cudagraphs with +graph; default on CPU)")
    g.add_argument("--repeats", type=int, help="timed repeats of all n images; the median is reported (default 5; "
                   "--pick on a CPU: 3)")
    g.add_argument("--warmup", type=int, help="untimed batches after the accuracy check (default 3; --pick on a "
                   "CPU: 1)")
    g.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: the first available)")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--seed", type=int, default=0, help="seed (>= 0) of the random weights and the noise")
    g.add_argument("--json", help="also write every measurement as a JSON list to this file (study.py reads a "
                   "--sweep's)")
    g = p.add_argument_group("design-space sweep (Tables 2 and 6, Figure 4)")
    g.add_argument("--sweep", action="store_true", help="time every design of Table 6 (Table 2's rows included)")
    g.add_argument("--designs", nargs="+", help="time these designs instead of Table 6's: D,W,H or a run folder's "
                   "name, e.g. 5,64,8 7,128,8 d5w64h8-8-4-4-2 d6w64h8r2")
    g = p.add_argument_group("the best design for this device (pick.py says how candidates are chosen)")
    g.add_argument("--pick", action="store_true", help="time every candidate design within --max-params (timings "
                   "cached on disk per device, design and torch version; default mode: the device's fastest without "
                   "compile; on a CPU 128 images, 3 repeats), print the table and the Pareto front, and pick")
    g.add_argument("--max-params", help="--pick: the parameter budget, e.g. 5M, 2.2M, 500k")
    g.add_argument("--max-ms", type=float, help="--pick: the latency budget, ms per image at batch 128, CFG 1.5")
    g = p.add_argument_group("training throughput: distill.py's own step (forward, loss, backward, AdamW, EMA)")
    g.add_argument("--train", action="store_true", help="time training steps of the design on random pairs instead "
                   "of sampling; modes fp32, bf16 (autocast), each optionally +compile; --repeats steps are timed")
    g.add_argument("--loss", choices=("l1", "l2", "lpips"), default="lpips", help="--train's loss (paper: lpips; its "
                   "trunk has random weights here, which take the same time as trained ones)")
    g.add_argument("--lpips-size", type=int, default=224, help="--train: LPIPS input size (GET: 224; 0 keeps 32)")
    g = p.add_argument_group("data loading: distill.py's batches from a folder of GET's pairs")
    g.add_argument("--loader", metavar="PATH", help="time the training thread's wait for each batch of --batch pairs "
                   "(default 256) drawn as distill.py draws them from this GET folder, over --n pairs (default 200 "
                   "batches), and the process's peak memory; nothing else is timed")
    g.add_argument("--step-ms", type=float, default=0.0, help="--loader: a stand-in for the training step between "
                   "batches (a sleep, as the CPU is while a GPU computes; default 0: the worst case)")
    g = p.add_argument_group("Jetson / TensorRT")
    g.add_argument("--onnx", help="export the generator (LUT-folded, CFG inside, static batch) to this file "
                   "and print the trtexec command that times it; nothing else is timed")
    g.add_argument("--opset", type=int, default=18, choices=range(17, 21), metavar="{17..20}", help="ONNX opset: 18 "
                   "for TensorRT 10 (JetPack 6.1+), 17 for TensorRT 8.x (JetPack 5, 6.0)")
    return p


# ----------------------------------------------------------------------------------------------
# The paper's numbers. Table 6: latency (s) of 50k images at batch 128, CFG 1.5, on a Jetson Orin (Nano),
# and FID; its 0.42M rows are Table 2 (names from Table 2; the 2.2M/5M names follow Figure 4's families).

PaperRow = namedtuple("PaperRow", "name budget depth width heads jetson_s fid")
TABLE6 = [PaperRow("wider", "0.42M", 1, 128, 8, 97.5, 57.07),
          PaperRow("wide", "0.42M", 2, 96, 8, 123.6, 34.78),
          PaperRow("lower heads", "0.42M", 5, 64, 4, 162.6, 29.66),
          PaperRow("proposed", "0.42M", 5, 64, 8, 198.7, 29.14),
          PaperRow("deep", "0.42M", 9, 48, 6, 259.0, 28.52),
          PaperRow("deeper", "0.42M", 21, 32, 4, 411.7, 32.81),
          PaperRow("wide", "2.2M", 3, 192, 12, 233.2, 16.40),
          PaperRow("proposed", "2.2M", 7, 128, 8, 322.6, 13.95),
          PaperRow("deep", "2.2M", 13, 96, 8, 493.7, 12.76),
          PaperRow("wide", "5M", 4, 256, 16, 367.6, 11.74),
          PaperRow("deep", "5M", 16, 128, 8, 657.9, 10.25),
          PaperRow("proposed", "5M", 7, 192, 12, 460.9, 10.32)]
PER_50K = 50_000  # the paper's sample count: latencies are "seconds per 50k images"

# ----------------------------------------------------------------------------------------------
# Modes. tolerance: the largest max|image - fp32 image| allowed, relative to max|fp32 image|. Measured on
# random-weight models of all Table 6 designs (CPU, batch 8, CFG 1.5): bf16 autocast <= 1.2%, bf16 weights
# <= 2.4%, fp16 <= 0.15% (TF32 keeps fp16's 10 mantissa bits); the tolerances leave 3-10x margin.

Precision = namedtuple("Precision", "autocast weights tf32 tolerance")
PRECISIONS = {"fp32": Precision(None, None, False, 5e-4),
              "tf32": Precision(None, None, True, 2e-2),
              "bf16": Precision(torch.bfloat16, None, False, 8e-2),
              "fp16": Precision(torch.float16, None, False, 2e-2),
              "bf16-weights": Precision(None, torch.bfloat16, False, 8e-2)}
TRANSFORMS = ("lut", "compile", "graph")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
Mode = namedtuple("Mode", "name precision lut compile graph")
BASE_MODES = {"cuda": ["fp32", "tf32", "bf16", "bf16+lut", "bf16-weights+lut+graph"],
              "cpu": ["fp32", "lut", "bf16+lut", "bf16-weights+lut"], "mps": ["fp32", "lut"]}  # + the fastest


def fastest_mode(device):
    """The mode a sweep times by default: every lever this device and install support. torch.compile needs
    Triton on CUDA (Jetson's PyTorch often lacks it) and a C++ compiler on CPU; bf16 pays on a CPU only where
    its matmuls beat fp32's (AVX512-BF16, AMX, recent Arm), so the CPU's own rates decide."""
    compile_ = "" if compile_problem(device) else "+compile"
    if device.type == "cuda":
        return "bf16-weights+lut" + compile_ + "+graph"
    if device.type == "cpu":
        bf16 = matmul_rate(device, torch.bfloat16) > matmul_rate(device, torch.float32)
        return ("bf16-weights+lut" if bf16 else "lut") + compile_
    return "fp16+lut"


def parse_mode(text, device):
    """'bf16-weights+lut+compile+graph' -> Mode, or a UsageError naming what this device cannot run."""
    tokens = text.strip().lower().split("+")
    precisions = [t for t in tokens if t in PRECISIONS]
    unknown = [t for t in tokens if t not in PRECISIONS and t not in TRANSFORMS]
    if unknown or len(precisions) > 1 or len(set(tokens)) != len(tokens):
        raise UsageError(f"cannot read mode {text!r}: write at most one precision ({', '.join(PRECISIONS)}) and "
                         f"any of {', '.join(TRANSFORMS)}, joined by '+', e.g. bf16+lut+compile.")
    precision = precisions[0] if precisions else "fp32"
    transforms = [t for t in TRANSFORMS if t in tokens]
    name = "+".join(([precision] if precision != "fp32" or not transforms else []) + transforms)  # fp32 implied
    mode = Mode(name, precision, "lut" in tokens, "compile" in tokens, "graph" in tokens)
    if (mode.graph or PRECISIONS[precision].tf32) and device.type != "cuda":
        raise UsageError(f"mode {mode.name} needs a CUDA device (TF32 and CUDA graphs are NVIDIA features); "
                         f"this run is on {device.type}. Drop tf32/graph, or run with --device cuda.")
    if PRECISIONS[precision].weights and not mode.lut:
        raise UsageError(f"mode {mode.name}: bf16 weights need the LUT fold (+lut), because the timestep "
                         f"embedder computes in fp32; write {mode.name}+lut.")
    return mode


@contextlib.contextmanager
def tf32(enabled):
    """TF32 matmuls and convolutions on or off, restored after; off is the strict fp32 reference
    (cuDNN's convolutions default to TF32, so fp32 turns them off too). No effect off CUDA."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------
# The adaLN fold. The student's timestep is the constant dit.STUDENT_T, so the conditioning vector
# c = t_emb + y_emb takes only 11 values (10 classes + the CFG null class). Every adaLN output
# Linear(SiLU(c)) is then a table: [11, 6w] per block, [11, 2w] for the final layer; inference gathers
# rows by label instead of running the timestep MLP, the label embedding and d+1 matmuls per image.

class AdaLNTable(nn.Module):
    """Stands in for a layer's adaLN_modulation: labels [B] -> rows table[labels] [B, k*w]. index_select
    (ONNX Gather) takes int32 labels too, which TensorRT needs; plain indexing exports as int64-only GatherND."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, labels):
        return self.table.index_select(0, labels)


class FoldedDiT(dit.DiT):
    """A DiT whose adaLN modulations are AdaLNTables: the 'conditioning vector' is the label itself,
    so DiT's forward, head, decode and sample run unchanged. Built by fold_adaln()."""

    def condition(self, y):
        return y


def fold_adaln(model):
    """DiT -> FoldedDiT for inference that shares the DiT's weights (the DiT itself is left untouched)."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    folded = copy.deepcopy(model, memo=shared)  # a new module tree around the very same tensors
    folded.__class__ = FoldedDiT  # only condition() differs; DiT's methods do the rest
    with torch.no_grad():
        c = model.condition(torch.arange(model.num_classes + 1, device=model.pos_embed.device))  # [11,w]
        for layer in [*folded.blocks, folded.final_layer]:
            layer.adaLN_modulation = AdaLNTable(layer.adaLN_modulation(c))  # [11,6w] or [11,2w]
    del folded.t_embedder, folded.y_embedder  # folded into the tables
    return folded.eval()


class Generator(nn.Module):
    """What is timed and exported: noise [B,3,32,32] float32 and labels [B] -> CFG-guided images
    [B,3,32,32] float32, with CFG's two halves in one fused batch of 2B (DiT.sample)."""

    def __init__(self, net, cfg_scale, autocast=None, dtype=torch.float32):
        super().__init__()
        self.net, self.cfg_scale, self.autocast, self.dtype = net, cfg_scale, autocast, dtype

    def forward(self, z, y):
        # cache_enabled=False: a cached weight cast made during CUDA graph capture must not outlive it
        ctx = (torch.autocast(z.device.type, dtype=self.autocast, cache_enabled=False) if self.autocast
               else contextlib.nullcontext())
        with ctx:
            return self.net.sample(z.to(self.dtype), y, self.cfg_scale).float()


def random_dit(depth, width, heads, mlp_ratio=4, seed=0):
    """A DiT with random weights at a trained model's scale (std 1/sqrt(fan_in), biases 0.02). DiT's
    adaLN-Zero init makes an untrained model output exactly 0, which every mode would 'match'."""
    model = dit.DiT(depth, width, heads, mlp_ratio)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # pos_embed stays the fixed sin-cos table
                std = p[0].numel() ** -0.5 if p.dim() > 1 else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Timing

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(run, device, repeats):
    """Seconds of each of `repeats` calls of run(): CUDA events on CUDA (one sync per repeat, so the host
    queues ahead as in real use), synchronised wall clocks elsewhere."""
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            synchronize(device)
            t0 = time.perf_counter()
            run()
            synchronize(device)
            seconds.append(time.perf_counter() - t0)
    return seconds


_matmul_rates = {}


def matmul_rate(device, dtype=torch.float32, allow_tf32=False, repeats=5):
    """This machine's own dense matmul rate in FLOP/s (median of repeats of an S x S x S GEMM, S = 4096 on
    CUDA, 1024 elsewhere): the yardstick for the model's achieved fraction. Measured once per setting."""
    key = (str(device), dtype, allow_tf32)
    if key not in _matmul_rates:
        size = 4096 if device.type == "cuda" else 1024
        a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
        with tf32(allow_tf32), torch.inference_mode():
            timed(lambda: a @ b, device, 2)  # warm-up (library init, kernel selection)
            _matmul_rates[key] = 2 * size ** 3 / statistics.median(timed(lambda: a @ b, device, repeats))
    return _matmul_rates[key]


def peak_memory_mib(device):
    """CUDA: the most memory allocated since the last reset (weights, buffers and graph pools included).
    CPU: the process's peak resident set so far (Linux reports KiB, macOS bytes)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    if device.type == "cpu" and importlib.util.find_spec("resource"):
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10
    return float("nan")


class AccuracyError(RuntimeError):
    """A mode whose images differ from the fp32 model's beyond its precision's tolerance."""


def pick_compile_mode(compile_mode, mode, device):
    """--compile-mode, or the default: max-autotune on CUDA (its own CUDA graphs included), without graphs
    when the mode captures one itself (a graph cannot be captured inside another); 'default' elsewhere."""
    if compile_mode is None:
        return ("max-autotune-no-cudagraphs" if mode.graph else "max-autotune") if device.type == "cuda" else "default"
    if mode.graph and compile_mode in ("reduce-overhead", "max-autotune"):
        raise UsageError(f"--compile-mode {compile_mode} makes its own CUDA graphs, which cannot be captured in "
                         f"mode {mode.name}'s graph: use max-autotune-no-cudagraphs, or drop +graph.")
    return compile_mode


def build(model, mode, cfg_scale, batch, device, compile_mode=None, conditional=True):
    """The mode's generator around static input buffers -> (run() -> images [batch,3,32,32] float32,
    noise buffer z [batch,3,32,32], labels y [batch]). run() reads z and y; CUDA graphs replay in place."""
    precision = PRECISIONS[mode.precision]
    net = fold_adaln(model) if mode.lut else model
    if precision.weights:
        net = copy.deepcopy(net).to(precision.weights)  # a bf16 copy: the caller's model stays fp32
    fn = Generator(net, cfg_scale, precision.autocast, precision.weights or torch.float32)
    if mode.compile:
        torch._dynamo.reset()  # a fresh cache: many builds in one run must not hit the recompile limit
        fn = torch.compile(fn, mode=pick_compile_mode(compile_mode, mode, device), fullgraph=True, dynamic=False)
    z = torch.zeros(batch, dit.CHANNELS, dit.IMG, dit.IMG, device=device)
    y = sample.labels_for(batch, conditional).to(device)  # speed does not depend on the labels
    if not mode.graph:
        return (lambda: fn(z, y)), z, y
    # CUDA graph (torch.cuda.graph's recipe): warm up on a side stream (this also compiles), then capture one
    # whole batch; a replay relaunches every kernel at once and reads the static buffers z and y.
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(z, y)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        images = fn(z, y)

    def replay():
        graph.replay()
        return images
    return replay, z, y


def latency(model_or_dhw, n=PER_50K, batch=128, mode="fp32", cfg_scale=1.5, device=None, repeats=5, warmup=3,
            compile_mode=None, seed=0, conditional=True):
    """Generate n images (ceil(n/batch) full batches) `repeats` times in a mode; returns a dict of the
    measurements. model_or_dhw: a dit.DiT (e.g. sample.load_model's) or (depth, width, heads[, mlp_ratio]) for
    random weights; conditional=False samples the null class (a model trained on unconditional pairs). The mode's
    images on one batch are first compared with the plain fp32 model's (AccuracyError beyond its tolerance).
    Leaves the model's weights unchanged (it is moved to the device)."""
    device = pick_device(str(device) if device else None)
    mode = parse_mode(mode, device) if isinstance(mode, str) else mode
    if n < 1 or batch < 1 or repeats < 1 or warmup < 0:
        raise UsageError(f"n, batch and repeats must be positive and warmup >= 0 (got {n}, {batch}, {repeats}, "
                         f"{warmup}).")
    model = model_or_dhw if isinstance(model_or_dhw, nn.Module) else random_dit(*model_or_dhw, seed=seed)
    model = model.to(device).eval()
    precision = PRECISIONS[mode.precision]
    batches = math.ceil(n / batch)
    check_z = torch.randn(batch, dit.CHANNELS, dit.IMG, dit.IMG, generator=torch.Generator().manual_seed(seed))
    noise = torch.Generator(device).manual_seed(seed)
    with torch.inference_mode():
        t0 = time.perf_counter()
        with tf32(False):  # the reference: the plain model in strict fp32
            reference = model.sample(check_z.to(device), sample.labels_for(batch, conditional).to(device),
                                     cfg_scale).float()
        with tf32(precision.tf32):
            run, z, y = build(model, mode, cfg_scale, batch, device, compile_mode, conditional)
            z.copy_(check_z)
            max_err = (run() - reference).abs().max().item()
            scale = reference.abs().max().item()
            if not max_err <= precision.tolerance * scale:  # `not <=` also catches NaN
                raise AccuracyError(f"mode {mode.name} on DiT({model.depth},{model.width},{model.heads}) differs "
                                    f"from fp32 by {max_err:.3g} (images up to {scale:.3g}; tolerance "
                                    f"{precision.tolerance:g} of that); it was not timed.")
            setup_s = time.perf_counter() - t0  # fold, compile, capture and the check

            def generate():  # all n images: fresh noise into the static buffer, then the batch
                for _ in range(batches):
                    z.normal_(generator=noise)
                    run()
            for _ in range(warmup):
                z.normal_(generator=noise)
                run()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = timed(generate, device, repeats)
            peak_mib = peak_memory_mib(device)  # before matmul_rate below allocates its own operands
    median = statistics.median(seconds)
    flops = dit.flops_per_image(model.depth, model.width, cfg=cfg_scale != 1, mlp_ratio=model.mlp_ratio)
    compute_dtype = precision.autocast or precision.weights or torch.float32
    return {"mode": mode.name, "cfg_scale": cfg_scale, "design": [model.depth, model.width, model.heads],
            "mlp_ratio": model.mlp_ratio, "params": dit.param_count(model.depth, model.width, model.mlp_ratio),
            "device": str(device), "hardware": hardware(device),
            "torch": torch.__version__,
            "n": n, "batch": batch, "batches": batches, "repeats": repeats, "seconds": median,
            "seconds_min": min(seconds), "seconds_max": max(seconds), "images_per_s": n / median,
            "ms_per_batch": median / batches * 1e3, "gflop_per_image": flops / 1e9,
            "tflops": flops * n / median / 1e12,
            "matmul_tflops": matmul_rate(device, compute_dtype, precision.tf32) / 1e12,
            "seconds_per_50k": median * PER_50K / n, "extrapolated": n != PER_50K,
            "peak_mib": peak_mib, "setup_s": setup_s, "max_err": max_err, "image_scale": scale,
            "tolerance": precision.tolerance}


# ----------------------------------------------------------------------------------------------
# Jetson: ONNX -> TensorRT

def export_onnx(model, path, batch=128, cfg_scale=1.5, opset=18, conditional=True):
    """The LUT-folded generator with CFG inside, static batch -> ONNX file. Inputs noise float32
    [B,3,32,32] and labels int32 [B] (TensorRT 8 has no int64 inputs); output images float32.
    Returns max|onnxruntime - fp32 torch| on one batch, or None when onnxruntime is not installed."""
    model = model.eval()
    device = model.pos_embed.device
    z = torch.randn(batch, dit.CHANNELS, dit.IMG, dit.IMG, generator=torch.Generator().manual_seed(0)).to(device)
    y = sample.labels_for(batch, conditional).to(device, torch.int32)
    # torch >= 2.9 exports with torch.export (opset >= 18); its down-conversion to 17 breaks Split, so opset 17
    # (TensorRT 8.x) takes the TorchScript exporter, which older torch uses anyway
    legacy = {"dynamo": False} if opset < 18 and "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    try:
        torch.onnx.export(Generator(fold_adaln(model), cfg_scale).eval(), (z, y), path,
                          input_names=["noise", "labels"], output_names=["images"], opset_version=opset, **legacy)
    except ImportError as e:
        raise UsageError(f"--onnx needs the ONNX exporter's packages ({e}): pip install onnx onnxscript.")
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (images,) = session.run(None, {"noise": z.cpu().numpy(), "labels": y.cpu().numpy()})
    with torch.no_grad(), tf32(False):
        reference = model.sample(z, y.long(), cfg_scale).float().cpu()
    return (torch.from_numpy(images) - reference).abs().max().item()


def trtexec_command(path, precision="fp16"):
    return (f"trtexec --onnx={path} --saveEngine={os.path.splitext(path)[0]}.{precision}.plan --{precision} "
            f"--useCudaGraph --noDataTransfers --useSpinWait --warmUp=2000 --duration=20")


# ----------------------------------------------------------------------------------------------
# The design-space sweep: every design timed (study.py adds quality and draws Figure 4)

def sweep(args, device, modes):
    """Every design (Table 6's, or --designs) in every mode -> rows (latency's dict plus the design's name and
    the paper's Jetson latency and FID), one printed line each."""
    paper = {(r.depth, r.width, r.heads, 4): r for r in TABLE6}
    chosen = args.designs or list(paper)  # check_args parsed --designs
    cfg_scale = (args.cfg_scale or [sample.PAPER_CFG])[0]  # random weights: class-conditional, the paper's CFG
    print(f"{hardware(device)}, torch {torch.__version__}; {args.n:,} images per design at batch {args.batch}, "
          f"CFG {cfg_scale:g}, median of {args.repeats}; s per 50k = 50,000 / img/s"
          f"{' (extrapolated)' if args.n != PER_50K else ''}")
    rows = []
    for d in chosen:
        design = paper.get(d) if isinstance(d[2], int) else None
        for mode in modes:
            r = latency(d, args.n, args.batch, mode, cfg_scale, device, args.repeats, args.warmup, args.compile_mode,
                        args.seed)
            rows.append(dict(r, name=f"{design.budget} {design.name}" if design else "",
                             jetson_s=design and design.jetson_s, paper_fid=design and design.fid))
            print(f"{dit.design_name(*d)} {mode}: {r['images_per_s']:,.1f} img/s, {r['seconds_per_50k']:,.1f} s per "
                  f"50k" + (f" (paper, Jetson Orin: {design.jetson_s} s)" if design else ""), flush=True)
    return rows


def timings_cache():
    """Where --pick keeps its timings: a JSON of {setting and design: {ms_per_image, params}} in the cache folder
    (common.CACHE_DIR); the setting names the mode, batch, CFG, repeats, images, device (threads included) and
    torch version, so a timing is reused only where all of them are the same."""
    return os.path.join(common.CACHE_DIR, "latency_cache.json")


def pick_design(args, device, modes):
    """Every candidate of pick.candidates timed (or read from the cache), then pick.report's table and pick line."""
    max_params = dit.parse_params(args.max_params)
    cands = pick.candidates(max_params, [(r.depth, r.width, r.heads) for r in TABLE6], args.mlp_ratio)
    cfg_scale = (args.cfg_scale or [sample.PAPER_CFG])[0]
    setting = (f"{modes[0]} mode, batch {args.batch}, CFG {cfg_scale:g}, median of {args.repeats} x {args.n:,} "
               f"images, on {hardware(device)}, torch {torch.__version__}")
    path = timings_cache()
    common.writable_file(path, "the timings cache (set DIT_NANO_CACHE to move it)")  # makes its folder, or exit 2
    try:
        with open(path) as f:
            cache = json.load(f)
    except FileNotFoundError:
        cache = {}
    except (OSError, ValueError) as e:
        print(f"note: the timings cache {path} is unreadable ({e}); timing every candidate again")
        cache = {}
    def flops(c):
        return dit.flops_per_image(c.depth, c.width, cfg=cfg_scale != 1, mlp_ratio=c.mlp_ratio)
    key = {pick.name(c): f"{setting}, {pick.name(c)}" for c in cands}
    to_time = [c for c in cands if key[pick.name(c)] not in cache]
    left, spent, done = sum(map(flops, to_time)), 0.0, 0  # the ETA scales the seconds per FLOP so far
    print(f"{len(cands)} candidates, {len(cands) - len(to_time)} in the cache {path}; {setting}")
    for k, c in enumerate(to_time, 1):
        t0 = time.perf_counter()
        r = latency((c.depth, c.width, c.heads, c.mlp_ratio), args.n, args.batch, modes[0], cfg_scale, device,
                    args.repeats, args.warmup, args.compile_mode, args.seed)
        cache[key[pick.name(c)]] = {"ms_per_image": r["seconds"] / args.n * 1e3, "params": r["params"]}
        common.write_json(path, cache)  # after each: an interrupted --pick keeps what it timed
        spent, done, left = spent + time.perf_counter() - t0, done + flops(c), left - flops(c)
        print(f"[{k}/{len(to_time)}] {pick.name(c)}: {cache[key[pick.name(c)]]['ms_per_image']:.3f} ms per image; "
              f"ETA {spent / done * left:.0f} s", flush=True)
    ms = {name: cache[k]["ms_per_image"] for name, k in key.items()}
    best = pick.report(cands, ms, max_params, args.max_ms, setting)
    return [dict(design=[best.depth, best.width, best.heads], mlp_ratio=best.mlp_ratio, params=best.params,
                 ms_per_image=ms[pick.name(best)], setting=setting)]


# ----------------------------------------------------------------------------------------------
# Training throughput: distill.py's step, timed

PAPER_PAIRS, PAPER_EPOCHS = 1_000_000, 100  # EDM-Cond-CIFAR's pairs, the paper's training length


def train_throughput(args, device, modes):
    """distill.train_step (the very step distill.py runs) on random pairs, per mode: median seconds per step
    over --repeats steps after --warmup, images/s, and the time 100 epochs of 1M pairs would take."""
    import distill  # only here: sampling benchmarks need no trainer
    d, w, h = dit.resolve_design(args, default=dit.design("5M"))
    r = args.mlp_ratio
    print(f"training DiT(d={d}, w={w}, h={h}{f', mlp_ratio={r:g}' if r != 4 else ''}), {dit.param_count(d, w, r):,} "
          f"parameters, loss {args.loss}"
          + (f" at {args.lpips_size}x{args.lpips_size}" if args.loss == "lpips" and args.lpips_size else "")
          + f"; {hardware(device)}, torch {torch.__version__}; batch {args.batch}, median of {args.repeats} steps "
          f"after {args.warmup}")
    print(f"\n| mode | s/step (min-max) | img/s | peak MiB | setup s | {PAPER_EPOCHS} epochs of {PAPER_PAIRS:,} "
          f"pairs |\n|" + " --- |" * 6)
    g = torch.Generator().manual_seed(args.seed)
    z = torch.randn(args.batch, dit.CHANNELS, dit.IMG, dit.IMG, generator=g).to(device)
    x = (torch.rand(args.batch, dit.CHANNELS, dit.IMG, dit.IMG, generator=g) * 2 - 1).to(device)
    y = torch.randint(0, dit.NUM_CLASSES, (args.batch,), generator=g).to(device)
    measured = []
    for mode in modes:
        heads = ",".join(map(str, dit.heads_per_block(h, d)))
        flags = ["--d", str(d), "--w", str(w), "--h", heads, "--mlp-ratio", str(r), "--loss", args.loss,
                 "--lpips-size", str(args.lpips_size), "--lpips-backbone", "random", "--batch", str(args.batch),
                 "--seed", str(args.seed), "--dtype", mode.split("+")[0], "--decay", "0"]  # every step at one rate
        flags += ["--compile"] if "+compile" in mode else []
        train_args = distill.resolve(distill.get_parser().parse_args(flags))
        run = distill.build_student(train_args, device, distill.build_loss(train_args, device)[0])
        run.model.train()
        step = itertools.count()  # the optimiser step number, which the EMA's warm-up reads
        t0 = time.perf_counter()
        for _ in range(args.warmup):  # compile, allocator and autotuning happen here
            distill.train_step(run, z, y, x, next(step))
        synchronize(device)
        setup_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(lambda: distill.train_step(run, z, y, x, next(step)), device, args.repeats)
        loss = distill.train_step(run, z, y, x, next(step))[0].item()
        if not math.isfinite(loss):
            raise AccuracyError(f"mode {mode}: the training loss is {loss}; it was not timed.")
        median = statistics.median(seconds)
        row = {"mode": mode, "train": True, "design": [d, w, h], "mlp_ratio": r, "params": dit.param_count(d, w, r),
               "loss": args.loss, "lpips_size": args.lpips_size, "batch": args.batch, "device": str(device),
               "hardware": hardware(device), "torch": torch.__version__, "repeats": args.repeats,
               "seconds_per_step": median, "seconds_min": min(seconds), "seconds_max": max(seconds),
               "images_per_s": args.batch / median, "peak_mib": peak_memory_mib(device), "setup_s": setup_s,
               "paper_training_hours": PAPER_EPOCHS * PAPER_PAIRS / (args.batch / median) / 3600}
        measured.append(row)
        print(f"| {mode} | {median:.3f} ({min(seconds):.3f}-{max(seconds):.3f}) | {row['images_per_s']:,.1f} | "
              f"{row['peak_mib']:.0f} | {setup_s:.1f} | {row['paper_training_hours']:,.1f} h |", flush=True)
    print(f"\nthe last column: {PAPER_EPOCHS} x {PAPER_PAIRS:,} images at the measured img/s on this one device.")
    return measured


# ----------------------------------------------------------------------------------------------
# Data loading: the training thread's wait for distill.py's batches from GET's pairs

def rss_mib():
    """(this process's resident memory now, its peak so far) in MiB, from /proc (Linux); NaN elsewhere."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return float("nan"), float("nan")


def loader_throughput(args):
    """distill.py's batches (seeded order, label dropout) from --loader PATH, timed on the calling thread as the
    training loop receives them from its prefetching thread: ms per batch (median, mean, max), batches/s, and
    memory before and after (a conversion of the folder, the first time, is in the setup time)."""
    import data
    import distill  # only here: sampling benchmarks need no trainer
    before = rss_mib()
    t0 = time.perf_counter()
    train_set, _ = data.load_pairs(args.loader, heldout=1)
    setup_s = time.perf_counter() - t0
    steps = max(1, args.n // args.batch)
    flags = distill.resolve(distill.get_parser().parse_args(["--data", args.loader, "--batch", str(args.batch),
                                                             "--seed", str(args.seed)]))
    print(f"{args.loader}: {len(train_set):,} pairs; {steps} batches of {args.batch}, drawn as distill.py draws them "
          f"(seeded order, label dropout, a background thread ahead of the loop); the training thread takes them "
          + (f"with a {args.step_ms:g} ms step between" if args.step_ms else "with no work in between (the worst case)")
          + f"; {hardware(torch.device('cpu'))}, torch {torch.__version__}")
    seconds, start = [], time.perf_counter()
    batches = common.prefetched(lambda s: distill.batch_of_step(train_set, s, flags), range(steps))
    for _ in range(steps):
        t = time.perf_counter()
        next(batches)
        seconds.append(time.perf_counter() - t)
        time.sleep(args.step_ms / 1e3)
    wall = time.perf_counter() - start
    batches.close()
    now, peak = rss_mib()
    r = {"loader": args.loader, "pairs": len(train_set), "batch": args.batch, "batches": steps, "step_ms": args.step_ms,
         "setup_s": setup_s,
         "ms_per_batch": 1e3 * statistics.median(seconds), "ms_mean": 1e3 * statistics.mean(seconds),
         "ms_max": 1e3 * max(seconds), "batches_per_s": steps / wall, "rss_before_mib": before[0],
         "rss_mib": now, "peak_rss_mib": peak, "hardware": hardware(torch.device("cpu")), "torch": torch.__version__}
    print(f"training thread: waits {r['ms_per_batch']:.2f} ms per batch (median; mean {r['ms_mean']:.2f}, max "
          f"{r['ms_max']:.2f}), {r['batches_per_s']:,.1f} batches/s in all; setup {setup_s:.1f} s; resident memory "
          f"{before[0]:,.0f} MiB before loading, {now:,.0f} MiB after, peak {peak:,.0f} MiB")
    return [r]


# ----------------------------------------------------------------------------------------------

def parse_design(text):
    try:
        return dit.parse_design_name(text)
    except UsageError as e:
        raise UsageError(f"--designs: {e}")


def resolve_model(args, device):
    """--ckpt, --params or --d/--w/--h (default: the 5M design) -> (DiT on device, description, whether it is
    class-conditional, the CFG scales to time)."""
    config, source = {}, "random weights"
    if args.ckpt:
        if (args.params, args.depth, args.width, args.heads) != (None, None, None, None) or args.mlp_ratio != 4:
            raise UsageError("give one of --ckpt, --params or --d/--w/--h [--mlp-ratio] (a checkpoint has its own).")
        model, config = sample.load_model(args.ckpt, device)
        source = f"{args.ckpt} (EMA weights)"
    else:
        model = random_dit(*dit.resolve_design(args, default=dit.design("5M")), args.mlp_ratio, seed=args.seed)
        model = model.to(device)
    conditional = sample.guidance(config)[0]
    scales = [sample.guidance(config, s)[1] for s in args.cfg_scale] if args.cfg_scale else \
        [sample.PAPER_CFG, 1.0] if conditional else [1.0]
    return model, source + ("" if conditional else ", trained on unconditional pairs"), conditional, scales


def check_args(args, device):
    """Every flag checked, and every output made sure to be writable, before anything is timed."""
    cpu_pick = args.pick and device.type == "cpu"  # dozens of candidates: fewer repeats on a CPU
    args.repeats = args.repeats if args.repeats is not None else 3 if cpu_pick else 5
    args.warmup = args.warmup if args.warmup is not None else 1 if cpu_pick else 3
    positive_ints(args, "n", "batch", "repeats", "threads")
    check_number(args.warmup, "--warmup", low=0, integer=True)
    check_number(args.seed, "--seed", low=0, integer=True)
    for scale in args.cfg_scale or []:
        check_number(scale, "--cfg-scale", low=0)
    check_number(args.mlp_ratio, "--mlp-ratio", low=0, low_open=True)
    if args.sweep and args.mlp_ratio != 4:
        raise UsageError("--sweep times each design at its own MLP ratio: write it in the design's name "
                         "(--designs d5w64h8r2), not as --mlp-ratio.")
    for path, flag in ((args.json, "--json"), (args.onnx, "--onnx")):
        if path:
            writable_file(path, flag)
    if args.pick:
        if args.sweep or args.designs or args.ckpt or args.onnx or args.train or args.loader or \
                (args.params, args.depth, args.width, args.heads) != (None, None, None, None):
            raise UsageError("--pick chooses among its own candidates: use it without --sweep, --designs, --ckpt, "
                             "--onnx, --train, --loader and --d/--w/--h/--params; give the budgets as --max-params "
                             "and --max-ms.")
        if args.max_params is None or args.max_ms is None:
            raise UsageError("--pick needs both budgets: --max-params (parameters, e.g. 5M) and --max-ms (ms per "
                             "image at batch 128 and CFG 1.5, e.g. 20).")
        dit.parse_params(args.max_params)
        check_number(args.max_ms, "--max-ms", low=0, low_open=True)
        if args.modes and "," in args.modes:
            raise UsageError(f"--pick times the candidates in one mode; --modes {args.modes} names several.")
    elif args.max_params is not None or args.max_ms is not None:
        raise UsageError("--max-params and --max-ms are the budgets of --pick: add --pick.")
    if args.designs and not args.sweep:
        raise UsageError("--designs lists the designs a --sweep times: add --sweep (e.g. bench.py --sweep --designs "
                         "5,64,8 7,128,8), or time one design with --d/--w/--h or --params.")
    # parsed here, so that a misspelt design stops before the designs ahead of it are timed
    args.designs = [parse_design(text) for text in args.designs or []]
    if args.loader:
        if args.sweep or args.ckpt or args.onnx or args.train:
            raise UsageError("--loader times data loading alone: use it without --sweep, --ckpt, --onnx and --train.")
        args.batch = args.batch or 256
        args.n = args.n or 200 * args.batch
        check_number(args.step_ms, "--step-ms", low=0)
        return []
    if args.train:
        if args.sweep or args.ckpt or args.onnx:
            raise UsageError("--train times training steps of one design: use it without --sweep, --ckpt and --onnx.")
        if args.lpips_size != 0:
            check_number(args.lpips_size, "--lpips-size (0 keeps 32x32)", low=32, integer=True)
        args.batch = args.batch or (256 if device.type == "cuda" else 16)
        modes = (args.modes or ("fp32,bf16" if device.type != "mps" else "fp32")).split(",")
        for mode in modes:
            precision, *transforms = mode.split("+")
            if precision not in ("fp32", "bf16") or transforms not in ([], ["compile"]):
                raise UsageError(f"--train mode '{mode}': training modes are fp32 or bf16, each optionally "
                                 f"+compile (e.g. --modes fp32,bf16+compile).")
            if precision == "bf16" and device.type == "mps":
                raise UsageError("--train mode bf16: bf16 autocast runs on CUDA and CPU only; use fp32 on MPS.")
            problem = transforms and compile_problem(device)
            if problem:
                raise UsageError(f"--train mode {mode}: {problem}; choose modes without +compile.")
        return modes
    args.batch = args.batch or 128
    if args.n is None:  # 50k on a CPU takes minutes per design: a CPU sweep or pick times fewer and extrapolates
        args.n = PER_50K if device.type != "cpu" else 256 if args.sweep else 128 if args.pick else PER_50K
    if args.modes:
        modes = args.modes.split(",")
    else:
        fastest = fastest_mode(device)
        if args.pick:  # compiling each of dozens of candidates would take longer than timing them
            fastest = fastest.replace("+compile", "")
        modes = [fastest] if args.sweep or args.pick else \
            [m for m in BASE_MODES[device.type] if m != fastest] + [fastest]
    modes = [parse_mode(m, device) for m in modes]  # every mode checked before anything is timed
    for mode in modes:
        if mode.compile:
            problem = compile_problem(device)
            if problem:
                raise UsageError(f"mode {mode.name}: {problem}; choose modes without +compile.")
            pick_compile_mode(args.compile_mode, mode, device)
    return [mode.name for mode in modes]


def benchmark(args, device, modes):
    """One design (--ckpt, --params or --d/--w/--h): every CFG scale in every mode, as a Markdown table;
    or, with --onnx, the export and the trtexec command instead."""
    model, source, conditional, scales = resolve_model(args, device)
    d, w, h = model.depth, model.width, model.heads
    r = model.mlp_ratio
    print(f"DiT(d={d}, w={w}, h={h}{f', mlp_ratio={r:g}' if r != 4 else ''}), {source}: {dit.param_count(d, w, r):,} "
          f"parameters, {dit.flops_per_image(d, w, mlp_ratio=r) / 1e9:.3f} GFLOP/image per pass (x2 with CFG)")
    if args.onnx:
        err = export_onnx(model, args.onnx, args.batch, scales[0], args.opset, conditional)
        print(f"wrote {args.onnx}: batch {args.batch}, CFG {scales[0]:g} inside, adaLN folded; "
              + ("onnxruntime not installed: not checked" if err is None
                 else f"onnxruntime vs torch fp32: max error {err:.2e}"))
        print(f"time it with TensorRT (images/s = Throughput qps x {args.batch}; s per 50k = 50000 / images/s):"
              f"\n  {trtexec_command(args.onnx)}")
        return []
    print(f"{hardware(device)}, torch {torch.__version__}; {args.n:,} images at batch {args.batch} "
          f"({math.ceil(args.n / args.batch)} batches), median of {args.repeats} after {args.warmup} warm-up "
          f"batches; peak MiB: {'CUDA max allocated' if device.type == 'cuda' else 'process peak RSS'}")
    print(f"\n| mode | CFG | s per {args.n:,} (min-max) | img/s | ms/batch | TFLOP/s | of matmul rate | "
          f"peak MiB | setup s | max err |\n|" + " --- |" * 10)
    measured = []
    for cfg_scale in scales:
        for mode in modes:
            r = latency(model, args.n, args.batch, mode, cfg_scale, device, args.repeats, args.warmup,
                        args.compile_mode, args.seed, conditional)
            measured.append(r)
            print(f"| {r['mode']} | {cfg_scale:g} | {r['seconds']:.3f} ({r['seconds_min']:.3f}-"
                  f"{r['seconds_max']:.3f}) | {r['images_per_s']:,.0f} | {r['ms_per_batch']:.2f} | "
                  f"{r['tflops']:.3f} | {r['tflops'] / r['matmul_tflops']:.0%} of {r['matmul_tflops']:.3f} | "
                  f"{r['peak_mib']:.0f} | {r['setup_s']:.1f} | {r['max_err']:.1e} |", flush=True)
    print("\nmatmul rate: this machine's dense GEMM in the mode's compute dtype, measured in this run. TFLOP/s "
          "counts dit.flops_per_image (matmuls and attention). setup s: fold, compile, capture and the check.")
    return measured


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        with exit_on_usage_error():
            device = pick_device(args.device)
            modes = check_args(args, device)
            if args.threads:
                torch.set_num_threads(args.threads)
            job = loader_throughput if args.loader else train_throughput if args.train else sweep if args.sweep \
                else pick_design if args.pick else benchmark
            measured = job(args) if args.loader else job(args, device, modes)
    except AccuracyError as e:  # not the user's input: a mode that computes wrong images (exit 1)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if args.json and measured:
        write_json(args.json, measured)
    return measured


if __name__ == "__main__":
    main()
