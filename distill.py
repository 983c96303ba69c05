"""
One-step distillation of a class-conditional DiT student from a teacher's noise-image pairs (the paper's GET setup,
appendix B.1 and C): minimise loss(x, G(z, y)) over the teacher's pairs (z, y, x), with AdamW, an EMA of the
weights, and label dropout so the student can be sampled with classifier-free guidance.

    python distill.py --d 5 --w 64 --h 8                      # quick start: the built-in toy teacher, a laptop CPU
    python distill.py --params 5M --data PATH/EDM-Cond-CIFAR  # the paper: (7,192,12), LPIPS, 100 epochs
    torchrun --nproc_per_node 4 distill.py --params 5M --data PATH   # DDP; the global batch stays 256
    python distill.py ... --resume                            # continue OUT/ckpt.pt exactly where it stopped

Writes OUT/ckpt.pt (model, EMA, optimizer, step, RNG state, config), OUT/grid.png (EMA samples), OUT/metrics.jsonl
(one held-out evaluation per line) and OUT/results.json (the last one). Read train() first: setup, data, model,
the loop, the end. The loss is one entry of LOSSES; ta.py and mi1.py add their terms through a `Method`.
"""
import contextlib
import functools
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import data
import dit
import sample
import toy
import measure
from common import UsageError, check_number, exit_on_usage_error, load_torch_file

# ----------------------------------------------------------------------------------------------
# Flags. None means "set by --data": the paper's value for real pairs, a laptop-sized one for the toy teacher.

PAPER = dict(loss="lpips", batch=256, epochs=100, lr=1e-4, warmup=0, decay=0, grad_clip=0.0, log_every=100)
TOY = dict(loss="toy-lpips", batch=16, steps=900, lr=3e-3, warmup=100, decay=400, grad_clip=1.0, log_every=50,
           eval_every=900)  # the quick start: about 4 minutes on 2 CPU cores
# what defines a run besides its length: --resume refuses a change to any of these
RECIPE_KEYS = ("depth", "width", "heads", "mlp_ratio", "data", "toy_pairs", "toy_seed", "holdout", "loss", "lpips_net",
               "lpips_size", "batch", "lr", "warmup", "grad_clip", "weight_decay", "ema", "label_dropout", "seed")


def get_parser(method=None):
    """distill.py's flags; with a Method, that method's flags too (ta.py, mi1.py)."""
    design = method.default_design if method else (5, 64, 8)
    p, g = dit.design_parser(sys.modules[method.__module__].__doc__ if method else __doc__,
                             "model; default: the design (%d,%d,%d)" % design)
    dit.add_mlp_ratio_flag(g)
    data.add_flags(p)
    g = p.add_argument_group("optimisation (paper, appendix C)")
    g.add_argument("--loss", choices=sorted(LOSSES), help="distillation loss (real: lpips; toy: toy-lpips, the toy "
                   "teacher's stand-in for LPIPS, see toy.py)")
    g.add_argument("--lpips-net", choices=sorted(measure.LPIPS_TRUNKS), default="vgg", help="LPIPS trunk (GET: vgg)")
    g.add_argument("--lpips-size", type=int, default=224, help="upsample to this size before LPIPS (0: 32x32)")
    g.add_argument("--lpips-backbone", help="local trunk weights file (vgg16-397923af.pth / alexnet-owt-"
                   "7be5be79.pth); 'random' for random weights (tests only)")
    g.add_argument("--lr", type=float, help="AdamW learning rate, constant between --warmup and --decay (real: 1e-4; "
                   "toy: 3e-3)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (paper 0.01; GET 0)")
    g.add_argument("--warmup", type=int, help="steps of linear learning-rate warm-up from 0 (real: 0; toy: 100)")
    g.add_argument("--decay", type=int, help="steps at the end over which the rate falls linearly to 0 (real: 0, "
                   "the paper; toy: 400); resume a finished run with more --steps and --decay N to add one")
    g.add_argument("--grad-clip", type=float, help="clip the gradient's global norm to this, 0: off (real: 0; toy: 1)")
    g.add_argument("--batch", type=int, help="global batch, split over processes (real: 256; toy: 16)")
    g.add_argument("--epochs", type=float, help="passes over the training pairs (real: 100)")
    g.add_argument("--steps", type=int, help="optimiser steps; overrides --epochs (toy: 900)")
    g.add_argument("--ema", type=float, default=0.9999, help="EMA decay, warmed up as min(ema, (1+n)/(10+n))")
    g.add_argument("--label-dropout", type=float, default=0.1, help="label -> null class rate, for CFG")
    g.add_argument("--seed", type=int, default=0, help="seed (>= 0) of init, data order, label dropout")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="output folder (default runs/DESIGN_LOSS, e.g. runs/d5w64h8_toy-lpips)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt (a finished run with the same "
                   "--steps: measure it again)")
    g.add_argument("--log-every", type=int, help="steps between log lines (real: 100; toy: 50)")
    g.add_argument("--eval-every", type=int, help="steps between held-out eval, grid, checkpoint (real: 1 epoch; "
                   "toy: 900)")
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
# Losses: name -> builder(args, device, lpips_net) -> loss(pred, target), a scalar. ta.py and mi1.py use them too.

def lpips_distance(net, size):
    """LPIPS(pred, target) averaged over the batch; GET compares at 224x224, both images upsampled bilinearly."""
    def loss(pred, target):
        if size:
            pred, target = (F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
                            for t in (pred, target))
        return net(pred.float(), target.float()).mean()
    return loss


LOSSES = {
    "l1": lambda args, device, lpips_net: lambda pred, target: (pred - target).abs().mean(),
    "l2": lambda args, device, lpips_net: lambda pred, target: ((pred - target) ** 2).mean(),
    "lpips": lambda args, device, lpips_net: lpips_distance(lpips_net, args.lpips_size),
    "toy-lpips": lambda args, device, lpips_net: toy.perceptual_loss(common.CACHE_DIR, device),  # toy.py
}


def build_loss(args, device):
    """--loss -> (loss(pred, target), the frozen LPIPS network it compares in or None). The trainer reuses that
    network for the held-out LPIPS metric. A missing LPIPS trunk stops the run here, before step 0."""
    lpips_net = measure.build_lpips(args.lpips_net, device, args.lpips_backbone) if args.loss == "lpips" else None
    return LOSSES[args.loss](args, device, lpips_net), lpips_net


# ----------------------------------------------------------------------------------------------
# Configuration and checks: every one before any slow work

def resolve(args):
    """Fill every None flag and check every value; the result is the run's config (a plain dict in every
    checkpoint). Raises UsageError naming the flag."""
    for k, v in (TOY if args.data == "toy" else PAPER).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.depth, args.width, args.heads = dit.resolve_design(args, default=args.default_design)
    common.positive_ints(args, "batch", "steps", "log_every", "eval_every", "holdout", "fid_every")
    if args.data == "toy":
        toy.check_sizes(args.toy_pairs, args.holdout, args.toy_seed)
    elif args.loss == "toy-lpips":
        raise UsageError("--loss toy-lpips compares images in the features of a network trained on the toy "
                         "teacher's shapes, which mean nothing for real images; use --loss lpips (or l1, l2).")
    for flag, low, high, integer in (("seed", 0, None, True), ("warmup", 0, None, True), ("decay", 0, None, True),
                                     ("grad_clip", 0, None, False), ("weight_decay", 0, None, False),
                                     ("ema", 0, 1, False), ("label_dropout", 0, 1, False),
                                     ("cfg_scale", 0, None, False)):
        check_number(getattr(args, flag), "--" + flag.replace("_", "-"), low=low, high=high, integer=integer)
    check_number(args.epochs, "--epochs", low=0, low_open=True)
    check_number(args.lr, "--lr", low=0, low_open=True)
    check_number(args.fid_n, "--fid-n", low=10, integer=True)  # IS averages over 10 splits
    if args.lpips_size != 0:  # VGG pools four times before its last LPIPS layer: 32 pixels is the least
        check_number(args.lpips_size, "--lpips-size (0 keeps 32x32)", low=32, integer=True)
    prefix = "" if args.method == "distill" else args.method + "_"  # runs/ta_d5w64h8_l2 for ta.py
    design = dit.design_name(args.depth, args.width, args.heads, args.mlp_ratio)
    args.out = args.out or os.path.join("runs", f"{prefix}{design}_{args.loss}")
    return args


def setup_processes(args):
    """Single process by default; DDP when started by torchrun (gloo on CPU, NCCL on CUDA) -> (rank, world, device).
    Checks the device can run the flags: bf16, --compile."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = common.pick_device(args.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if args.batch % world:
            raise UsageError(f"--batch {args.batch} does not split evenly over {world} processes.")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # free speed on Ampere+
    if args.dtype == "bf16" and (device.type == "mps" or device.type == "cuda" and not torch.cuda.is_bf16_supported()):
        raise UsageError(f"--dtype bf16 is not supported on this {device.type} device; use --dtype fp32.")
    problem = args.compile and common.compile_problem(device)
    if problem:
        raise UsageError(f"--compile: {problem}; train without --compile.")
    return (dist.get_rank() if world > 1 else 0), world, device


# ----------------------------------------------------------------------------------------------
# Checkpoints: plain tensors and dicts, written atomically, loadable with weights_only=True

def save_checkpoint(path, run, step, config):
    state = {"model": run.model.state_dict(), "ema": run.ema.state_dict(), "optimizer": run.opt.state_dict(),
             "extra": run.extra.state_dict() if run.extra is not None else {}, "step": step,
             "rng": {"torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
             "config": dict(config)}
    common.atomic_write(path, lambda tmp: torch.save(state, tmp))  # a crash mid-write never breaks ckpt.pt


def open_output(args, ckpt_path):
    """The output folder, checked now: a checkpoint there needs --resume, --resume needs one, and the folder must
    take files. -> the checkpoint to resume, or None."""
    if os.path.exists(ckpt_path) and not args.resume:
        raise UsageError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out.")
    if args.resume and not os.path.exists(ckpt_path):
        raise UsageError(f"--resume: no checkpoint at {ckpt_path}; start without --resume.")
    state = None
    if args.resume:
        state = load_torch_file(ckpt_path, "a checkpoint written by distill.py, ta.py or mi1.py", "--resume:")
        missing = [k for k in ("model", "ema", "optimizer", "extra", "step", "rng", "config")
                   if not isinstance(state, dict) or k not in state]
        if missing:
            raise UsageError(f"--resume: {ckpt_path} is not a checkpoint this script can resume (it lacks "
                             f"{', '.join(missing)}); move it away or choose another --out.")
    common.writable_dir(args.out, "--out")
    return state


def resume(run, state, args, method, total, ckpt_path, device):
    """Load a checkpoint into the run, after checking it is this run's recipe (--steps and --decay may grow)
    -> its step."""
    old = state["config"]
    for k in RECIPE_KEYS + (method.config_keys if method else ()):
        if k in old and old[k] != getattr(args, k):  # a key older checkpoints lack is not checked
            raise UsageError(f"--resume: the checkpoint has {k}={old.get(k)}, this command {k}={getattr(args, k)}; "
                             f"resume with the same settings, or choose another --out.")
    if state["step"] > total:
        raise UsageError(f"--resume: {ckpt_path} is at step {state['step']}, past this command's {total} steps; give "
                         f"--steps {state['step']} or more (the same {state['step']} measures the finished run again).")
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
    return state["step"]


# ----------------------------------------------------------------------------------------------
# The algorithm: batches, the student, one step

@functools.lru_cache(maxsize=1)
def epoch_order(n, seed, epoch):
    """The training pairs' order in an epoch, from (seed, epoch) alone: every DDP rank and every resume sees
    exactly the batches of one uninterrupted run."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def batch_of_step(train_set, step, args, rank=0, world=1):
    """This process's share of step `step`'s global batch -> (z, y, x), with label dropout: a seeded
    --label-dropout fraction of labels becomes the null class (dit.NUM_CLASSES), which CFG needs."""
    steps_per_epoch = len(train_set) // args.batch
    epoch, in_epoch = divmod(step, steps_per_epoch)
    local = args.batch // world
    idx = epoch_order(len(train_set), args.seed, epoch)[in_epoch * args.batch:(in_epoch + 1) * args.batch]
    z, y, x = train_set.batch(idx[rank * local:(rank + 1) * local])
    g = torch.Generator().manual_seed(args.seed * 104729 + step)
    drop = torch.rand(args.batch, generator=g)[rank * local:(rank + 1) * local] < args.label_dropout
    return z, torch.where(drop, torch.full_like(y, dit.NUM_CLASSES), y), x


def learning_rate(step, lr, warmup, decay, total):
    """The rate at 0-based `step` of `total`: linear warm-up from 0 over `warmup` steps, constant `lr`, then a linear
    fall to 0 over the last `decay` steps (so a finished constant-rate run can be resumed with more steps and a
    decay, and matches a run trained that way from the start)."""
    scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
    return lr * (min(scale, (total - step) / decay) if decay else scale)


def ema_decay(step, ema):
    """EMA decay at optimiser step `step` (0-based): warmed up as min(ema, (1 + step) / (10 + step))."""
    return min(ema, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def build_student(args, device, loss_fn, method=None, world=1, total_steps=None):
    """The student (seeded by --seed), its EMA copy, the method's module, AdamW over both, and the forward to
    call (compiled and/or DDP-wrapped) -> the namespace train_step runs on. total_steps matters only to --decay."""
    torch.manual_seed(args.seed)
    model = dit.DiT(args.depth, args.width, args.heads, args.mlp_ratio).to(device)
    ema = dit.DiT(args.depth, args.width, args.heads, args.mlp_ratio).to(device)
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
                           loss_fn=loss_fn, world=world, ema_max=args.ema, lr=args.lr, warmup=args.warmup,
                           decay=args.decay, total=total_steps, grad_clip=args.grad_clip,
                           autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"),
                           needs_hidden=bool(extra is not None and extra.needs_hidden),
                           base_weight=extra.base_weight if extra is not None else 1.0)


def train_step(run, z, y, x, step):
    """One optimiser step on a batch: loss = base_weight * loss(x, G(z, y)) + the method's terms; AdamW, then the
    EMA. Returns (loss, {term: value}), detached, without a host sync."""
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


# ----------------------------------------------------------------------------------------------
# Around the loop: progress, stopping

class Progress:
    """The log line every --log-every steps (step, mean loss and the method's terms, images/s, ETA) and a tqdm bar
    per epoch. The loss is summed on the device and read once per line: a NaN or inf there stops the run."""

    def __init__(self, args, step, total, steps_per_epoch, log, master):
        self.args, self.total, self.per_epoch, self.log, self.master = args, total, steps_per_epoch, log, master
        self.t_start = self.t_line = time.time()
        self.step_at_start, self.loss_sum, self.count, self.terms, self.bar = step, 0.0, 0, {}, None

    def update(self, step, loss, terms, force=False):
        if self.bar is None:  # a new epoch, or the first after a resume
            epoch, in_epoch = divmod(step - 1, self.per_epoch)
            self.bar = tqdm(total=self.per_epoch, initial=in_epoch, desc=f"epoch {epoch}", leave=False,
                            disable=not self.master or not sys.stderr.isatty())
        self.bar.update(1)
        if step % self.per_epoch == 0:
            self.close()
        self.loss_sum, self.count = self.loss_sum + loss, self.count + 1
        for k, v in terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + v
        if step % self.args.log_every and not force and step != self.total:
            return
        mean = float(self.loss_sum) / self.count  # the one host sync per line
        if not math.isfinite(mean):
            raise FloatingPointError(f"loss is {mean} in steps {step - self.count + 1}..{step}")
        now = time.time()
        eta = (now - self.t_start) / (step - self.step_at_start) * (self.total - step)
        terms = "".join(f" | {k} {float(v) / self.count:.4f}" for k, v in self.terms.items())
        self.log(f"step {step}/{self.total} | loss {mean:.4f}{terms} | "
                 f"{self.count * self.args.batch / (now - self.t_line):.1f} img/s | eta {eta / 60:.1f} min")
        self.loss_sum, self.count, self.terms, self.t_line = 0.0, 0, {}, now

    def elapsed(self):
        return time.time() - self.t_start

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def stopped_safely(save, ckpt_path, log):
    """Ctrl-C, or a scheduler's SIGTERM (a job's time limit, preemption): save a checkpoint and exit 130, so that
    --resume continues. A NaN or inf loss: stop with exit code 1, keeping the last good checkpoint untouched."""
    common.sigterm_as_interrupt()
    try:
        yield
    except KeyboardInterrupt:
        save()
        log(f"\ninterrupted: checkpoint saved to {ckpt_path}; continue with --resume")
        sys.exit(130)
    except FloatingPointError as e:
        log(f"error: {e}. Stopped; the last good checkpoint {ckpt_path} is kept (nothing was saved after it). "
            f"Try a lower --lr, or --dtype fp32.")
        sys.exit(1)


# ----------------------------------------------------------------------------------------------
# The method contract: ta.py and mi1.py subclass Method; plain distillation is method=None

class Method(nn.Module):
    """A distillation method: loss terms added to (or replacing) the plain loss(x, G(z, y)). Class attributes:
    name (the config's `method`, the run folder's prefix), title (its flags' heading), default_design (d, w, h),
    needs_hidden (the student then also returns its blocks' hidden states), base_weight (lambda_0 of the plain
    term; 0 skips it), config_keys (settings --resume must find unchanged). Methods: add_flags(group), check(args)
    (flag checks; raise UsageError), build(args, device, loss_fn) -> the module for this run, and
    forward(model, z, y, x, pred, hidden) -> (loss, {term: detached scalar}). Its trainable parameters are optimised
    and checkpointed with the student; a frozen network it holds must not be a submodule (object.__setattr__)."""
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


# ----------------------------------------------------------------------------------------------

def train(args, method=None):
    """Distil a student from the pairs of --data with the plain loss and, if given, a Method's terms."""
    # -- setup: processes and device, the output folder; every check before slow work --------------
    rank, world, device = setup_processes(args)
    master = rank == 0
    log = tqdm.write if master else (lambda *a, **k: None)  # tqdm.write keeps a progress bar intact
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    state = open_output(args, ckpt_path)

    # -- data: the teacher's pairs, a held-out split, the run's length ------------------------------
    train_set, held = data.load_for_training(args, master, world)
    steps_per_epoch = len(train_set) // args.batch
    total = args.steps or math.ceil((args.epochs or 1) * steps_per_epoch)
    eval_every = args.eval_every or steps_per_epoch

    # -- loss, student, EMA, method, optimizer; resume; the baselines it is measured against --------
    loss_fn, lpips_net = build_loss(args, device)
    run = build_student(args, device, loss_fn, method, world, total_steps=total)
    step = resume(run, state, args, method, total, ckpt_path, device) if state else 0
    config = dict(vars(args), param_count=dit.param_count(args.depth, args.width, args.mlp_ratio), total_steps=total,
                  world=world, method_keys=list(method.config_keys) if method else [])  # results.json records them
    log("config: " + json.dumps(config, sort_keys=True))
    if state:
        log(f"resumed from {ckpt_path} at step {step}")
    evaluator = measure.Evaluator(args, train_set, held, device, lpips_net, log) if master else None
    wall_before = state["config"].get("wall_s", 0.0) if state else 0.0

    def save(evaluate_first=False, fid_due=False):  # rank 0: held-out metrics, results.json, grid; the checkpoint
        if master:
            if evaluate_first:
                evaluator(run, step, config, fid_due)
            save_checkpoint(ckpt_path, run, step, config)

    if state and step == total:  # a finished run resumed: measured again, with this code's metrics
        config["wall_s"] = wall_before
        save(evaluate_first=True, fid_due=True)

    # -- the loop: a step per batch; a log line, evaluation and checkpoint at their intervals -------
    batches = common.prefetched(lambda s: batch_of_step(train_set, s, args, rank, world), range(step, total),
                                pin=device.type == "cuda")  # gathered by a background thread, ahead of the step
    progress = Progress(args, step, total, steps_per_epoch, log, master)
    run.model.train()
    with stopped_safely(save, ckpt_path, log), contextlib.closing(batches), contextlib.closing(progress):
        while step < total:
            z, y, x = (t.to(device, non_blocking=True) for t in next(batches))
            loss, terms = train_step(run, z, y, x, step)
            step += 1
            progress.update(step, loss, terms, force=step % eval_every == 0)
            fid_due = master and evaluator.fid_due(step, total)
            if step % eval_every == 0 or step == total or fid_due:
                config["wall_s"] = round(progress.elapsed() + wall_before, 1)
                save(evaluate_first=True, fid_due=fid_due)

    # -- the end ------------------------------------------------------------------------------------
    if world > 1:
        dist.destroy_process_group()
    log(f"done: {step} steps in {progress.elapsed() / 60:.1f} min; checkpoint {ckpt_path}, "
        f"samples {os.path.join(args.out, 'grid.png')}")
    return run.model, run.ema


def main(argv=None, method=None):
    """Parse, resolve, check (the method's flags too), train; bad input ends in one paragraph, exit code 2."""
    args = get_parser(method).parse_args(argv)
    with exit_on_usage_error():
        args = resolve(args)
        if method is not None:
            method.check(args)
        return train(args, method)


if __name__ == "__main__":
    main()
