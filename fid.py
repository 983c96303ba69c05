"""
FID and Inception Score of DiT-Nano samples, comparable with published CIFAR-10 numbers (DESIGN.md, "FID and IS").

    python fid.py --ckpt runs/d5w64h8_lpips/ckpt.pt    # 50k EMA samples, CFG 1.5, vs CIFAR-10 train (EDM's ref)
    python fid.py --ckpt CKPT --ref test               # vs CIFAR-10 test (GET's reference)
    python fid.py --npz samples.npz                    # images from `python sample.py --ckpt CKPT --npz samples.npz`
    python fid.py --images DIR --ref cifar10-32x32.npz # a folder of PNGs vs a statistics file (EDM's, or mu/sigma)
    python fid.py --cifar-images test                  # sanity check: CIFAR-10 test vs train (published: FID 3.15)

Protocol (TF/EDM-compatible): uint8 images, (x*127.5+128).clip(0,255), resized to 299x299 with TF1's bilinear
rule, normalised (x-128)/128, through the FID Inception-v3 (TF graph 2015-12-05 as ported by pytorch-fid, defined
below) -> 2048-d pool3 features and 1008 logits without bias. FID = |mu1-mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) on
float64 statistics (covariance ddof=1); IS = exp(E KL(p(y|x) || p(y))) over 10 splits, mean and std.
Weights `pt_inception-2015-12-05-6726825d.pth` come from --inception PATH, else the torch hub cache, else are
downloaded from pytorch-fid's release (sha256-checked). Reference statistics (CIFAR-10 train or test from the
python tarball, md5-checked) are cached under common.CACHE_DIR. --ckpt also merges its numbers into the run's
results.json (keys fid, is_mean, is_std, fid_n, fid_ref, fid_cfg_scale).

API (what distill.py's --fid-every uses; bad input raises common.UsageError):

    import fid
    ok, why = fid.inception_available()                  # never downloads
    net = fid.load_inception(path=None, device=device)   # FID Inception in eval mode; download=False to forbid it
    mu, sigma = fid.reference_stats("train", cifar=None, net=net, device=device)  # or "test", or a .npz path
    r = fid.fid_of_model(ema, net, mu, sigma, n=10000, cfg_scale=1.5, seed=0, batch=200, device=device)
    r == {"fid": ..., "is_mean": ..., "is_std": ...}
    pool3, logits = fid.features_and_logits(net, uint8_images, batch=200, device=device)  # NHWC or NCHW

Use n >= 2048 (10k or more) for a full-rank covariance; SciPy's sqrtm of the 2048x2048 product takes seconds on a
CPU. reference_stats needs a net from load_inception (its weights_id keys the cache).
"""
import argparse
import glob
import json
import os
import pickle
import sys
import tarfile

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import common
import sample
from common import (UsageError, check_number, download_file, exit_on_usage_error, file_digest, load_error,
                    pick_device, positive_ints, save_npz, writable_file, write_json)

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"  # 6726825d: its sha256 prefix, checked on download
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
EDM_REF_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz"  # EDM's train statistics
SIZE, FEATURES, CLASSES = 299, 2048, 1008  # Inception input side, pool3 width, the TF graph's classes
PUBLISHED_N = 50000                        # published CIFAR-10 FIDs use 50k samples


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="checkpoint (distill.py / ta.py / mi1.py): generate N images, EMA weights")
    src.add_argument("--npz", help=".npz of uint8 images [N,H,W,3] or [N,3,H,W] (key 'images', as sample.py --npz)")
    src.add_argument("--images", help="folder of .png images (any size; all the same size)")
    src.add_argument("--cifar-images", choices=["train", "test"], help="CIFAR-10 itself (sanity check vs --ref)")
    p.add_argument("--ref", "--fid-ref", dest="ref", default="train", help="reference: 'train' (50k, EDM's), "
                   "'test' (10k, GET's), or an .npz with mu [2048] and sigma [2048,2048] (EDM's cifar10-32x32.npz, "
                   "pytorch-gan-metrics' files); the paper does not say which it used")
    p.add_argument("--cifar", help="CIFAR-10 python tarball cifar-10-python.tar.gz (default: data/ cache, downloaded)")
    p.add_argument("--inception", help=f"FID Inception weights {WEIGHTS_NAME} (default: torch hub cache, downloaded)")
    p.add_argument("--n", type=int, help=f"images: generated from --ckpt (default {PUBLISHED_N}), else the first N")
    p.add_argument("--cfg-scale", type=float, help="--ckpt: guidance scale (default: the paper's 1.5; 1 for a model "
                   "trained on unconditional pairs, which is sampled with the null class)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the generated images")
    p.add_argument("--batch", type=int, default=200, help="images per generator / Inception forward pass")
    p.add_argument("--json", help="merge the numbers into this JSON file (default with --ckpt: results.json beside it)")
    p.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: the first available)")
    return p


# ----------------------------------------------------------------------------------------------
# The FID Inception-v3: torchvision's layout and key names, 1008 classes, no aux head, and the TF graph's
# own blocks: average pools that ignore the zero padding, and a max pool in Mixed_7c's pool branch.

class Conv(nn.Module):
    """conv (no bias) -> batch norm (TF's eps 1e-3) -> ReLU; keys `conv.weight`, `bn.running_var`, ..."""

    def __init__(self, c_in, c_out, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def chain(x, *layers):
    for layer in layers:
        x = layer(x)
    return x


def tf_avg_pool(x):
    """3x3 stride-1 average pool as TF computes it: the padded zeros are not counted."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """35x35 block (Mixed_5b-d): 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1; out 224 + pool_c."""

    def __init__(self, c_in, pool_c):
        super().__init__()
        self.branch1x1 = Conv(c_in, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(c_in, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(c_in, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(c_in, pool_c, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), chain(x, self.branch5x5_1, self.branch5x5_2),
                          chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(tf_avg_pool(x))], 1)


class MixedB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max pool/2; out 384 + 96 + c_in."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = Conv(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(c_in, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, 3, stride=2)], 1)


class MixedC(nn.Module):
    """17x17 block (Mixed_6b-e) with factorised 7x7s of c channels: four branches of 192, out 768."""

    def __init__(self, c_in, c):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = Conv(c_in, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = Conv(c_in, c, 1), Conv(c, c, **row), Conv(c, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(c_in, c, 1), Conv(c, c, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = Conv(c, c, **row), Conv(c, c, **col)
        self.branch7x7dbl_5 = Conv(c, 192, **row)
        self.branch_pool = Conv(c_in, 192, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                                self.branch7x7dbl_4, self.branch7x7dbl_5),
                          self.branch_pool(tf_avg_pool(x))], 1)


class MixedD(nn.Module):
    """17 -> 8 reduction (Mixed_7a): 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max pool/2; out 1280."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(c_in, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(c_in, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat([chain(x, self.branch3x3_1, self.branch3x3_2),
                          chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
                          F.max_pool2d(x, 3, stride=2)], 1)


class MixedE(nn.Module):
    """8x8 block (Mixed_7b, 7c): 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | pool -> 1x1; out 2048.
    The TF graph's Mixed_7c pools with a max, not an average (max_pool=True)."""

    def __init__(self, c_in, max_pool=False):
        super().__init__()
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.max_pool = max_pool
        self.branch1x1 = Conv(c_in, 320, 1)
        self.branch3x3_1 = Conv(c_in, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = Conv(384, 384, **row), Conv(384, 384, **col)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(c_in, 448, 1), Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = Conv(384, 384, **row), Conv(384, 384, **col)
        self.branch_pool = Conv(c_in, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """x [B,3,299,299] on [-1,1] -> (pool3 [B,2048], logits [B,1008] without the fc bias, as IS uses them)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)      # 299 -> 149
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)                # -> 147
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)     # -> 147, max pool -> 73
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)               # -> 71, max pool -> 35
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = MixedA(192, 32), MixedA(256, 64), MixedA(288, 64)
        self.Mixed_6a = MixedB(288)                         # -> 17x17x768
        self.Mixed_6b, self.Mixed_6c = MixedC(768, 128), MixedC(768, 160)
        self.Mixed_6d, self.Mixed_6e = MixedC(768, 160), MixedC(768, 192)
        self.Mixed_7a = MixedD(768)                         # -> 8x8x1280
        self.Mixed_7b, self.Mixed_7c = MixedE(1280), MixedE(2048, max_pool=True)  # -> 8x8x2048
        self.fc = nn.Linear(FEATURES, CLASSES)

    def forward(self, x):
        x = F.max_pool2d(chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3), 3, stride=2)
        x = F.max_pool2d(chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3), 3, stride=2)
        x = chain(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                  self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
        pool3 = F.adaptive_avg_pool2d(x, 1).flatten(1)     # [B,2048]
        return pool3, pool3 @ self.fc.weight.T


# ----------------------------------------------------------------------------------------------
# Weights

def inception_available(path=None):
    """(True, file) if the weights are at `path` or in the torch hub cache, else (False, why); never downloads."""
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    file = path or os.path.join(hub, WEIGHTS_NAME)
    if os.path.isfile(file):
        return True, file
    return False, (f"no FID Inception weights at {file}. Download {WEIGHTS_URL} and pass --inception PATH (or put "
                   f"it in {hub}/); online, fid.py downloads it there itself.")


def load_inception(path=None, device="cpu", download=True):
    """The FID Inception in eval mode on device, loaded strictly from pytorch-fid's weights file: `path`, else the
    torch hub cache, else downloaded there (sha256 prefix checked) if download. net.weights_id is the file's
    sha256 prefix (it keys the reference-statistics cache)."""
    ok, why = inception_available(path)
    if not ok and not download:
        raise UsageError(why)
    file = common.weights_file(path, "--inception", WEIGHTS_NAME, WEIGHTS_URL, download)
    net = FIDInception()
    try:
        net.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))  # strict: pytorch-fid's keys
    except Exception as e:
        raise UsageError(f"{file} is not pytorch-fid's FID Inception weights {WEIGHTS_NAME} "
                         f"({load_error(e, 300)}). Download {WEIGHTS_URL} and pass --inception PATH.")
    net.weights_id = file_digest(file)[:8]
    return net.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------------------------
# Images -> pool3 features and logits

def tf1_resize(x, size=SIZE):
    """TF1's ResizeBilinear (align_corners=False, no half-pixel centres), as in the FID graph: output pixel i
    samples the input at src = i * (in/out), in float32, between floor(src) and the next pixel (clamped at the
    border) with weight src - floor(src); along x first, then y. x float [B,C,H,W] -> [B,C,size,size].
    (F.interpolate(align_corners=False), pytorch-fid's resize, samples at (i + 0.5) * in/out - 0.5 instead.)"""
    def taps(n_in):
        scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(size, dtype=torch.float32)
        src = torch.arange(size, dtype=torch.float32) * scale
        lo = src.floor().long()
        return lo.to(x.device), (lo + 1).clamp(max=n_in - 1).to(x.device), (src - lo).to(x.device, x.dtype)

    y_lo, y_hi, y_w = taps(x.shape[2])
    x_lo, x_hi, x_w = taps(x.shape[3])
    left, right = x[..., x_lo], x[..., x_hi]                 # [B,C,H,size]
    rows = left + (right - left) * x_w
    top, bottom = rows[:, :, y_lo], rows[:, :, y_hi]         # [B,C,size,size]
    return top + (bottom - top) * y_w[:, None]


def as_uint8_nchw(images, what="images"):
    """uint8 images [N,H,W,3] or [N,3,H,W] (numpy or torch) -> torch uint8 [N,3,H,W]; anything else: UsageError."""
    t = images if torch.is_tensor(images) else np.asarray(images)
    if str(t.dtype).replace("torch.", "") != "uint8":
        raise UsageError(f"{what}: expected uint8 images on [0,255], got {t.dtype}. Quantise images on [-1,1] as "
                         f"(x*127.5+128).clip(0,255).astype(uint8), as sample.py --npz does.")
    if t.ndim != 4 or 3 not in (t.shape[1], t.shape[3]) or len(t) == 0:
        raise UsageError(f"{what}: expected RGB images [N,H,W,3] or [N,3,H,W] with N > 0, got shape {tuple(t.shape)}.")
    t = torch.as_tensor(t)
    return t if t.shape[1] == 3 else t.permute(0, 3, 1, 2)


@torch.no_grad()
def features_and_logits(net, images, batch=200, device="cpu", progress=False):
    """uint8 images [N,H,W,3] or [N,3,H,W] -> (pool3 float32 [N,2048], logits float32 [N,1008]) as numpy."""
    images = as_uint8_nchw(images)
    pool3, logits = np.empty((len(images), FEATURES), np.float32), np.empty((len(images), CLASSES), np.float32)
    # the TF graph ran in full float32; TF32 (cuDNN's default for convolutions on Ampere+) would round every
    # convolution's inputs to 10 mantissa bits, so it is off while the Inception runs
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for i in tqdm(range(0, len(images), batch), disable=not progress, desc="inception"):
            x = tf1_resize(images[i:i + batch].to(device).float())  # on [0,255], like the graph
            f, l = net((x - 128) / 128)
            pool3[i:i + len(x)], logits[i:i + len(x)] = f.cpu().numpy(), l.cpu().numpy()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    return pool3, logits


# ----------------------------------------------------------------------------------------------
# Statistics, FID, IS

def statistics(features):
    """features [N,D] -> mean [D] and covariance [D,D] (ddof=1), float64, accumulated in 10k-row chunks."""
    f = np.asarray(features)
    mu = f.mean(0, dtype=np.float64)
    sigma = np.zeros((f.shape[1], f.shape[1]))
    for i in range(0, len(f), 10000):
        centred = f[i:i + 10000].astype(np.float64) - mu
        sigma += centred.T @ centred
    return mu, sigma / (len(f) - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1-mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)). A non-finite sqrtm (singular product) is retried with eps*I
    added to both covariances; a complex result whose diagonal has |imag| > 1e-3 is an error, else its real part."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise UsageError(f"sqrtm(S1 S2) has an imaginary part of {imag:.3g} on its diagonal: the covariances are "
                             f"not valid (too few images for {len(sigma1)} dimensions, or a broken statistics file).")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, splits=10):
    """exp(mean_x KL(p(y|x) || p(y))) on each of `splits` parts -> (mean, std). The rows are first shuffled with a
    fixed permutation (torch-fidelity's, seed 2020), so that a class-sorted input does not give one-class parts."""
    n = len(logits)
    log_p = torch.as_tensor(np.asarray(logits), dtype=torch.float64).log_softmax(1)  # over all 1008 classes
    log_p = log_p[torch.from_numpy(np.random.RandomState(2020).permutation(n))]
    scores = []
    for k in range(splits):
        part = log_p[k * n // splits:(k + 1) * n // splits]
        log_marginal = part.exp().mean(0).log()                                      # log p(y) of the part
        scores.append((part.exp() * (part - log_marginal)).sum(1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def metrics(net, images, ref_mu, ref_sigma, batch=200, device="cpu", progress=False):
    """uint8 images against reference statistics -> {"fid", "is_mean", "is_std"}."""
    pool3, logits = features_and_logits(net, images, batch, device, progress)
    is_mean, is_std = inception_score(logits)
    return {"fid": frechet_distance(*statistics(pool3), ref_mu, ref_sigma), "is_mean": is_mean, "is_std": is_std}


def fid_of_model(model, net, ref_mu, ref_sigma, n=PUBLISHED_N, cfg_scale=1.5, seed=0, batch=200, device="cpu",
                 progress=False, conditional=True):
    """A DiT (pass the EMA copy) -> {"fid", "is_mean", "is_std"} of n images from one seeded generator, labels
    i % 10, or the null class for an unconditional model (sample.generate)."""
    images, _ = sample.generate(model, n, cfg_scale, seed, batch, device, progress, conditional)
    return metrics(net, images, ref_mu, ref_sigma, batch, device, progress)


# ----------------------------------------------------------------------------------------------
# Inputs: .npz, PNG folder, CIFAR-10; reference statistics

def training_setup(inception, ref, cifar, n, device, log):
    """(Inception, reference mu, sigma) for FID during training when the weights and the reference are on disk
    (nothing is downloaded mid-run); else None, said once and why."""
    ok, why = inception_available(inception)
    if not ok:
        log(f"FID skipped: {why}")
        return None
    try:
        net = load_inception(inception, device, download=False)
        mu, sigma = reference_stats(ref, cifar, net, device, download=False)
    except UsageError as e:
        log(f"FID skipped: {e}")
        return None
    if n < PUBLISHED_N:
        log(f"FID of {n:,} samples is not comparable with published 50k FIDs.")
    return net, mu, sigma


def load_npz_images(path):
    """sample.py's .npz (key 'images'), or an .npz holding one array -> uint8 [N,3,H,W]."""
    if not os.path.isfile(path):
        raise UsageError(f"--npz {path}: no such file; write one with python sample.py --ckpt CKPT --npz {path}.")
    try:
        with np.load(path) as f:  # allow_pickle=False: an .npz of plain arrays only
            names = list(f.files)
            images = f["images" if "images" in names else names[0]] if "images" in names or len(names) == 1 else None
    except Exception as e:  # not an .npz, truncated, or holding pickled objects
        raise UsageError(f"cannot read {path} as an .npz of arrays ({type(e).__name__}: {e}); write one with "
                         f"python sample.py --ckpt CKPT --npz {path}.")
    if images is None:
        raise UsageError(f"{path} holds {names}; expected an 'images' array (sample.py --npz) or one array.")
    return as_uint8_nchw(images, path)


def load_png_folder(path):
    """Every .png in a folder (sorted by name), as RGB -> uint8 [N,3,H,W]."""
    if not os.path.isdir(path):
        raise UsageError(f"--images {path}: not a folder (expected a folder of .png images).")
    files = sorted(f for f in glob.glob(os.path.join(path, "*")) if f.lower().endswith(".png"))
    if not files:
        raise UsageError(f"--images {path}: the folder holds no .png files.")
    images = []
    for f in files:
        try:
            images.append(np.asarray(Image.open(f).convert("RGB")))  # grey or RGBA -> RGB, as torch-fidelity does
        except OSError as e:
            raise UsageError(f"cannot read {f} as an image ({e}).")
        if images[-1].shape != images[0].shape:
            raise UsageError(f"{f} is {images[-1].shape[:2]}, but {files[0]} is {images[0].shape[:2]}: the images in "
                             f"--images {path} must all have one size.")
    return as_uint8_nchw(np.stack(images), path)


def cifar_tarball(path=None, download=True):
    """The CIFAR-10 python tarball: `path`, else common.CACHE_DIR's copy, else downloaded there (md5 checked)."""
    if path:
        if not os.path.isfile(path):
            raise UsageError(f"--cifar {path}: no such file (expected cifar-10-python.tar.gz from {CIFAR_URL}).")
        return path
    file = os.path.join(common.CACHE_DIR, "cifar-10-python.tar.gz")
    if os.path.isfile(file):
        return file
    hint = (f"Download {CIFAR_URL} elsewhere and pass --cifar PATH, or pass --ref FILE.npz with precomputed "
            f"statistics (EDM's train statistics: {EDM_REF_URL}).")
    if not download:
        raise UsageError(f"CIFAR-10 is not at {file}. {hint}")
    try:
        download_file(CIFAR_URL, file, md5=CIFAR_MD5)
    except OSError as e:
        raise UsageError(f"CIFAR-10 could not be downloaded from {CIFAR_URL} ({e}). {hint}")
    return file


def read_cifar(tar_path, split):
    """CIFAR-10 train (50k) or test (10k) images from the python tarball -> uint8 [N,3,32,32]."""
    arrays = []
    try:
        with tarfile.open(tar_path) as tar:
            for name in CIFAR_FILES[split]:
                with tar.extractfile(f"cifar-10-batches-py/{name}") as f:
                    # CIFAR-10's format is a Python pickle; it is unpickled only from this tarball, which is the
                    # md5-checked download or a file the user named with --cifar
                    batch = pickle.load(f, encoding="bytes")
                arrays.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
    except Exception as e:  # not a tarball, truncated, or other files inside
        raise UsageError(f"{tar_path} is not the CIFAR-10 python tarball ({type(e).__name__}: {e}); expected "
                         f"cifar-10-batches-py/{{data_batch_1..5,test_batch}} inside, as in {CIFAR_URL}.")
    return torch.from_numpy(np.concatenate(arrays))


def reference_name(which):
    """How results record a reference: 'cifar10-train', 'cifar10-test', or the statistics file's path."""
    return f"cifar10-{which}" if which in CIFAR_FILES else which


def read_stats(path):
    """An .npz with mu [2048] and sigma [2048,2048] (EDM's, pytorch-gan-metrics', TTUR's, ours) -> float64."""
    try:
        with np.load(path) as f:
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    except Exception as e:  # missing, not an .npz, truncated, or without mu/sigma
        raise UsageError(f"--ref {path}: expected 'train', 'test' or an .npz with arrays mu and sigma "
                         f"({type(e).__name__}: {e}).")
    if mu.shape != (FEATURES,) or sigma.shape != (FEATURES, FEATURES):
        raise UsageError(f"--ref {path}: mu {mu.shape} and sigma {sigma.shape} must be [2048] and [2048,2048] "
                         f"(pool3 statistics of the FID Inception).")
    return mu, sigma


def reference_stats(which="train", cifar=None, net=None, device="cpu", batch=200, progress=False, download=True):
    """Reference (mu, sigma): an .npz path, or CIFAR-10 'train'/'test' statistics, cached under common.CACHE_DIR by
    split and by Inception weights (net.weights_id, set by load_inception) once computed."""
    if which not in CIFAR_FILES:
        return read_stats(which)
    official = os.path.join(common.CACHE_DIR, f"fid_ref_cifar10_{which}_inception-{net.weights_id}.npz")
    if cifar is None and os.path.isfile(official):
        return read_stats(official)
    tar = cifar_tarball(cifar, download)
    md5 = file_digest(tar, "md5")
    cache = official if md5 == CIFAR_MD5 else official.replace(".npz", f"_tar-{md5[:8]}.npz")  # its own cache
    if os.path.isfile(cache):
        mu, sigma = read_stats(cache)
    else:
        pool3, _ = features_and_logits(net, read_cifar(tar, which), batch, device, progress)
        mu, sigma = statistics(pool3)
        os.makedirs(common.CACHE_DIR, exist_ok=True)
        save_npz(cache, mu=mu, sigma=sigma, n=len(pool3))  # atomic: an interrupted run never leaves a broken cache
    if md5 != CIFAR_MD5:
        print(f"warning: {tar} is not the official CIFAR-10 tarball (md5 {md5}, expected {CIFAR_MD5}); its "
              f"statistics are not comparable with published numbers.", file=sys.stderr)
    return mu, sigma


# ----------------------------------------------------------------------------------------------
# Command line

def read_json(path):
    """An existing results file (a JSON object) or {}; checked before any slow work."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        record = e
    if not isinstance(record, dict):
        raise UsageError(f"{path} is not a JSON object ({record}); move it away or pass --json with another file.")
    return record


def run(args):
    check_number(args.n, "--n", low=10, integer=True)  # IS averages over 10 splits
    positive_ints(args, "batch")
    check_number(args.cfg_scale, "--cfg-scale", low=0)
    check_number(args.seed, "--seed", low=0, integer=True)
    device = pick_device(args.device)
    json_path = args.json or (os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "results.json")
                              if args.ckpt else None)
    if json_path:  # a results file that cannot be merged or written stops the run now, not after the work
        read_json(json_path)
        writable_file(json_path, "--json")
    # the inputs are read first, so a malformed one stops the run before any slow step
    if args.ckpt:
        model, config = sample.load_model(args.ckpt, device)
        conditional, cfg_scale = sample.guidance(config, args.cfg_scale)
        n, source = args.n or PUBLISHED_N, (f"{args.ckpt} (EMA, {'' if conditional else 'unconditional, '}"
                                            f"CFG {cfg_scale:g}, seed {args.seed})")
    else:
        if args.npz:
            images, source = load_npz_images(args.npz), args.npz
        elif args.images:
            images, source = load_png_folder(args.images), args.images
        else:
            images, source = read_cifar(cifar_tarball(args.cifar), args.cifar_images), f"cifar10-{args.cifar_images}"
        n = args.n or len(images)
        if n > len(images):
            raise UsageError(f"--n {n}, but {source} holds only {len(images)} images.")
    net = load_inception(args.inception, device)
    ref_mu, ref_sigma = reference_stats(args.ref, args.cifar, net, device, args.batch, progress=True)
    if args.ckpt:
        result = fid_of_model(model, net, ref_mu, ref_sigma, n, cfg_scale, args.seed, args.batch, device, True,
                              conditional)
    else:
        result = metrics(net, images[:n], ref_mu, ref_sigma, args.batch, device, progress=True)
    ref = reference_name(args.ref)
    print(f"FID {result['fid']:.3f} | IS {result['is_mean']:.3f} +- {result['is_std']:.3f} | {n:,} images from "
          f"{source} vs {ref}")
    if n < PUBLISHED_N:
        print(f"note: {n:,} images: FID grows as N shrinks (and below {FEATURES:,} the covariance is singular), so "
              f"this number is not comparable with published FIDs, which use {PUBLISHED_N:,}.")
    if json_path:
        record = read_json(json_path)
        record.update(result, fid_n=n, fid_ref=ref, **({"fid_cfg_scale": cfg_scale} if args.ckpt else {}))
        write_json(json_path, record)
        print(f"merged into {json_path}")
    return result


def main(argv=None):
    """Parse and run; bad input ends in one paragraph on stderr and exit code 2. Returns the metrics dict."""
    args = get_parser().parse_args(argv)
    with exit_on_usage_error():
        return run(args)


if __name__ == "__main__":
    main()
