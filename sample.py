"""
Samples from a DiT-Nano checkpoint (EMA weights): a class-by-sample PNG grid, or an .npz for evaluation.

    python sample.py --ckpt runs/d5w64h8_l2/ckpt.pt                      # grid.png: 10 classes x 10 samples, CFG 1.5
    python sample.py --ckpt CKPT --npz samples.npz --n 50000             # uint8 images [N,32,32,3] + labels, for fid.py
    python sample.py --ckpt CKPT --cfg-scale 1 --per-class 16 --out g.png

Noise comes from a seeded generator, labels are uniform (i % 10), so a command always gives the same images.
"""
import argparse
import os
import platform
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import dit


def pick_device(name=None):
    """--device NAME checked against this machine, else the first available of cuda, mps, cpu.
    Bad or unavailable names raise ValueError with the fix."""
    if name:
        if name.split(":")[0] not in ("cuda", "mps", "cpu"):
            raise ValueError(f"--device {name} is not available here: expected cuda, cuda:N, mps or cpu.")
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {name}, but this machine has no CUDA device; use --device cpu.")
        if name == "mps" and not torch.backends.mps.is_available():
            raise ValueError("--device mps, but MPS is not available here; use --device cpu.")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def hardware(device):
    """The device in words: the GPU's name, or the CPU's model and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name}, {torch.get_num_threads()} threads" if device.type == "cpu" else f"{name} ({device.type})"


def load_model(path, device="cpu", weights="ema"):
    """A checkpoint's student -> (DiT in eval mode on device, config dict). Loads with weights_only=True."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}; train one with distill.py (it writes OUT/ckpt.pt).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        cfg = state["config"]
        model = dit.DiT(cfg["depth"], cfg["width"], cfg["heads"])
        model.load_state_dict(state[weights])
    except Exception as e:
        raise ValueError(f"{path} is not a DiT-Nano checkpoint ({type(e).__name__}: {e}); expected the ckpt.pt "
                         f"that distill.py, ta.py or mi1.py write.")
    return model.to(device).eval(), cfg


def to_uint8(x):
    """Images on [-1,1] [B,3,H,W] -> uint8 [B,H,W,3] with the quantisation EDM/FID use: x*127.5+128, clipped."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


@torch.no_grad()
def generate(model, n, cfg_scale=1.5, seed=0, batch=500, device="cpu", progress=False):
    """n images from fixed seeds with labels i % 10 -> (uint8 [n,32,32,3], labels int64 [n])."""
    g = torch.Generator().manual_seed(seed)
    images, labels = [], torch.arange(n) % dit.NUM_CLASSES
    for i in tqdm(range(0, n, batch), disable=not progress, desc="sampling"):
        z = torch.randn(min(batch, n - i), 3, dit.IMG, dit.IMG, generator=g).to(device)
        images.append(to_uint8(model.sample(z, labels[i:i + len(z)].to(device), cfg_scale).float()))
    return torch.cat(images).numpy(), labels.numpy()


@torch.no_grad()
def save_grid(model, path, cfg_scale=1.5, per_class=10, seed=0, device="cpu"):
    """PNG grid: one row per class, per_class samples per row, from fixed noise."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(dit.NUM_CLASSES * per_class, 3, dit.IMG, dit.IMG, generator=g).to(device)
    y = torch.arange(dit.NUM_CLASSES).repeat_interleave(per_class).to(device)
    img = to_uint8(model.sample(z, y, cfg_scale).float()).numpy()  # [C*K,32,32,3]
    grid = img.reshape(dit.NUM_CLASSES, per_class, dit.IMG, dit.IMG, 3).transpose(0, 2, 1, 3, 4)
    Image.fromarray(grid.reshape(dit.NUM_CLASSES * dit.IMG, per_class * dit.IMG, 3)).save(path)
    model.train(was_training)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--ckpt", required=True, help="checkpoint written by distill.py / ta.py / mi1.py")
    p.add_argument("--out", default="grid.png", help="grid PNG path")
    p.add_argument("--per-class", type=int, default=10, help="grid columns (samples per class)")
    p.add_argument("--npz", help="instead of a grid, write N images and labels to this .npz")
    p.add_argument("--n", type=int, default=50000, help="images in the .npz")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (paper 1.5)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--batch", type=int, default=500, help="images per forward pass")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA (paper) or raw weights")
    p.add_argument("--device", help="cuda, mps or cpu (default: the first available)")
    args = p.parse_args(argv)
    if args.n < 1 or args.per_class < 1 or args.batch < 1:
        print("error: --n, --per-class and --batch must be positive integers.", file=sys.stderr)
        sys.exit(2)
    try:
        args.device = pick_device(args.device)
        model, cfg = load_model(args.ckpt, args.device, args.weights)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.npz:
        images, labels = generate(model, args.n, args.cfg_scale, args.seed, args.batch, args.device, progress=True)
        np.savez(args.npz, images=images, labels=labels)
        print(f"wrote {args.npz}: images {images.shape} uint8, labels {labels.shape}, CFG {args.cfg_scale}")
    else:
        save_grid(model, args.out, args.cfg_scale, args.per_class, args.seed, args.device)
        print(f"wrote {args.out}: {dit.NUM_CLASSES} classes x {args.per_class} samples, CFG {args.cfg_scale}")


if __name__ == "__main__":
    main()
