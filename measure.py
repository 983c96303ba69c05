"""
Measuring a student against its teacher on the held-out pairs, which training never sees: how closely it imitates the
teacher (mean squared error, PSNR, LPIPS against the teacher's image for the same noise), and how good its samples
are (on the toy teacher the toy metrics of toy.py; FID of fid.py when asked and possible). distill.py calls it at
every evaluation; each writes one line of OUT/metrics.jsonl and OUT/results.json.

    import measure
    metrics = measure.evaluate(model, held, device, lpips_net=None, scorer=toy.Scorer(...), cfg_scale=1.5)
    evaluator = measure.Evaluator(args, train_set, held, device, lpips_net, print)   # baselines once
    record = evaluator(run, step, config, fid_due=False)        # the EMA model's record, written to OUT
"""
import json
import os
import sys
import warnings
from types import SimpleNamespace

import torch

import common
import data
import fid
import sample
import toy
from common import UsageError, load_torch_file

# ----------------------------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018): the paper's distillation loss, and a held-out metric

LPIPS_TRUNKS = {  # torchvision's trunk weights that the lpips package expects: file (with its sha256 prefix), URL
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
}


def build_lpips(net, device, backbone=None, download=True):
    """Frozen LPIPS (inputs on [-1,1]), its trunk loaded by us from --lpips-backbone, the torch hub cache, or a
    checked download, so nothing downloads behind the user's back. backbone='random' keeps random trunk weights
    (tests). None when the trunk is not cached and download is False."""
    if backbone != "random":
        name, url = LPIPS_TRUNKS[net]
        backbone = common.weights_file(backbone, "--lpips-backbone", name, url, download,
                                       offline_hint=", or train offline with --loss l2")
        if backbone is None:
            return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated"
        import lpips
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)  # linear heads ship with lpips
    if backbone != "random":
        what = f"torchvision's {net} trunk weights {LPIPS_TRUNKS[net][0]}"
        weights = load_torch_file(backbone, what, "--lpips-backbone")
        try:  # lpips keeps torchvision's layer indices inside its slices: slice2.5.weight <- features.5.weight
            model.net.load_state_dict({k: weights["features." + k.split(".", 1)[1]] for k in model.net.state_dict()})
        except (KeyError, TypeError, RuntimeError) as e:
            raise UsageError(f"--lpips-backbone {backbone} is not {what} ({type(e).__name__}: {str(e)[:200]}); "
                             f"download {LPIPS_TRUNKS[net][1]}.")
    return model.eval().requires_grad_(False).to(device)



# ----------------------------------------------------------------------------------------------
# The held-out pairs

@torch.no_grad()
def evaluate(predict, held, device, lpips_net=None, scorer=None, cfg_scale=None, batch=sample.METRIC_BATCH):
    """predict(z, y) -> images, over the held-out pairs: the mean squared error against the teacher's images, its
    PSNR, and LPIPS given its network. With a toy Scorer also the toy metrics: of the predictions themselves, or,
    given cfg_scale (predict is then a DiT), of its guided samples (toy.Scorer.score_model)."""
    z, y, x = held.batch(torch.arange(len(held)))
    halves = None
    if scorer is not None and cfg_scale is not None:  # a DiT's conditional half is its prediction: two passes in all
        halves = sample.guidance_halves(predict, z, y, device, batch)
        pred = halves[0]
    else:
        pred = torch.cat([predict(z[i:i + batch].to(device), y[i:i + batch].to(device)).float().cpu()
                          for i in range(0, len(z), batch)])
    mse = ((pred - x) ** 2).mean().item()
    out = {"l2": mse, "psnr": data.psnr(mse)}
    if lpips_net is not None:
        out["lpips"] = sum(lpips_net(pred[i:i + batch].to(device), x[i:i + batch].to(device)).sum().item()
                           for i in range(0, len(x), batch)) / len(x)
    if scorer is not None:
        out.update(scorer.score_model(predict, halves, y, x, cfg_scale, device) if halves else scorer(pred, y, x))
    return out


def fmt_metrics(m):
    formats = {"psnr": "psnr {:.2f} dB", "toy_fid": "toy_fid {:.2f}", "toy_acc": "toy_acc {:.1%}",
               "toy_mode": "toy_mode {:.1%}", "toy_fid_best": "toy_fid_best {:.2f}", "cfg_best": "at cfg {:g}"}
    return " ".join(formats.get(k, k + " {:.4f}").format(v) for k, v in m.items() if isinstance(v, (int, float)))


class Evaluator:
    """Rank 0's measurement: the baselines once (the class-mean images; on the toy teacher also the teacher's own
    images), then at each evaluation the EMA model's held-out metrics (and FID when due and possible), appended to
    metrics.jsonl, written to results.json beside the baselines, and the sample grid redrawn."""

    def __init__(self, args, train_set, held, device, lpips_net, log):
        self.args, self.held, self.device, self.log = args, held, device, log
        # an LPIPS metric whenever its network is at hand: the loss's, else a cached trunk (never downloaded for it)
        self.lpips = lpips_net or build_lpips(args.lpips_net, device, None if args.lpips_backbone == "random" else
                                              args.lpips_backbone, download=False)
        self.scorer = toy.Scorer(train_set.x, common.CACHE_DIR) if args.data == "toy" else None
        means = data.class_means(train_set).to(device)
        self.baselines = {"class_mean": evaluate(lambda z, y: means[y], held, device, self.lpips, self.scorer)}
        log(f"class-mean baseline (predict the class's mean teacher image) on {len(held)} held-out pairs: "
            f"{fmt_metrics(self.baselines['class_mean'])}")
        if self.scorer is not None:
            _, y, x = held.batch(torch.arange(len(held)))
            self.baselines["teacher"] = self.scorer(x, y)
            log(f"the teacher's own held-out images: {fmt_metrics(self.baselines['teacher'])} (the floor: a student "
                f"that imitated it exactly would score this)")
        if self.lpips is None:
            log("LPIPS metric skipped: its trunk weights are not in the torch hub cache (see README).")
        self.fid = None
        if args.data == "toy" and not args.fid_every:
            log("FID skipped: the toy teacher's images are not CIFAR-10 (pass --fid-every N to measure it anyway).")
        else:
            self.fid = fid.training_setup(args.inception, args.fid_ref, args.cifar, args.fid_n, device, log)

    def fid_due(self, step, total):
        return self.fid is not None and (step == total or bool(self.args.fid_every) and step % self.args.fid_every == 0)

    def __call__(self, run, step, config, fid_due):
        args = SimpleNamespace(**config)
        metrics = evaluate(run.ema, self.held, self.device, self.lpips, self.scorer, args.cfg_scale)
        if fid_due and self.fid is not None:
            metrics.update(fid.fid_of_model(run.ema, *self.fid, n=args.fid_n, cfg_scale=args.cfg_scale,
                                            device=self.device, progress=sys.stderr.isatty(),
                                            conditional=args.conditional))
        record = {"step": step, "ema": metrics, **self.baselines, "param_count": args.param_count,
                  "design": [args.depth, args.width, args.heads],
                  "mlp_ratio": args.mlp_ratio, "loss": args.loss, "method": args.method,
                  **{k: config[k] for k in config.get("method_keys", ())},  # e.g. MI1's layers and times
                  "data": args.data, "conditional": args.conditional,
                  **({"fid": metrics["fid"], "fid_n": args.fid_n, "fid_ref": fid.reference_name(args.fid_ref),
                      "fid_cfg_scale": args.cfg_scale} if "fid" in metrics else {}),
                  "batch": args.batch, "lr": args.lr, "warmup": args.warmup, "decay": args.decay,
                  "grad_clip": args.grad_clip, "seed": args.seed,
                  **({"toy_seed": args.toy_seed} if args.data == "toy" else {}),
                  "wall_s": args.wall_s, "hardware": f"{common.hardware(self.device)}, {args.world} process(es)"}
        with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        common.write_json(os.path.join(args.out, "results.json"), record)
        sample.save_grid(run.ema, os.path.join(args.out, "grid.png"), cfg_scale=args.cfg_scale, device=self.device,
                         conditional=args.conditional)
        self.log(f"eval step {step} | ema {fmt_metrics(metrics)} | class-mean psnr "
                 f"{self.baselines['class_mean']['psnr']:.2f} dB")
        return record
