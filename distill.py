"""
One-step distillation of a class-conditional DiT student from teacher noise-image pairs (paper,
appendix B.1 and C: the GET setup): minimise loss(x, G(z, y)) over the teacher's pairs (z, y, x).

    python distill.py --d 5 --w 64 --h 8                    # quick start: built-in toy teacher, CPU, ~7 min
    python distill.py --params 5M --data PATH/EDM-Cond-CIFAR  # paper: (7,192,12), LPIPS, 100 epochs
    torchrun --nproc_per_node 4 distill.py --params 5M --data PATH   # DDP; the global batch stays 256
    python distill.py ... --resume                          # continue from OUT/ckpt.pt exactly

Writes OUT/ckpt.pt (model, EMA, optimizer, step, RNG states, config), OUT/grid.png (EMA samples,
CFG 1.5), OUT/metrics.jsonl (held-out metrics per evaluation) and OUT/results.json (the last one).
ta.py and mi1.py reuse `train()` with an extra loss module; losses live in the LOSSES table.
"""
import json
import math
import os
import signal
import sys
import threading
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import dit
import fid
import sample
from common import (UsageError, atomic_write, check_number, compile_problem, download_file,
                    exit_on_usage_error, hardware, load_torch_file, pick_device, positive_ints, writable_dir,
                    write_json)

# ----------------------------------------------------------------------------------------------
# Flags. None means "resolved by --data": the paper's value for real pairs, a laptop-sized one for toy.

PAPER = dict(loss="lpips", batch=256, epochs=100, lr=1e-4, log_every=100)
TOY = dict(loss="l2", batch=32, steps=1200, lr=3e-4, log_every=50, eval_every=400)


def get_parser():
    p, g = dit.design_parser(__doc__, "model (DESIGN.md 1-2); default: the 0.42M design (5,64,8)")
    data.add_flags(p)
    g = p.add_argument_group("optimisation (paper, appendix C)")
    g.add_argument("--loss", choices=sorted(LOSSES), help="distillation loss (real: lpips; toy: l2)")
    g.add_argument("--lpips-net", choices=sorted(LPIPS_BACKBONES), default="vgg", help="LPIPS trunk (GET: vgg)")
    g.add_argument("--lpips-size", type=int, default=224, help="upsample to this size before LPIPS (0: 32x32)")
    g.add_argument("--lpips-backbone", help="local trunk weights file (vgg16-397923af.pth / alexnet-owt-"
                   "7be5be79.pth); 'random' for random weights (tests only)")
    g.add_argument("--lr", type=float, help="AdamW learning rate, constant (real: 1e-4; toy: 3e-4)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (paper 0.01; GET 0)")
    g.add_argument("--batch", type=int, help="global batch, split over processes (real: 256; toy: 32)")
    g.add_argument("--epochs", type=float, help="passes over the training pairs (real: 100)")
    g.add_argument("--steps", type=int, help="optimiser steps; overrides --epochs (toy: 1200)")
    g.add_argument("--ema", type=float, default=0.9999, help="EMA decay, warmed up as min(ema, (1+n)/(10+n))")
    g.add_argument("--label-dropout", type=float, default=0.1, help="label -> null class rate, for CFG")
    g.add_argument("--seed", type=int, default=0, help="seed (>= 0) of init, data order, label dropout")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="output folder (default runs/d{d}w{w}h{h}_{loss})")
    g.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
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
    # ta.py and mi1.py set their own method (recorded in the config) and may set another default design
    p.set_defaults(method="distill", default_design=(5, 64, 8))
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
        data.check_toy(args.toy_pairs, args.holdout, args.toy_per_class, args.toy_seed)
    check_number(args.seed, "--seed", low=0, integer=True)
    check_number(args.epochs, "--epochs", low=0, low_open=True)
    check_number(args.lr, "--lr", low=0, low_open=True)
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

def save_checkpoint(path, model, ema, opt, extra, step, config):
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
             "extra": extra.state_dict() if extra is not None else {}, "step": step,
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


@torch.no_grad()
def ema_update(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


# ----------------------------------------------------------------------------------------------
# Held-out measurement against the teacher

@torch.no_grad()
def evaluate(predict, held, device, lpips_net=None, batch=500):
    """predict(z, y) -> images, over the held-out pairs: mean L2 (MSE), its PSNR, and LPIPS if a net is given."""
    sq, lp, n = 0.0, 0.0, len(held)
    for i in range(0, n, batch):
        z, y, x = (t.to(device) for t in held.batch(torch.arange(i, min(i + batch, n))))
        pred = predict(z, y).float()
        sq += ((pred - x) ** 2).mean(dim=(1, 2, 3)).sum().item()
        if lpips_net is not None:
            lp += lpips_net(pred, x).sum().item()
    out = {"l2": sq / n, "psnr": data.psnr(sq / n)}
    if lpips_net is not None:
        out["lpips"] = lp / n
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
    return " ".join(f"{k} {v:.4f}" if k != "psnr" else f"psnr {v:.2f} dB" for k, v in m.items())


# ----------------------------------------------------------------------------------------------
# Training

def train(args, make_extra=None):
    """The distillation loop: loss = base_weight * loss(x, pred) + extra terms.

    make_extra(args, device, loss_fn) -> nn.Module, the hook ta.py and mi1.py use to add a method's terms:
    extra(model, z, y, x, pred, hidden) -> (loss, {term name: detached scalar}). Its trainable parameters
    are optimised and checkpointed with the student (frozen networks it holds must not be submodules).
    Attributes it may set: needs_hidden (hidden states are computed only then), base_weight (lambda_0 of
    the plain term, default 1; 0 skips it) and config_keys (flags that must match on --resume)."""
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

    toy = data.toy_options(args)
    if master or args.data != "toy":
        train_set, held = data.load_pairs(args.data, args.holdout, **toy)
    if world > 1:
        dist.barrier()  # rank 0 builds the toy cache, the others then read it
        if not master and args.data == "toy":
            train_set, held = data.load_pairs(args.data, args.holdout, **toy)
    # a missing LPIPS trunk stops the run here, before step 0; the metric uses it whenever it is cached
    loss_fn = build_loss(args, device)
    lpips_eval = getattr(loss_fn, "net", None) or build_lpips(args.lpips_net, device, args.lpips_backbone
                                                              if args.lpips_backbone != "random" else None,
                                                              download=False)
    # unconditional pairs train the null class only: such a model is sampled with it, without guidance
    args.conditional = bool(getattr(train_set, "conditional", True))
    _, args.cfg_scale = sample.guidance(vars(args), args.cfg_scale)
    steps_per_epoch = len(train_set) // args.batch
    if steps_per_epoch == 0:
        raise UsageError(f"--batch {args.batch} is larger than the {len(train_set)} training pairs.")
    total = args.steps or math.ceil((args.epochs or 1) * steps_per_epoch)
    eval_every = args.eval_every or steps_per_epoch

    torch.manual_seed(args.seed)
    model = dit.DiT(args.depth, args.width, args.heads).to(device)
    ema = dit.DiT(args.depth, args.width, args.heads).to(device)
    ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    # the method's module is built after the student, so its student starts exactly as distill.py's would
    extra = make_extra(args, device, loss_fn) if make_extra else None
    if state is not None:  # a resume must not change the run's settings
        old = state["config"]
        for k in ("depth", "width", "heads", "data", *getattr(extra, "config_keys", ())):
            if old.get(k) != getattr(args, k):
                raise UsageError(f"--resume: the checkpoint has {k}={old.get(k)}, this command "
                                 f"{k}={getattr(args, k)}; resume with the same settings, or choose another --out.")
    config = {k: v for k, v in vars(args).items()}
    config.update(param_count=dit.param_count(args.depth, args.width), total_steps=total, world=world)
    log("config: " + json.dumps(config, sort_keys=True))
    if extra is not None:
        extra.to(device)
    extra_params = [p for p in extra.parameters() if p.requires_grad] if extra is not None else []
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + extra_params, lr=args.lr,
                            weight_decay=args.weight_decay)
    step = 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["optimizer"])
            if extra is not None:
                extra.load_state_dict(state["extra"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--resume: {ckpt_path} holds weights that do not fit this run ({type(e).__name__}: "
                             f"{str(e)[:300]}); resume with the same settings, or choose another --out.")
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        step = state["step"]
        log(f"resumed from {ckpt_path} at step {step}")
    fwd = torch.compile(model) if args.compile else model
    if world > 1:
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    needs_hidden = extra is not None and getattr(extra, "needs_hidden", False)
    base_weight = getattr(extra, "base_weight", 1.0)

    means = data.class_means(train_set).to(device)
    baseline = evaluate(lambda z, y: means[y], held, device, lpips_eval)
    log(f"class-mean baseline (predict the class's mean teacher image) on {len(held)} held-out pairs: "
        f"{fmt_metrics(baseline)}")
    if lpips_eval is None:
        log("LPIPS metric skipped: its trunk weights are not in the torch hub cache (see README).")
    fid_setup = setup_fid(args, device, log) if master else None

    def checkpoint():
        if master:
            save_checkpoint(ckpt_path, model, ema, opt, extra, step, config)

    def measure(with_fid):
        metrics = evaluate(ema, held, device, lpips_eval)
        if with_fid:
            metrics.update(fid.fid_of_model(ema, *fid_setup, n=args.fid_n, cfg_scale=args.cfg_scale,
                                            device=device, progress=sys.stderr.isatty(),
                                            conditional=args.conditional))
        record = {"step": step, "ema": metrics, "class_mean": baseline, "param_count": config["param_count"],
                  "design": [args.depth, args.width, args.heads], "loss": args.loss, "method": args.method,
                  "data": args.data, "conditional": args.conditional,
                  **({"fid": metrics["fid"], "fid_n": args.fid_n, "fid_ref": fid.reference_name(args.fid_ref),
                      "fid_cfg_scale": args.cfg_scale} if with_fid else {}),
                  "batch": args.batch, "lr": args.lr, "seed": args.seed, **({"toy_seed": args.toy_seed} if toy else {}),
                  "wall_s": round(time.time() - t_start + wall_before, 1),
                  "hardware": f"{hardware(device)}, {world} process(es)"}
        with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        write_json(os.path.join(args.out, "results.json"), record)
        sample.save_grid(ema, os.path.join(args.out, "grid.png"), cfg_scale=args.cfg_scale, device=device,
                         conditional=args.conditional)
        log(f"eval step {step} | ema {fmt_metrics(metrics)} | class-mean psnr {baseline['psnr']:.2f} dB")

    local_batch = args.batch // world
    wall_before = state["config"].get("wall_s", 0.0) if state is not None else 0.0
    t_start = t_log = time.time()
    step_at_start, loss_sum, loss_count = step, torch.zeros((), device=device), 0
    term_sums = {}  # the method's terms, summed between log lines like the loss
    bar = None
    model.train()
    stop_on_sigterm()
    try:
        while step < total:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if bar is None:  # a new epoch (or the first after a resume)
                bar = tqdm(total=steps_per_epoch, initial=in_epoch, desc=f"epoch {epoch}", leave=False,
                           disable=not master or not sys.stderr.isatty())
                # data order and label dropout derive from (seed, epoch, step): the same on every rank and
                # after a resume, so DDP and resumed runs see exactly the batches a single run would
                order = torch.randperm(len(train_set),
                                       generator=torch.Generator().manual_seed(args.seed * 7919 + epoch))
            idx = order[in_epoch * args.batch:(in_epoch + 1) * args.batch][rank * local_batch:(rank + 1) * local_batch]
            z, y, x = (t.to(device, non_blocking=True) for t in train_set.batch(idx))
            g = torch.Generator().manual_seed(args.seed * 104729 + step)
            drop = torch.rand(args.batch, generator=g)[rank * local_batch:(rank + 1) * local_batch] < args.label_dropout
            y = torch.where(drop.to(device), torch.full_like(y, dit.NUM_CLASSES), y)

            with autocast(args, device):
                out = fwd(z, y, return_hidden=needs_hidden)
                pred, hidden = out if needs_hidden else (out, None)
                loss = base_weight * loss_fn(pred.float(), x) if base_weight else 0.0
                if extra is not None:
                    extra_loss, terms = extra(model, z, y, x, pred, hidden)
                    loss = loss + extra_loss
                    for k, v in terms.items():
                        term_sums[k] = term_sums.get(k, 0.0) + v
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # DDP averages the student's gradients; the method's own weights are averaged here
                for p in extra_params:
                    dist.all_reduce(p.grad)
                    p.grad /= world
            opt.step()
            ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))
            step += 1
            loss_sum += loss.detach()
            loss_count += 1
            bar.update(1)
            if in_epoch + 1 == steps_per_epoch:
                bar.close()
                bar = None

            last = step == total
            fid_due = fid_setup is not None and (last or bool(args.fid_every) and step % args.fid_every == 0)
            if step % args.log_every == 0 or step % eval_every == 0 or last:
                mean_loss = (loss_sum / loss_count).item()  # the one host sync per interval
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"loss is {mean_loss} in steps {step - loss_count + 1}..{step}")
                now = time.time()
                rate = loss_count * args.batch / (now - t_log)
                eta = (now - t_start) / (step - step_at_start) * (total - step)
                terms = "".join(f" | {k} {v.item() / loss_count:.4f}" for k, v in term_sums.items())
                log(f"step {step}/{total} | loss {mean_loss:.4f}{terms} | {rate:.1f} img/s | eta {eta / 60:.1f} min")
                loss_sum.zero_()
                term_sums.clear()
                loss_count, t_log = 0, now
            if step % eval_every == 0 or last or fid_due:
                config["wall_s"] = round(time.time() - t_start + wall_before, 1)
                if master:
                    measure(fid_due)
                checkpoint()
    except KeyboardInterrupt:
        if bar:
            bar.close()
        checkpoint()
        log(f"\ninterrupted at step {step}: checkpoint saved to {ckpt_path}; continue with --resume")
        sys.exit(130)
    except FloatingPointError as e:
        log(f"error: {e}. Stopped; the last good checkpoint {ckpt_path} is kept (nothing was saved after it). "
            f"Try a lower --lr, or --dtype fp32.")
        sys.exit(1)
    if world > 1:
        dist.destroy_process_group()
    log(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min; checkpoint {ckpt_path}, "
        f"samples {os.path.join(args.out, 'grid.png')}")
    return model, ema


def main(argv=None, make_extra=None, parser=None, check=None):
    """Parse, resolve, check (a method's flag validation), train; bad input ends in one paragraph, exit 2."""
    args = (parser or get_parser()).parse_args(argv)
    with exit_on_usage_error():
        args = resolve(args)
        if check:
            check(args)
        return train(args, make_extra)


if __name__ == "__main__":
    main()
