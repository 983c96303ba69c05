"""
Samples from a DiT-Nano checkpoint (EMA weights): a class-by-sample PNG grid, or an .npz for evaluation.

    python sample.py --ckpt runs/d5w64h8_toy-lpips/ckpt.pt                # grid.png: 10 classes x 10 samples, CFG 1.5
    python sample.py --ckpt CKPT --npz samples.npz --n 50000             # uint8 images [N,32,32,3] + labels, for fid.py
    python sample.py --ckpt CKPT --cfg-scale 1 --per-class 16 --out g.png

Noise comes from a seeded generator, labels are uniform (i % 10), so a command always gives the same images. A model
trained on unconditional pairs (its checkpoint says so) is sampled with the null class and no guidance.
"""
import argparse
import os

import torch
from PIL import Image
from tqdm import tqdm

import dit
from common import (UsageError, atomic_write, check_number, exit_on_usage_error, load_torch_file, pick_device,
                    positive_ints, save_npz, writable_file)


def load_model(path, device="cpu", weights="ema", flag="--ckpt"):
    """A checkpoint's student -> (DiT in eval mode on device, its run's config dict plus the checkpoint's "step").
    Loads with weights_only=True; a file that is not a DiT-Nano checkpoint is a UsageError that names `flag`."""
    what = "a DiT-Nano checkpoint (the ckpt.pt that distill.py, ta.py or mi1.py write)"
    if not os.path.isfile(path):
        raise UsageError(f"{flag}: no checkpoint at {path}; train one with distill.py (it writes OUT/ckpt.pt).")
    state = load_torch_file(path, what, flag)
    try:
        cfg = dict(state["config"], step=state.get("step"))
        model = dit.DiT(cfg["depth"], cfg["width"], cfg["heads"], cfg.get("mlp_ratio", 4))
        model.load_state_dict(state[weights])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UsageError(f"{flag} {path} is not {what} ({type(e).__name__}: {str(e)[:200]}).")
    return model.to(device).eval(), cfg


def to_uint8(x):
    """Images on [-1,1] [B,3,H,W] -> uint8 [B,H,W,3] with the quantisation EDM/FID use: x*127.5+128, clipped."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


PAPER_CFG = 1.5  # the paper samples class-conditional models with guidance 1.5
# Images per forward pass when a run's held-out samples are made and scored: on a CPU a batch of 500 spills the
# caches (the (5,64,8) DiT 1.5x and the toy classifier 2x slower per image than at 100); a GPU is busy either way.
METRIC_BATCH = 100


def guidance(config, cfg_scale=None, flag="--cfg-scale"):
    """(conditional, guidance scale) for sampling a checkpoint's model (config: its checkpoint's config).
    A class-conditional model is sampled with labels i % 10 and, by default, the paper's guidance 1.5; a model
    trained on unconditional pairs only ever saw the null class, so it is sampled with the null class in one
    pass (scale 1), and a guided request of it is a UsageError. Checkpoints that do not record it are
    class-conditional (the toy teacher and EDM-Cond-CIFAR)."""
    conditional = config.get("conditional", True)
    if cfg_scale is None:
        return conditional, PAPER_CFG if conditional else 1.0
    if not conditional and cfg_scale != 1:
        raise UsageError(f"{flag} {cfg_scale:g}: this model was trained on unconditional pairs (null class only), so "
                         f"it has no classes to guide towards; sample it with {flag} 1 (the default for it).")
    return conditional, cfg_scale


def labels_for(n, conditional=True):
    """Labels of n samples [n]: uniform classes i % 10, or the null class for an unconditional model."""
    return torch.arange(n) % dit.NUM_CLASSES if conditional else torch.full((n,), dit.NUM_CLASSES)


@torch.no_grad()
def generate(model, n, cfg_scale=PAPER_CFG, seed=0, batch=500, device="cpu", progress=False, conditional=True):
    """n images from fixed seeds with labels_for(n) -> (uint8 [n,32,32,3], labels int64 [n])."""
    g = torch.Generator().manual_seed(seed)
    images, labels = [], labels_for(n, conditional)
    for i in tqdm(range(0, n, batch), disable=not progress, desc="sampling"):
        z = torch.randn(min(batch, n - i), 3, dit.IMG, dit.IMG, generator=g).to(device)
        images.append(to_uint8(model.sample(z, labels[i:i + len(z)].to(device), cfg_scale).float()))
    return torch.cat(images).numpy(), labels.numpy()


@torch.no_grad()
def guidance_halves(model, z, y, device="cpu", batch=METRIC_BATCH):
    """DiT.guidance_halves over z [N,3,32,32], labels y [N] in batches -> (conditional, unconditional) float32
    [N,3,32,32] on the CPU: every guidance scale's samples at the cost of two passes (dit.guided combines)."""
    halves = [model.guidance_halves(z[i:i + batch].to(device), y[i:i + batch].to(device))
              for i in range(0, len(z), batch)]
    return tuple(torch.cat([h[k].float().cpu() for h in halves]) for k in (0, 1))


def image_format(path, flag="--out"):
    """The PIL format that writes `path` (by its extension), or a UsageError."""
    ext = "." + path.rsplit(".", 1)[-1].lower() if "." in path else ""
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise UsageError(f"{flag} {path}: cannot write images of type '{ext or '(none)'}'; end the name in .png.")
    return fmt


@torch.no_grad()
def save_grid(model, path, cfg_scale=PAPER_CFG, per_class=10, seed=0, device="cpu", conditional=True):
    """PNG grid from fixed noise, written atomically: one row per class, per_class samples per row (for an
    unconditional model, 10 rows of null-class samples)."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(dit.NUM_CLASSES * per_class, 3, dit.IMG, dit.IMG, generator=g).to(device)
    y = labels_for(dit.NUM_CLASSES, conditional).repeat_interleave(per_class).to(device)
    img = to_uint8(model.sample(z, y, cfg_scale).float()).numpy()  # [C*K,32,32,3]
    grid = img.reshape(dit.NUM_CLASSES, per_class, dit.IMG, dit.IMG, 3).transpose(0, 2, 1, 3, 4)
    grid = Image.fromarray(grid.reshape(dit.NUM_CLASSES * dit.IMG, per_class * dit.IMG, 3))
    atomic_write(path, lambda tmp: grid.save(tmp, format=image_format(path)))
    model.train(was_training)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--ckpt", required=True, help="checkpoint written by distill.py / ta.py / mi1.py")
    p.add_argument("--out", default="grid.png", help="grid image path (.png)")
    p.add_argument("--per-class", type=int, default=10, help="grid columns (samples per class)")
    p.add_argument("--npz", help="instead of a grid, write N images and labels to this .npz")
    p.add_argument("--n", type=int, default=50000, help="images in the .npz")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (default: the paper's 1.5; 1 for a "
                   "model trained on unconditional pairs, which is sampled with the null class)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (>= 0)")
    p.add_argument("--batch", type=int, default=500, help="images per forward pass")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA (paper) or raw weights")
    p.add_argument("--device", help="cuda, mps or cpu (default: the first available)")
    args = p.parse_args(argv)
    with exit_on_usage_error():
        positive_ints(args, "n", "per_class", "batch")
        check_number(args.cfg_scale, "--cfg-scale", low=0)
        check_number(args.seed, "--seed", low=0, integer=True)
        output, flag = (args.npz, "--npz") if args.npz else (args.out, "--out")
        if not args.npz:
            image_format(output, flag)
        writable_file(output, flag)
        args.device = pick_device(args.device)
        model, cfg = load_model(args.ckpt, args.device, args.weights)
        conditional, cfg_scale = guidance(cfg, args.cfg_scale)
    kind = "class-conditional" if conditional else "unconditional (null class)"
    if args.npz:
        images, labels = generate(model, args.n, cfg_scale, args.seed, args.batch, args.device, True, conditional)
        save_npz(args.npz, images=images, labels=labels)
        print(f"wrote {args.npz}: images {images.shape} uint8, labels {labels.shape}, {kind}, CFG {cfg_scale:g}")
    else:
        save_grid(model, args.out, cfg_scale, args.per_class, args.seed, args.device, conditional)
        print(f"wrote {args.out}: {dit.NUM_CLASSES} rows x {args.per_class} samples, {kind}, CFG {cfg_scale:g}")


if __name__ == "__main__":
    main()
