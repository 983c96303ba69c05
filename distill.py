"""
One-step distillation of a class-conditional DiT student from teacher noise-image pairs (paper,
appendix B.1 and C: the GET setup): minimise loss(x, G(z, y)) over the teacher's pairs (z, y, x).

    python distill.py --d 5 --w 64 --h 8                    # quick start: built-in toy teacher, CPU, ~8-9 min
    python distill.py --params 5M --data PATH/EDM-Cond-CIFAR  # paper: (7,192,12), LPIPS, 100 epochs
    torchrun --nproc_per_node 4 distill.py --params 5M --data PATH   # DDP; the global batch stays 256
    python distill.py ... --resume                          # continue from OUT/ckpt.pt exactly

Writes OUT/ckpt.pt (model, EMA, optimizer, step, RNG states, config), OUT/grid.png (EMA samples,
CFG 1.5), OUT/metrics.jsonl (held-out metrics per evaluation) and OUT/results.json (the last one).
ta.py and mi1.py subclass `Method` (their extra loss terms) and reuse `train()`; losses live in the LOSSES table.
"""
import functools
import json
import math
import os
import queue
import signal
import sys
import threading
import time
import warnings
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import data
import dit
import fid
import sample
import toy
from common import (UsageError, atomic_write, check_number, compile_problem, download_file,
                    exit_on_usage_error, hardware, load_torch_file, pick_device, positive_ints, writable_dir,
                    write_json)

# ----------------------------------------------------------------------------------------------
# Flags. None means "resolved by --data": the paper's value for real pairs, a laptop-sized one for toy.

PAPER = dict(loss="lpips", batch=256, epochs=100, lr=1e-4, warmup=0, grad_clip=0.0, log_every=100)
TOY = dict(loss="toy-lpips", batch=32, steps=800, lr=2e-3, warmup=100, grad_clip=1.0, log_every=50, eval_every=400)
# what defines a run besides its step count: --resume refuses a change to any of these (e.g. a batch-32 run
# continued at batch 128 would be neither recipe)
RECIPE_KEYS = ("depth", "width", "heads", "data", "toy_pairs", "toy_seed", "holdout", "loss", "lpips_net",
               "lpips_size", "batch", "lr", "warmup", "grad_clip", "weight_decay", "ema", "label_dropout", "seed")


def get_parser(method=None):
    """distill.py's flags; with a Method, that method's flags too (ta.py, mi1.py)."""
    design = method.default_design if method else (5, 64, 8)
    p, g = dit.design_parser(sys.modules[method.__module__].__doc__ if method else __doc__,
                             "model (DESIGN.md 1-2); default: the design (%d,%d,%d)" % design)
    data.add_flags(p)
    g = p.add_argument_group("optimisation (paper, appendix C)")
    g.add_argument("--loss", choices=sorted(LOSSES), help="distillation loss (real: lpips; toy: toy-lpips, the toy "
                   "teacher's stand-in for LPIPS, see toy.py)")
    g.add_argument("--lpips-net", choices=sorted(LPIPS_BACKBONES), default="vgg", help="LPIPS trunk (GET: vgg)")
    g.add_argument("--lpips-size", type=int, default=224, help="upsample to this size before LPIPS (0: 32x32)")
    g.add_argument("--lpips-backbone", help="local trunk weights file (vgg16-397923af.pth / alexnet-owt-"
                   "7be5be79.pth); 'random' for random weights (tests only)")
    g.add_argument("--lr", type=float, help="AdamW learning rate, constant between --warmup and --decay (real: 1e-4; "
                   "toy: 2e-3)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (paper 0.01; GET 0)")
    g.add_argument("--warmup", type=int, help="steps of linear learning-rate warm-up from 0 (real: 0, the paper's "
                   "constant rate; toy: 100)")
    g.add_argument("--decay", type=int, default=0, help="steps at the end over which the rate falls linearly "
                   "to 0 (0: none, the paper); resume a finished run with more --steps and --decay N to add one")
    g.add_argument("--grad-clip", type=float, help="clip the gradient's global norm to this, 0: off (real: 0 as in "
                   "the paper; toy: 1)")
    g.add_argument("--batch", type=int, help="global batch, split over processes (real: 256; toy: 32)")
    g.add_argument("--epochs", type=float, help="passes over the training pairs (real: 100)")
    g.add_argument("--steps", type=int, help="optimiser steps; overrides --epochs (toy: 800)")
    g.add_argument("--ema", type=float, default=0.9999, help="EMA decay, warmed up as min(ema, (1+n)/(10+n))")
    g.add_argument("--label-dropout", type=float, default=0.1, help="label -> null class rate, for CFG")
    g.add_argument("--seed", type=int, default=0, help="seed (>= 0) of init, data order, label dropout")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="output folder (default runs/d{d}w{w}h{h}_{loss})")
    g.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt (a finished run with the same "
                   "--steps: measure it again)")
    g.add_argument("--log-every", type=int, help="steps between log lines (real: 100; toy: 50)")
    g.add_argument("--eval-every", type=int, help="steps between held-out eval, grid, checkpoint (real: 1 epoch)")
    g.add_argument("--cfg-scale", type=float, help="guidance scale of the sample grid and FID (paper 1.5; 1 for "
                   "unconditional pairs, whose model is sampled with the null class)")
    g.add_argument("--device", help="cuda, mps or cpu (default: the first available)")
    g.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 autocast (CUDA, CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g = p.add_argument_group("FID and IS of the EMA model (fid.py); needs the FID Inception weights locally")
    g.add_argument("--fid-every", type=int, help="steps between FID evaluations (default: once at the end, "
                   "real data only; toy data: only when given)")
    g.add_argument("--fid-n", type=int, default=50_000, help="samples per FID (published FIDs use 50,000)")
    g.add_argument("--fid-ref", default="train", help="reference: CIFAR-10 'train' (EDM), 'test' (GET) or a "
                   "mu/sigma .npz")
    g.add_argument("--inception", help="FID Inception weights file (default: the torch hub cache)")
    g.add_argument("--cifar", help="CIFAR-10 python tarball for the reference statistics (default: data/)")
    p.set_defaults(method=method.name if method else "distill", default_design=design)
    if method:
        method.add_flags(p.add_argument_group(f"{method.name}: {method.title}"))
    return p


# ----------------------------------------------------------------------------------------------
# Losses: name -> builder(args, device) -> loss(pred, target) scalar. ta.py and mi1.py use the same table.

LPIPS_BACKBONES = {  # the torchvision trunk weights that the lpips package expects, by sha256 prefix
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
}


def lpips_backbone_file(net, path=None, download=True):
    """The trunk weights: --lpips-backbone PATH, else the torch hub cache, else downloaded there
    (hash checked). Returns None when offline and uncached and download=False; raises otherwise."""
    name, url = LPIPS_BACKBONES[net]
    if path:
        if not os.path.isfile(path):
            raise UsageError(f"--lpips-backbone {path}: no such file (expected torchvision's {name}).")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    if os.path.isfile(cached) or not download:
        return cached if os.path.isfile(cached) else None
    try:
        download_file(url, cached, sha256_prefix=name.split("-")[-1].split(".")[0])
        return cached
    except OSError as e:
        raise UsageError(f"the LPIPS loss needs torchvision's {net} weights {name}, which are not in the cache "
                         f"folder {os.path.dirname(cached)} and could not be downloaded from {url} ({e}). Put the "
                         f"file there (or pass --lpips-backbone FILE), or train offline with --loss l2.")


def build_lpips(net, device, backbone=None, download=True):
    """Frozen LPIPS (inputs on [-1,1]) with the trunk loaded by us, so it never downloads behind our back.
    backbone='random' keeps random trunk weights (tests). Returns None if unavailable and download=False."""
    if backbone != "random":
        backbone = lpips_backbone_file(net, backbone, download)
        if backbone is None:
            return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated"
        import lpips
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)  # linear heads ship with lpips
    if backbone != "random":
        what = f"torchvision's {net} trunk weights {LPIPS_BACKBONES[net][0]}"
        weights = load_torch_file(backbone, what, "--lpips-backbone")
        try:  # lpips keeps torchvision's layer indices inside its slices: slice2.5.weight <- features.5.weight
            model.net.load_state_dict({k: weights["features." + k.split(".", 1)[1]] for k in model.net.state_dict()})
        except (KeyError, TypeError, RuntimeError) as e:
            raise UsageError(f"--lpips-backbone {backbone} is not {what} ({type(e).__name__}: {str(e)[:200]}); "
                             f"download {LPIPS_BACKBONES[net][1]}.")
    return model.eval().requires_grad_(False).to(device)


def lpips_loss(args, device):
    net = build_lpips(args.lpips_net, device, args.lpips_backbone)
    size = args.lpips_size

    def loss(pred, target):
        if size:  # GET compares at 224x224: both images bilinearly upsampled
            pred, target = (F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
                            for t in (pred, target))
        return net(pred.float(), target.float()).mean()

    loss.net = net
    return loss


LOSSES = {
    "l1": lambda args, device: lambda pred, target: (pred - target).abs().mean(),
    "l2": lambda args, device: lambda pred, target: ((pred - target) ** 2).mean(),
    "lpips": lpips_loss,
    "toy-lpips": lambda args, device: toy.perceptual_loss(common.CACHE_DIR, device),  # LPIPS's form, toy network
}


def build_loss(args, device):
    return LOSSES[args.loss](args, device)


# ----------------------------------------------------------------------------------------------
# Configuration, device, processes

def resolve(args):
    """Fill every None flag and check every value; the result is the run's config (a plain dict in every
    checkpoint). Raises UsageError naming the flag."""
    defaults = TOY if args.data == "toy" else PAPER
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.depth, args.width, args.heads = dit.resolve_design(args, default=args.default_design)
    positive_ints(args, "batch", "steps", "log_every", "eval_every", "holdout", "fid_every")
    if args.data == "toy":
        toy.check_sizes(args.toy_pairs, args.holdout, args.toy_seed)
    elif args.loss == "toy-lpips":
        raise UsageError("--loss toy-lpips compares images in the features of a network trained on the toy "
                         "teacher's shapes, which mean nothing for real images; use --loss lpips (or l1, l2).")
    check_number(args.seed, "--seed", low=0, integer=True)
    check_number(args.epochs, "--epochs", low=0, low_open=True)
    check_number(args.lr, "--lr", low=0, low_open=True)
    check_number(args.warmup, "--warmup", low=0, integer=True)
    check_number(args.grad_clip, "--grad-clip", low=0)
    check_number(args.decay, "--decay", low=0, integer=True)
    check_number(args.weight_decay, "--weight-decay", low=0)
    check_number(args.ema, "--ema", low=0, high=1)
    check_number(args.label_dropout, "--label-dropout", low=0, high=1)
    check_number(args.cfg_scale, "--cfg-scale", low=0)
    check_number(args.fid_n, "--fid-n", low=10, integer=True)  # IS averages over 10 splits
    if args.lpips_size != 0:  # VGG pools four times before its last LPIPS layer: 32 pixels is the least
        check_number(args.lpips_size, "--lpips-size (0 keeps 32x32)", low=32, integer=True)
    prefix = "" if args.method == "distill" else args.method + "_"  # runs/ta_d5w64h8_l2 for ta.py
    args.out = args.out or os.path.join("runs", f"{prefix}d{args.depth}w{args.width}h{args.heads}_{args.loss}")
    return args


def setup_processes(args):
    """Single process by default; DDP when started by torchrun (gloo on CPU, NCCL on CUDA).
    Returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, pick_device(args.device)
    local = int(os.environ["LOCAL_RANK"])
    device = pick_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if args.batch % world:
        raise UsageError(f"--batch {args.batch} does not split evenly over {world} processes.")
    return dist.get_rank(), world, device


def stop_on_sigterm():
    """A scheduler's SIGTERM (job time limit, preemption, `timeout`) stops training as Ctrl-C does: the loop
    saves a checkpoint and exits, and --resume continues."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def autocast(args, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")


# ----------------------------------------------------------------------------------------------
# Checkpoints: plain tensors and dicts, written atomically, loadable with weights_only=True

def save_checkpoint(path, run, step, config):
    state = {"model": run.model.state_dict(), "ema": run.ema.state_dict(), "optimizer": run.opt.state_dict(),
             "extra": run.extra.state_dict() if run.extra is not None else {}, "step": step,
             "rng": {"torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
             "config": dict(config)}
    atomic_write(path, lambda tmp: torch.save(state, tmp))  # a crash mid-write never leaves a broken ckpt.pt


def load_checkpoint(path):
    """The checkpoint a --resume continues; a file that is not one is a UsageError."""
    state = load_torch_file(path, "a checkpoint written by distill.py, ta.py or mi1.py", "--resume:")
    missing = [k for k in ("model", "ema", "optimizer", "extra", "step", "rng", "config")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise UsageError(f"--resume: {path} is not a checkpoint this script can resume (it lacks "
                         f"{', '.join(missing)}); move it away or choose another --out.")
    return state


# ----------------------------------------------------------------------------------------------
# Held-out measurement against the teacher

@torch.no_grad()
def evaluate(predict, held, device, lpips_net=None, scorer=None, cfg_scale=None, batch=sample.METRIC_BATCH):
    """predict(z, y) -> images, over the held-out pairs: mean L2 (MSE), its PSNR, and LPIPS if a net is given.
    With a toy Scorer, also the toy FID, class accuracy and teacher's-mode rate: of the predictions themselves,
    or, given cfg_scale (predict is then a DiT), of its samples guided at that scale; and then the toy FID at
    the scale that suits it best (toy_fid_tuned, at cfg_tuned: toy.Scorer.tuned)."""
    n, halves = len(held), None
    if scorer is not None:
        z_all, labels, teacher = held.batch(torch.arange(n))
        if cfg_scale is not None:  # a DiT's conditional half is its prediction: both once, for PSNR and every scale
            halves = sample.guidance_halves(predict, z_all, labels, device, batch)
    sq, lp, preds = 0.0, 0.0, []
    for i in range(0, n, batch):
        z, y, x = (t.to(device) for t in held.batch(torch.arange(i, min(i + batch, n))))
        pred = halves[0][i:i + batch].to(device) if halves else predict(z, y).float()
        sq += ((pred - x) ** 2).mean(dim=(1, 2, 3)).sum().item()
        if lpips_net is not None:
            lp += lpips_net(pred, x).sum().item()
        if scorer is not None and halves is None:
            preds.append(pred.cpu())
    out = {"l2": sq / n, "psnr": data.psnr(sq / n)}
    if lpips_net is not None:
        out["lpips"] = lp / n
    if scorer is not None:
        out.update(scorer(dit.guided(halves, cfg_scale) if halves else torch.cat(preds), labels, teacher))
    if halves is not None:
        best, tuned = scorer.tuned(predict, halves, labels, device)
        out.update(toy_fid_tuned=tuned["toy_fid"], cfg_tuned=best)
    return out


def setup_fid(args, device, log):
    """(Inception, reference mu, sigma) when FID is due and its files are here; else None, said once and why."""
    if args.data == "toy" and not args.fid_every:
        log("FID skipped: the toy teacher's images are not CIFAR-10 (pass --fid-every N to measure it anyway).")
        return None
    ok, why = fid.inception_available(args.inception)
    if not ok:
        log(f"FID skipped: {why}")
        return None
    try:
        net = fid.load_inception(args.inception, device, download=False)
        mu, sigma = fid.reference_stats(args.fid_ref, args.cifar, net, device, download=False)
    except UsageError as e:
        log(f"FID skipped: {e}")
        return None
    if args.fid_n < fid.PUBLISHED_N:
        log(f"FID of {args.fid_n:,} samples is not comparable with published 50k FIDs.")
    return net, mu, sigma


def fmt_metrics(m):
    formats = {"psnr": "psnr {:.2f} dB", "toy_fid": "toy_fid {:.2f}", "toy_acc": "toy_acc {:.1%}",
               "toy_mode": "toy_mode {:.1%}", "toy_fid_tuned": "toy_fid_tuned {:.2f}", "cfg_tuned": "at cfg {:g}"}
    return " ".join(formats.get(k, k + " {:.4f}").format(v) for k, v in m.items())


# ----------------------------------------------------------------------------------------------
# The method contract: ta.py and mi1.py subclass Method; plain distillation is `method=None`

class Method(nn.Module):
    """A distillation method: loss terms added to (or replacing) the plain loss(x, G(z, y)).

    A subclass is the method's idea and little else. Class attributes:
      name            recorded as the config's `method`; prefixes the run folder (runs/ta_d5w64h8_l2)
      title           the heading of its flags in --help
      default_design  (d, w, h) trained when no --d/--w/--h or --params is given
      needs_hidden    the student then also returns its blocks' hidden states (computed only then)
      base_weight     lambda_0 of the plain term (an instance may set it; 0 skips the term)
      config_keys     settings that must match on --resume
    and methods: add_flags(group), check(args) (flag checks needing no files; raise UsageError),
    build(args, device, loss_fn) -> the module for this run, forward(model, z, y, x, pred, hidden) ->
    (loss, {term name: detached scalar}). Its trainable parameters are optimised and checkpointed with
    the student; a frozen network it holds must not be a submodule (set it with object.__setattr__)."""
    name, title = "method", "a distillation method"
    default_design = (5, 64, 8)
    needs_hidden = False
    base_weight = 1.0
    config_keys = ()

    @staticmethod
    def add_flags(group):
        pass

    @staticmethod
    def check(args):
        pass

    @classmethod
    def build(cls, args, device, loss_fn):
        raise NotImplementedError

    # shared checks for a method's flags
    @staticmethod
    def numbers(text, flag, kind, example, sep=","):
        """'a,b,c' -> [kind(a), kind(b), kind(c)], or a UsageError naming the flag and an example."""
        try:
            return [kind(v) for v in text.split(sep)]
        except ValueError:
            raise UsageError(f"{flag} {text}: expected {kind.__name__}s separated by '{sep}', e.g. {flag} {example}.")

    @staticmethod
    def check_blocks(blocks, depth, flag, who="the student"):
        """Block numbers (1-based) that must increase and lie in 1..depth; raises UsageError."""
        if any(not 1 <= b <= depth for b in blocks):
            raise UsageError(f"{flag}: blocks {blocks} are not all among {who}'s blocks 1..{depth}.")
        if any(b <= a for a, b in zip(blocks, blocks[1:])):
            raise UsageError(f"{flag}: blocks {blocks} must be increasing (each of {who}'s blocks is mapped "
                             f"at most once, in order).")


# ----------------------------------------------------------------------------------------------
# Training: the batch, one step, evaluation, the loop

@functools.lru_cache(maxsize=1)
def epoch_order(n, seed, epoch):
    """The training pairs' order in an epoch: from (seed, epoch) alone, so every DDP rank and every resume
    sees exactly the batches one uninterrupted run would."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def batch_of_step(train_set, step, args, rank=0, world=1):
    """This process's share of step `step`'s global batch -> (z, y, x) with label dropout applied: a
    seeded --label-dropout fraction of labels becomes the null class (dit.NUM_CLASSES), for CFG."""
    steps_per_epoch = len(train_set) // args.batch
    epoch, in_epoch = divmod(step, steps_per_epoch)
    local = args.batch // world
    idx = epoch_order(len(train_set), args.seed, epoch)[in_epoch * args.batch:(in_epoch + 1) * args.batch]
    z, y, x = train_set.batch(idx[rank * local:(rank + 1) * local])
    g = torch.Generator().manual_seed(args.seed * 104729 + step)
    drop = torch.rand(args.batch, generator=g)[rank * local:(rank + 1) * local] < args.label_dropout
    return z, torch.where(drop, torch.full_like(y, dit.NUM_CLASSES), y), x


def prefetched(make, steps, depth=4, pin=False):
    """make(step) for each step of `steps`, made by a background thread up to `depth` steps ahead (in pinned memory
    when pin, so the copy to a GPU overlaps its work): the training thread only takes a finished batch. Memory
    holds at most depth + 2 batches. An error in make() is raised here, at that step."""
    ready = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry):  # put, unless the consumer has gone: True when it was put
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for step in steps:
                if not offer((tuple(t.pin_memory() for t in make(step)) if pin else make(step), None)):
                    return
        except Exception as e:  # raised in the training thread, where it belongs
            offer((None, e))

    worker = threading.Thread(target=work, daemon=True, name="prefetch")
    worker.start()
    try:
        for _ in steps:
            item, error = ready.get()
            if error is not None:
                raise error
            yield item
    finally:  # the loop ended, broke off or was interrupted: the thread stops after its current batch, and is
        stop.set()  # waited for, as a thread still inside torch when the interpreter exits aborts the process
        worker.join()


def ema_decay(step, ema):
    """EMA decay at optimiser step `step` (0-based): warmed up as min(ema, (1 + step) / (10 + step))."""
    return min(ema, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def build_student(args, device, loss_fn, method=None, world=1, total_steps=None):
    """The student (seeded by --seed), its EMA copy, the method's module, AdamW over both, and the
    forward to call (compiled and/or DDP-wrapped) -> a namespace train_step runs on. total_steps (the run's
    length) is needed only for a --decay."""
    torch.manual_seed(args.seed)
    model = dit.DiT(args.depth, args.width, args.heads).to(device)
    ema = dit.DiT(args.depth, args.width, args.heads).to(device)
    ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    # the method's module is built after the student, so its student starts exactly as distill.py's would
    extra = method.build(args, device, loss_fn).to(device) if method else None
    extra_params = [p for p in extra.parameters() if p.requires_grad] if extra is not None else []
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + extra_params, lr=args.lr,
                            weight_decay=args.weight_decay)
    fwd = torch.compile(model) if args.compile else model
    if world > 1:
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    return SimpleNamespace(model=model, ema=ema, extra=extra, extra_params=extra_params, opt=opt, fwd=fwd,
                           loss_fn=loss_fn, world=world, autocast=autocast(args, device), ema_max=args.ema,
                           lr=args.lr, warmup=args.warmup, decay=args.decay, total=total_steps,
                           grad_clip=args.grad_clip,
                           needs_hidden=bool(extra is not None and extra.needs_hidden),
                           base_weight=extra.base_weight if extra is not None else 1.0)


def learning_rate(step, lr, warmup, decay, total):
    """The rate at 0-based `step` of `total`: linear warm-up from 0 over the first `warmup` steps, constant `lr`,
    then a linear fall to 0 over the last `decay` steps (warm-up, stable, decay: a run finished at the constant
    rate can be resumed with more steps and a decay, and matches a run trained that way from the start)."""
    scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
    return lr * (min(scale, (total - step) / decay) if decay else scale)


def train_step(run, z, y, x, step):
    """One optimiser step on a batch (on the run's device): loss = base_weight * loss(x, G(z, y)) + the
    method's terms; AdamW, then the EMA. Returns (loss, {term: value}), detached, without a host sync."""
    with run.autocast:
        out = run.fwd(z, y, return_hidden=run.needs_hidden)
        pred, hidden = out if run.needs_hidden else (out, None)  # pred [B,3,32,32]
        loss = run.base_weight * run.loss_fn(pred.float(), x) if run.base_weight else 0.0
        terms = {}
        if run.extra is not None:
            extra_loss, terms = run.extra(run.model, z, y, x, pred, hidden)
            loss = loss + extra_loss
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if run.world > 1:  # DDP averages the student's gradients; the method's own weights are averaged here
        for p in run.extra_params:
            dist.all_reduce(p.grad)
            p.grad /= run.world
    if run.grad_clip:  # one global norm over the student's and the method's weights
        torch.nn.utils.clip_grad_norm_([p for group in run.opt.param_groups for p in group["params"]], run.grad_clip)
    for group in run.opt.param_groups:
        group["lr"] = learning_rate(step, run.lr, run.warmup, run.decay, run.total)
    run.opt.step()
    ema_update(run.ema, run.model, ema_decay(step, run.ema_max))
    return loss.detach(), terms


def measure(run, held, baselines, lpips_eval, scorer, fid_setup, step, config, device):
    """Held-out metrics of the EMA model (the toy metrics of its guided samples with a toy Scorer; FID when
    fid_setup is given): appended to metrics.jsonl, written as results.json beside the baselines', the sample
    grid redrawn. Returns the record."""
    args = SimpleNamespace(**config)
    metrics = evaluate(run.ema, held, device, lpips_eval, scorer, args.cfg_scale)
    if fid_setup is not None:
        metrics.update(fid.fid_of_model(run.ema, *fid_setup, n=args.fid_n, cfg_scale=args.cfg_scale, device=device,
                                        progress=sys.stderr.isatty(), conditional=args.conditional))
    record = {"step": step, "ema": metrics, **baselines, "param_count": args.param_count,
              "design": [args.depth, args.width, args.heads], "loss": args.loss, "method": args.method,
              "data": args.data, "conditional": args.conditional,
              **({"fid": metrics["fid"], "fid_n": args.fid_n, "fid_ref": fid.reference_name(args.fid_ref),
                  "fid_cfg_scale": args.cfg_scale} if fid_setup is not None else {}),
              "batch": args.batch, "lr": args.lr, "warmup": args.warmup, "decay": args.decay,
              "grad_clip": args.grad_clip, "seed": args.seed,
              **({"toy_seed": args.toy_seed} if args.data == "toy" else {}),
              "wall_s": args.wall_s, "hardware": f"{hardware(device)}, {args.world} process(es)"}
    with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    write_json(os.path.join(args.out, "results.json"), record)
    sample.save_grid(run.ema, os.path.join(args.out, "grid.png"), cfg_scale=args.cfg_scale, device=device,
                     conditional=args.conditional)
    return record


def train(args, method=None):
    """Distil a student from the pairs of --data with the plain loss and, if given, a Method's terms."""
    # -- processes, device, output folder: every check before any slow work ------------------------
    rank, world, device = setup_processes(args)
    master = rank == 0
    log = tqdm.write if master else (lambda *a, **k: None)  # tqdm.write keeps a progress bar intact
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls/convs: free speed on Ampere+
        torch.backends.cudnn.allow_tf32 = True
    if args.dtype == "bf16" and device.type == "mps":
        raise UsageError("--dtype bf16 is supported here on CUDA and CPU only; use --dtype fp32 on MPS.")
    if args.dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("this GPU does not support bf16; use --dtype fp32.")
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if os.path.exists(ckpt_path) and not args.resume:
        raise UsageError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out.")
    if args.resume and not os.path.exists(ckpt_path):
        raise UsageError(f"--resume: no checkpoint at {ckpt_path}; start without --resume.")
    state = load_checkpoint(ckpt_path) if args.resume else None
    writable_dir(args.out, "--out")  # now, not when the first checkpoint is due
    problem = args.compile and compile_problem(device)
    if problem:
        raise UsageError(f"--compile: {problem}; train without --compile.")

    # -- data: the teacher's pairs, a held-out split, the step count ---------------------------------
    toy_kwargs = data.toy_options(args)
    if master:
        train_set, held = data.load_pairs(args.data, args.holdout, **toy_kwargs)
        if args.data == "toy":  # the toy metric's network and the toy LPIPS's: on first use, trained side by side
            toy.trained_nets(["metric"] + ["perceptual"] * (args.loss == "toy-lpips"), common.CACHE_DIR)
    if world > 1:
        dist.barrier()  # rank 0 builds the toy caches or converts GET's pairs; the others then read them
        if not master:
            train_set, held = data.load_pairs(args.data, args.holdout, **toy_kwargs)
    # unconditional pairs train the null class only: such a model is sampled with it, without guidance
    args.conditional = bool(getattr(train_set, "conditional", True))
    _, args.cfg_scale = sample.guidance(vars(args), args.cfg_scale)
    steps_per_epoch = len(train_set) // args.batch
    if steps_per_epoch == 0:
        raise UsageError(f"--batch {args.batch} is larger than the {len(train_set)} training pairs.")
    total = args.steps or math.ceil((args.epochs or 1) * steps_per_epoch)
    eval_every = args.eval_every or steps_per_epoch

    # -- loss, metric networks, model, EMA, method, optimizer, resume ------------------------------
    # a missing LPIPS trunk stops the run here, before step 0; the metric uses it whenever it is cached
    loss_fn = build_loss(args, device)
    lpips_eval = getattr(loss_fn, "net", None) or build_lpips(args.lpips_net, device, args.lpips_backbone
                                                              if args.lpips_backbone != "random" else None,
                                                              download=False)
    run = build_student(args, device, loss_fn, method, world, total_steps=total)
    step = 0
    if state is not None:  # a resume must not change the run's recipe (--steps and --decay may grow)
        old = state["config"]
        for k in RECIPE_KEYS + (method.config_keys if method else ()):
            if k in old and old[k] != getattr(args, k):  # a key older checkpoints lack is not checked
                raise UsageError(f"--resume: the checkpoint has {k}={old.get(k)}, this command "
                                 f"{k}={getattr(args, k)}; resume with the same settings, or choose another --out.")
        try:
            run.model.load_state_dict(state["model"])
            run.ema.load_state_dict(state["ema"])
            run.opt.load_state_dict(state["optimizer"])
            if run.extra is not None:
                run.extra.load_state_dict(state["extra"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--resume: {ckpt_path} holds weights that do not fit this run ({type(e).__name__}: "
                             f"{str(e)[:300]}); resume with the same settings, or choose another --out.")
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        step = state["step"]
        if step > total:
            raise UsageError(f"--resume: {ckpt_path} is at step {step}, past this command's {total} steps; give "
                             f"--steps {step} or more (the same {step} measures the finished run again).")
    config = dict(vars(args), param_count=dit.param_count(args.depth, args.width), total_steps=total, world=world)
    log("config: " + json.dumps(config, sort_keys=True))
    if state is not None:
        log(f"resumed from {ckpt_path} at step {step}")
    # the toy metrics (toy FID, class accuracy) stand in for FID on the toy teacher: rank 0 measures
    scorer = toy.Scorer(train_set.x, common.CACHE_DIR) if args.data == "toy" and master else None
    means = data.class_means(train_set).to(device)
    baselines = {"class_mean": evaluate(lambda z, y: means[y], held, device, lpips_eval, scorer)}
    log(f"class-mean baseline (predict the class's mean teacher image) on {len(held)} held-out pairs: "
        f"{fmt_metrics(baselines['class_mean'])}")
    if scorer is not None:
        _, y_held, x_held = held.batch(torch.arange(len(held)))
        baselines["teacher"] = scorer(x_held, y_held)
        log(f"the teacher's own held-out images: {fmt_metrics(baselines['teacher'])} (the floor: a student that "
            f"imitated it exactly would score this)")
    if lpips_eval is None:
        log("LPIPS metric skipped: its trunk weights are not in the torch hub cache (see README).")
    fid_setup = setup_fid(args, device, log) if master else None

    def measure_and_save(fid_due):  # rank 0: the held-out metrics, results.json, grid and checkpoint
        record = measure(run, held, baselines, lpips_eval, scorer, fid_setup if fid_due else None, step, config,
                         device)
        log(f"eval step {step} | ema {fmt_metrics(record['ema'])} | class-mean psnr "
            f"{baselines['class_mean']['psnr']:.2f} dB")
        save_checkpoint(ckpt_path, run, step, config)

    wall_before = state["config"].get("wall_s", 0.0) if state is not None else 0.0
    if step == total and master:  # a finished run resumed: measured again, with this code's metrics
        config["wall_s"] = wall_before
        measure_and_save(fid_due=fid_setup is not None)

    # -- the loop: a step per batch; a log line, evaluation and checkpoint at their intervals ---------
    t_start = t_log = time.time()
    step_at_start, loss_sum, loss_count, term_sums = step, torch.zeros((), device=device), 0, {}
    bar = None
    run.model.train()
    stop_on_sigterm()
    # the batches, gathered by a background thread ahead of the step that needs them
    batches = prefetched(lambda s: batch_of_step(train_set, s, args, rank, world), range(step, total),
                         pin=device.type == "cuda")
    try:
        while step < total:
            if bar is None:  # a new epoch (or the first after a resume)
                epoch, in_epoch = divmod(step, steps_per_epoch)
                bar = tqdm(total=steps_per_epoch, initial=in_epoch, desc=f"epoch {epoch}", leave=False,
                           disable=not master or not sys.stderr.isatty())
            z, y, x = (t.to(device, non_blocking=True) for t in next(batches))
            loss, terms = train_step(run, z, y, x, step)
            step += 1
            loss_sum += loss
            loss_count += 1
            for k, v in terms.items():
                term_sums[k] = term_sums.get(k, 0.0) + v
            bar.update(1)
            if step % steps_per_epoch == 0:
                bar.close()
                bar = None

            last = step == total
            if step % args.log_every == 0 or step % eval_every == 0 or last:
                mean_loss = (loss_sum / loss_count).item()  # the one host sync per interval
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"loss is {mean_loss} in steps {step - loss_count + 1}..{step}")
                now = time.time()
                rate = loss_count * args.batch / (now - t_log)
                eta = (now - t_start) / (step - step_at_start) * (total - step)
                means_of_terms = "".join(f" | {k} {v.item() / loss_count:.4f}" for k, v in term_sums.items())
                log(f"step {step}/{total} | loss {mean_loss:.4f}{means_of_terms} | {rate:.1f} img/s | "
                    f"eta {eta / 60:.1f} min")
                loss_sum.zero_()
                term_sums.clear()
                loss_count, t_log = 0, now
            fid_due = fid_setup is not None and (last or bool(args.fid_every) and step % args.fid_every == 0)
            if step % eval_every == 0 or last or fid_due:
                config["wall_s"] = round(time.time() - t_start + wall_before, 1)
                if master:
                    measure_and_save(fid_due)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep the work done so far
        if bar:
            bar.close()
        if master:
            save_checkpoint(ckpt_path, run, step, config)
        log(f"\ninterrupted at step {step}: checkpoint saved to {ckpt_path}; continue with --resume")
        sys.exit(130)
    except FloatingPointError as e:
        log(f"error: {e}. Stopped; the last good checkpoint {ckpt_path} is kept (nothing was saved after it). "
            f"Try a lower --lr, or --dtype fp32.")
        sys.exit(1)
    finally:
        batches.close()  # stops the prefetching thread

    # -- the end ---------------------------------------------------------------------------------
    if world > 1:
        dist.destroy_process_group()
    log(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min; checkpoint {ckpt_path}, "
        f"samples {os.path.join(args.out, 'grid.png')}")
    return run.model, run.ema


def main(argv=None, method=None):
    """Parse, resolve, check (the method's flags), train; bad input ends in one paragraph, exit 2."""
    args = get_parser(method).parse_args(argv)
    with exit_on_usage_error():
        args = resolve(args)
        if method is not None:
            method.check(args)
        return train(args, method)


if __name__ == "__main__":
    main()
