"""
The built-in toy teacher (`--data toy`, the offline default): a CIFAR-shaped family of images, an exact EDM
teacher for it, and the toy metrics that stand in for FID where CIFAR-10 and the Inception cannot be had.

    python toy.py                  # the toy metric's calibration: the teacher's own images, its noise, baselines
    python toy.py --ckpt runs/d5w64h8_toy-lpips/ckpt.pt   # ... and those checkpoints' samples beside them
    python toy.py --ckpt CKPT --cfg-scale 1 1.25 1.5          # ... at several guidance scales (and its best)
    python toy.py --ckpt A/ckpt.pt B/ckpt.pt --compare c.png  # the toy teacher above each student, same noise
    python data.py --data toy      # build (or find) the cached teacher pairs, print a summary

    import toy
    x, y = toy.draw(16, torch.Generator().manual_seed(0))   # exact samples of the family [16,3,32,32], labels
    x = toy.teacher_sample(z, y)                            # the teacher: unit noise z [B,3,32,32] -> images

The family. Ten classes of shapes (CLASSES): each image is one shape on a plain background, the shape at one
of a few positions and sizes (its "mode": 2 sizes x 9 positions, uniform), its colours continuous:
background ~ N(-0.4, 0.35^2) and foreground ~ N(0.5, 0.35^2), every channel independently. An image is then
x0 = bg (1 - m) + fg m for the mode's soft mask m [32,32]: a mixture, over modes, of Gaussians in a 6-dim
colour subspace.

The teacher. The optimal denoiser of that family is known in closed form (no training): for a mode with
mask m and per-channel basis B = [1 - m, m], x0 = B a with a ~ N(mu, tau^2 I), so p(x | mode) at noise sigma
is N(B mu, sigma^2 I + tau^2 B B^T), whose likelihood and posterior mean E[a | x] need only the projections
B^T x and 2x2 matrices; D(x; sigma, c) = sum_modes p(mode | x) B E[a | x, mode]. It is driven by EDM's
deterministic sampler (Karras et al. 2022, Algorithm 1: 18 steps, rho 7, sigma 80 -> 0.002, Heun's
correction on every step but the last) from x = 80 z, in float64. So the teacher's pairs (z, y, x) are
exactly what EDM would produce for this data set, and a student's error on held-out pairs measures imitation.
"""
import argparse
import collections
import concurrent.futures
import hashlib
import os
import threading
import time
import warnings

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import dit
from common import atomic_write, check_number, exit_on_usage_error, writable_dir
import sample
from fid import frechet_distance, statistics  # FID's own: mean and covariance (ddof 1), float64

IMG, CHANNELS, NUM_CLASSES = 32, 3, 10
SHAPE = (CHANNELS, IMG, IMG)
SIGMA_MIN, SIGMA_MAX, RHO, STEPS = 0.002, 80.0, 7.0, 18  # EDM's sampler for CIFAR-10
CLASSES = ("disc", "square", "triangle", "ring", "plus", "horizontal stripes", "vertical stripes",
           "diagonal stripes", "checkerboard", "two discs")
COLOUR_MEAN = (-0.4, 0.5)  # (background, foreground), every channel
COLOUR_STD = 0.35
SIZES = (6, 8)             # shape radius in pixels
JITTER = 1                 # positions: the centre moved by -JITTER..JITTER pixels in x and y


# ----------------------------------------------------------------------------------------------
# The family

def shape_mask(c, r, dy=0, dx=0):
    """Class c's shape of radius r, centred at pixel corner (16 + dy, 16 + dx) -> soft mask [32,32] in [0,1]
    (a 1-pixel soft edge, as anti-aliased drawing gives)."""
    yy, xx = np.mgrid[0:IMG, 0:IMG].astype(np.float64) + 0.5  # pixel centres
    ty, tx = yy - IMG / 2 - dy, xx - IMG / 2 - dx            # relative to the shape's centre
    ay, ax, dist = np.abs(ty), np.abs(tx), np.hypot(ty, tx)
    box = r - np.maximum(ay, ax)
    inside = [
        r - dist,                                                      # disc
        box,                                                           # square
        np.minimum(ty + r, r - ax - 0.5 * (r - ty)),                   # triangle, apex up
        r / 3 - np.abs(dist - 0.7 * r),                                # ring
        np.maximum(np.minimum(r - ax, r / 3 - ay), np.minimum(r / 3 - ax, r - ay)),  # plus
        # textures: a window (square or disc) that moves with the shape onto stripes fixed to the image grid
        np.minimum(box, 2 * np.sin(2 * np.pi * yy / 6 + 0.5)),         # horizontal stripes (period 6) in a square
        np.minimum(box, 2 * np.sin(2 * np.pi * xx / 6 + 0.5)),         # vertical stripes in a square
        np.minimum(r - dist, 2 * np.sin(2 * np.pi * (xx + yy) / 8.5 + 0.5)),   # diagonal stripes in a disc
        np.minimum(box, 2 * np.sin(np.pi * xx / 4 + 0.5) * np.sin(np.pi * yy / 4 + 0.5)),  # checkerboard square
        np.maximum(r / 2 - np.hypot(tx + r / 1.6, ty), r / 2 - np.hypot(tx - r / 1.6, ty)),  # two discs
    ][c]
    return np.clip(inside + 0.5, 0, 1)


def masks(c):
    """Every mode of class c -> masks [J, 1024] (float64): each size at each position."""
    return torch.from_numpy(np.stack([shape_mask(c, r, dy, dx).reshape(-1) for r in SIZES
                                      for dy in range(-JITTER, JITTER + 1) for dx in range(-JITTER, JITTER + 1)]))


MASKS = [masks(c) for c in range(NUM_CLASSES)]
# Some modes draw the same image (stripes fixed to the grid under a window moved along them, a triangle of
# either size at some positions): each mode's name is the first mode with its mask, so those count as one.
MODE_NAMES = [torch.tensor([next(i for i in range(j + 1) if torch.equal(m[i], m[j])) for j in range(len(m))])
              for m in MASKS]


# The mode that draws the largest shape at the image's centre (MASKS' order: size, then dy, then dx)
CENTRE_MODE = (len(SIZES) - 1) * (2 * JITTER + 1) ** 2 + JITTER * (2 * JITTER + 1) + JITTER


def draw(n, generator, labels=None, modes=None, factors=False):
    """n exact samples of the family -> (images float32 [n,3,32,32], labels int64 [n]): class uniform (or
    `labels`), mode uniform (or `modes` [n], indices into MASKS[label]), colours Gaussian. With factors, also
    each image's mode [n] and colours [n,6] (background, then foreground, per channel)."""
    y = torch.randint(0, NUM_CLASSES, (n,), generator=generator) if labels is None else labels
    x, mode, colours = torch.empty(n, CHANNELS, IMG * IMG), torch.empty(n, dtype=torch.long), torch.empty(n, 6)
    for c in range(NUM_CLASSES):
        rows = (y == c).nonzero().squeeze(1)
        j = torch.randint(0, len(MASKS[c]), (len(rows),), generator=generator) if modes is None else modes[rows]
        m = MASKS[c][j].float()[:, None]
        bg, fg = (mean + COLOUR_STD * torch.randn(len(rows), CHANNELS, 1, generator=generator) for mean in COLOUR_MEAN)
        x[rows] = bg * (1 - m) + fg * m
        mode[rows], colours[rows] = j, torch.cat([bg, fg], 1).squeeze(2)
    return (x.view(n, *SHAPE), y) + ((mode, colours) if factors else ())


def soften(images, sigma):
    """A Gaussian blur of each image [B,3,32,32] with its own sigma [B] in pixels (0: unchanged), 7 taps, the
    border repeated: the softness a one-step student's images have."""
    taps = torch.arange(-3, 4, dtype=images.dtype)
    kernel = torch.exp(-taps ** 2 / (2 * sigma.to(images.dtype).clamp(min=1e-3)[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True))[:, None, None, None, :]        # [B,1,1,1,7]
    x = F.pad(images, (3, 3, 3, 3), mode="replicate")
    x = (x.unfold(3, 7, 1) * kernel).sum(-1)                                          # along rows: [B,3,38,32]
    return (x.unfold(2, 7, 1) * kernel).sum(-1)                                       # along columns: [B,3,32,32]


# ----------------------------------------------------------------------------------------------
# The exact teacher

def rho_schedule(t, sigma_min=SIGMA_MIN):
    """EDM's noise levels as a function of t in [0,1]: sigma_min at t = 0, SIGMA_MAX at t = 1, evenly spaced
    in sigma^(1/rho). The sampler walks it from t = 1 down; mi1.py reads it forwards."""
    return (sigma_min ** (1 / RHO) + t * (SIGMA_MAX ** (1 / RHO) - sigma_min ** (1 / RHO))) ** RHO


def edm_sigmas(steps=STEPS):
    """EDM's time steps t_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, i < N, then 0."""
    i = torch.arange(steps, dtype=torch.float64)
    return torch.cat([rho_schedule(1 - i / (steps - 1)), torch.zeros(1, dtype=torch.float64)])


def heun_solve(x, sigmas, denoise):
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1): integrates the probability-flow ODE
    dx/dsigma = (x - D(x, sigma)) / sigma from sigmas[0] down to sigmas[-1], with Heun's 2nd-order correction
    on every step except one that ends at sigma = 0 (Euler). x [b,D] at sigmas[0] -> x [b,D] at sigmas[-1]."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoise(x, s)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d_next = (x_next - denoise(x_next, s_next)) / s_next
            x_next = x + (s_next - s) * (d + d_next) / 2
        x = x_next
    return x


def mode_projections(x, m):
    """What an image enters the family's likelihoods through: per channel and mode, with B_j = [1 - m_j, m_j],
    G_j = B_j^T B_j [J,2,2] and b_j = B_j^T x (the image's sums outside and inside mask j) [B,3,J,2], for
    images x [B,3,P] and a class's mode masks m [J,P]."""
    area, area2, total = m.sum(1), (m * m).sum(1), m.shape[1]
    G = torch.stack([torch.stack([total - 2 * area + area2, area - area2], -1),
                     torch.stack([area - area2, area2], -1)], -2)                     # [J,2,2]
    inside = x @ m.T                                                                 # [B,3,J]
    return G, torch.stack([x.sum(-1, keepdim=True) - inside, inside], -1)            # [B,3,J,2]


def denoiser(x, sigma, m, mean=COLOUR_MEAN, std=COLOUR_STD):
    """The optimal denoiser E[x0 | x] of one class: x [B,3,P] (float64) at noise level sigma, the class's mode
    masks m [J,P] -> [B,3,P]. Per channel, mode j's image is B_j a with B_j = [1 - m_j, m_j] and colours
    a = (bg, fg) ~ N(mu, tau^2 I); with G_j = B_j^T B_j and b_j = B_j^T x (all that x enters through):
      log p(x | j) = const - [mu'G mu - 2 mu'b - (b - G mu)' (sigma^2/tau^2 I + G)^-1 (b - G mu)] / (2 sigma^2)
                     - (1/2) log det(I + tau^2/sigma^2 G)                      (Woodbury, determinant lemma)
      E[a | x, j] = (I/tau^2 + G/sigma^2)^-1 (mu/tau^2 + b/sigma^2)
    summed over the three channels for the likelihood; modes are equally likely."""
    mu, var, eye = torch.tensor(mean, dtype=x.dtype), std ** 2, torch.eye(2, dtype=x.dtype)
    G, b = mode_projections(x, m)                                                    # [J,2,2], [B,3,J,2]
    G_mu = G @ mu                                                                    # [J,2]
    r = b - G_mu
    quad = (mu * G_mu).sum(-1) - 2 * (b * mu).sum(-1) - torch.einsum(
        "bcji,jik,bcjk->bcj", r, torch.linalg.inv(sigma ** 2 / var * eye + G), r)    # [B,3,J]
    log_p = -quad.sum(1) / (2 * sigma ** 2) - 1.5 * torch.logdet(eye + var / sigma ** 2 * G)  # [B,J]
    weight = torch.softmax(log_p, 1)[:, None]                                        # p(j | x) [B,1,J]
    a = torch.einsum("jik,bcjk->bcji", torch.linalg.inv(eye / var + G / sigma ** 2), mu / var + b / sigma ** 2)
    bg, fg = a[..., 0], a[..., 1]                                                    # E[bg], E[fg] [B,3,J]
    return (weight * bg).sum(-1, keepdim=True) + (weight * (fg - bg)) @ m            # [B,3,P]


def teacher_sample(z, y, steps=STEPS):
    """EDM's Heun sampler on the exact class-conditional denoiser: unit noise z [B,3,32,32] and labels
    y [B] -> teacher images [B,3,32,32] (float32)."""
    sigmas = edm_sigmas(steps)
    out = torch.empty(z.shape, dtype=torch.float32)
    for c in y.unique().tolist():
        rows = (y == c).nonzero().squeeze(1)
        x = heun_solve(z[rows].flatten(1).double() * sigmas[0], sigmas,  # from x = 80 z
                       lambda x, sigma: denoiser(x.view(len(x), CHANNELS, -1), sigma, MASKS[c]).flatten(1))
        out[rows] = x.float().view(-1, *SHAPE)
    return out


def make_pairs(n, seed, chunk=1000, desc="pairs"):
    """n teacher pairs with uniform labels from a seeded generator -> {"z", "y", "x"}; progress and ETA printed."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *SHAPE, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    x = torch.empty_like(z)
    t0 = time.time()
    for i in range(0, n, chunk):
        x[i:i + chunk] = teacher_sample(z[i:i + chunk], y[i:i + chunk])
        done = min(i + chunk, n)
        print(f"toy teacher: {desc} {done}/{n}, {time.time() - t0:.0f}s, eta "
              f"{(time.time() - t0) / done * (n - done):.0f}s", flush=True)
    return {"z": z, "y": y, "x": x}


FAMILY = f"shapes-v3 sizes {SIZES} jitter {JITTER} colours {COLOUR_MEAN} {COLOUR_STD}"  # names the cached files


def check_sizes(n_train, n_heldout, seed):
    """The toy teacher's sizes and seed, as the flags name them; UsageError if out of range."""
    for value, flag in ((n_train, "--toy-pairs"), (n_heldout, "--holdout")):
        check_number(value, flag, low=1, integer=True)
    check_number(seed, "--toy-seed", low=0, integer=True)


def load_pairs(cache_dir, n_train=20000, n_heldout=1000, seed=0):
    """Toy teacher pairs, built once and cached in cache_dir; deterministic for (n_train, n_heldout, seed) ->
    (train, held-out) dicts of z, y, x. A cache file that cannot be read (a copy cut short, say) is rebuilt."""
    check_sizes(n_train, n_heldout, seed)
    key = hashlib.sha1(f"{FAMILY} {n_train} {n_heldout} {seed}".encode()).hexdigest()[:10]
    path = os.path.join(cache_dir, f"toy_{key}.pt")
    if os.path.exists(path):
        try:
            blob = torch.load(path, weights_only=True)
            return blob["train"], blob["heldout"]
        except Exception as e:  # our own cache: rebuild it rather than stop
            print(f"toy teacher: the cache {path} cannot be read ({type(e).__name__}); building it again")
    writable_dir(cache_dir, "the toy-pair cache folder (DIT_NANO_CACHE)")  # before minutes of work, not after
    train = make_pairs(n_train, seed * 2 + 1, desc="train pairs")
    held = make_pairs(n_heldout, seed * 2 + 2, desc="held-out pairs")
    blob = {"train": train, "heldout": held, "config": dict(family=FAMILY, n_train=n_train, n_heldout=n_heldout,
                                                            seed=seed)}
    atomic_write(path, lambda tmp: torch.save(blob, tmp))  # an interrupted build leaves no half file
    print(f"toy teacher: cached {n_train} + {n_heldout} pairs in {path}")
    return train, held


# ----------------------------------------------------------------------------------------------
# Toy metrics: a small classifier of the family stands in for FID's Inception

class Classifier(nn.Module):
    """The toy's class-accuracy network: four 3x3 conv stages (32, 64, 128, 128 channels; average-pooled between
    them) -> 128 features averaged over the image -> `fc`, the 10 class logits. Trained to name the shape (class_loss)
    on exact draws of the family only."""

    def __init__(self):
        super().__init__()
        chans = (CHANNELS, 32, 64, 128, 128)
        self.stages = nn.Sequential(*[nn.Sequential(nn.AvgPool2d(2) if i else nn.Identity(),
                                                    nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.ReLU())
                                      for i in range(4)])
        self.fc = nn.Linear(chans[-1], NUM_CLASSES)

    def features(self, x):
        return self.stages(x).mean((2, 3))  # [B,128]

    def forward(self, x):
        return self.fc(self.features(x))


class FactorNet(Classifier):
    """The toy metric's network, the toy's Inception: the Classifier's layers, whose 128 pooled features FID's
    statistics are taken of, and a second head `factors`, the rest of what the family varies: the shape's size, its
    position in y and in x (logits) and its six colours. Trained by metric_loss on exact draws of the family only."""

    def __init__(self):
        super().__init__()
        self.factors = nn.Linear(self.fc.in_features, len(SIZES) + 2 * (2 * JITTER + 1) + 2 * CHANNELS)


SOFTEN_MAX = 1.0       # metric_loss softens training images with a Gaussian blur of sigma ~ U(0, SOFTEN_MAX) pixels
SOFTNESS_WEIGHT = 10.0  # ... and pulls their features onto the sharp images' with this weight


def metric_loss(net, x, y, modes, colours, generator):
    """The toy metric network's objective, on a batch of exact draws and the same images softened (soften, sigma
    ~ U(0, SOFTEN_MAX)): recognise every factor the family varies (class, size, position in y and x: cross-entropy;
    the six colours: squared error over their variance) from both, and give a softened image the sharp one's
    features (SOFTNESS_WEIGHT x their squared distance over the features' squared norm).
    Why: FID's Inception, trained on a thousand kinds of photos, has features that carry far more than a label
    (colour, pose, texture) and that a mild blur of a CIFAR-10 image, seen upsampled to 299 pixels, moves little. A
    network trained only to name the shape learns to ignore what the family randomises (colours, positions), so a
    set without that diversity (one mean image per class) scored close to the teacher, and its features followed
    edge sharpness so closely that the teacher's images blurred by 3x3 scored worse than the class means."""
    sizes, places = len(SIZES), 2 * JITTER + 1
    soft = soften(x, SOFTEN_MAX * torch.rand(len(x), generator=generator, dtype=x.dtype))
    features = net.features(torch.cat([x, soft]))
    sharp, softened = features.chunk(2)
    two = lambda t: torch.cat([t, t])  # noqa: E731  (the targets of both halves)
    out = net.factors(features)
    size, dy, dx = modes // places ** 2, modes // places % places, modes % places  # MASKS' order: size, dy, dx
    loss = (F.cross_entropy(net.fc(features), two(y)) + F.cross_entropy(out[:, :sizes], two(size))
            + F.cross_entropy(out[:, sizes:sizes + places], two(dy))
            + F.cross_entropy(out[:, sizes + places:sizes + 2 * places], two(dx))
            + ((out[:, sizes + 2 * places:] - two(colours).to(out.dtype)) ** 2).mean() / COLOUR_STD ** 2)
    return loss + SOFTNESS_WEIGHT * ((sharp - softened) ** 2).sum(1).mean() / sharp.detach().pow(2).sum(1).mean()


def class_loss(net, x, y, modes, colours, generator):
    """The toy LPIPS network's objective: name the shape (cross-entropy)."""
    return F.cross_entropy(net(x), y)


class PerceptualNet(nn.Module):
    """The toy LPIPS's network, another classifier of the family with another architecture and seed (so the
    loss never trains on the metric's own features): VGG-like stages of two 3x3 convs (16, 32, 64, 96
    channels) at 32, 16, 8 and 4 pixels; the distance compares every stage's output, as LPIPS compares VGG's."""

    def __init__(self):
        super().__init__()
        chans = (CHANNELS, 16, 32, 64, 96)
        self.stages = nn.ModuleList([nn.Sequential(nn.AvgPool2d(2) if i else nn.Identity(),
                                                   nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.ReLU(),
                                                   nn.Conv2d(chans[i + 1], chans[i + 1], 3, padding=1), nn.ReLU())
                                     for i in range(4)])
        self.fc = nn.Linear(chans[-1], NUM_CLASSES)

    def stage_outputs(self, x):
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def forward(self, x):
        return self.fc(self.stage_outputs(x)[-1].mean((2, 3)))


def train_net(kind, steps=None, batch=128, lr=2e-3, desc=None):
    """NETS[kind]'s network trained by its objective on fresh exact draws of the family (no image is seen twice) for
    `steps` (default: its own), AdamW (for the metric network, the rate falling linearly to 0 over the second half)
    -> the network in float32, for use. Seeded (the initial weights too, without touching the caller's random
    state), on one CPU thread and in float64, so that the weights do not depend on the caller's thread count and
    depend less on the CPU: a float32 convolution rounds differently with each CPU's vector kernels (AVX2, AVX-512,
    ...) and training amplifies it. Float64 only delays the parting over hundreds of steps, hence the shipped files
    (trained_nets). Safe to run in several threads at once."""
    spec = NETS[kind]
    steps = steps or spec.steps
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this thread's (OpenMP's thread count is per calling thread)
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):  # the global generator, only for the initial weights
        torch.manual_seed(spec.seed)
        net = spec.network().double()
    g = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    t0 = time.time()
    try:
        for step in range(steps):
            if spec.decay:
                for group in opt.param_groups:
                    group["lr"] = lr * min(1.0, 2 * (steps - step) / steps)
            x, y, modes, colours = draw(batch, g, factors=True)
            loss = spec.objective(net, x.double(), y, modes, colours, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % 100 == 0 or step + 1 == steps:
                eta = (time.time() - t0) / (step + 1) * (steps - step - 1)
                print(f"{desc or 'toy ' + kind + ' network'}: step {step + 1}/{steps}, loss {loss.item():.4f}, "
                      f"{time.time() - t0:.0f}s, eta {eta:.0f}s", flush=True)
    finally:
        torch.set_num_threads(threads)
    return net.float().eval().requires_grad_(False)


_INIT_LOCK = threading.Lock()
NetSpec = collections.namedtuple("NetSpec", "network seed objective steps decay tag")  # tag: names a changed recipe
NETS = {  # the toy's three networks: FID's features, class accuracy, the toy LPIPS (steps x 128 fresh draws each)
    "metric": NetSpec(FactorNet, 0, metric_loss, 1500, True, "factors, softening"),
    "classifier": NetSpec(Classifier, 0, class_loss, 600, False, ""),
    "perceptual": NetSpec(PerceptualNet, 1, class_loss, 600, False, ""),
}
NETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy_nets")  # shipped with the repo


def net_file_name(kind):
    """The file a kind's network is kept in: named by the family, kind and training recipe."""
    spec = NETS[kind]
    key = f"{FAMILY} {kind} {spec.seed} {spec.steps}" + (f" {spec.tag}" if spec.tag else "")
    return f"toy_{kind}_{hashlib.sha1(key.encode()).hexdigest()[:10]}.pt"


def trained_nets(kinds, cache_dir):
    """{kind: network} for kinds among NETS: the toy metric's classifier ("metric") and the toy LPIPS's network
    ("perceptual"). Each is looked for in NETS_DIR, which ships the ones this code trains for the default family
    (so that every machine scores with the same network, as FID's users share one Inception, and the quick start
    trains neither), then in cache_dir. One found in neither is trained (train_net: minutes on one CPU thread;
    missing ones side by side, one thread each) and cached in cache_dir. Files are named by net_file_name, so a
    changed family or objective trains its own; delete a file to train it again (on another CPU, not bit for bit
    the shipped weights: see train_net)."""
    nets, missing = {}, {}
    for kind in kinds:
        name = net_file_name(kind)
        for path in (os.path.join(NETS_DIR, name), os.path.join(cache_dir, name)):
            if os.path.exists(path):
                try:
                    net = NETS[kind].network()
                    net.load_state_dict(torch.load(path, weights_only=True))
                    nets[kind] = net.eval().requires_grad_(False)
                    break
                except Exception as e:  # our own file: train it again rather than stop
                    print(f"toy {kind} network: {path} cannot be read ({type(e).__name__}); training it again")
        else:
            missing[kind] = os.path.join(cache_dir, name)
    if missing:
        writable_dir(cache_dir, "the toy cache folder (DIT_NANO_CACHE)")
        with concurrent.futures.ThreadPoolExecutor(len(missing)) as pool:  # the convolutions release the GIL
            jobs = {kind: pool.submit(train_net, kind, desc=f"toy {kind} network (once, cached)")
                    for kind in missing}
            for kind, path in missing.items():
                nets[kind] = jobs[kind].result()
                atomic_write(path, lambda tmp: torch.save(nets[kind].state_dict(), tmp))
    return nets


def trained_net(kind, cache_dir):
    """One network of trained_nets."""
    return trained_nets([kind], cache_dir)[kind]


@torch.no_grad()
def features_and_logits(net, images, batch=sample.METRIC_BATCH):
    """images [N,3,32,32] on [-1,1] -> (features float64 [N,128], class logits [N,10]) on the CPU."""
    feats, logits = [], []
    for i in range(0, len(images), batch):
        f = net.features(images[i:i + batch].float().cpu())
        feats.append(f.double())
        logits.append(net.fc(f))
    return torch.cat(feats).numpy(), torch.cat(logits)


def toy_fid(net, images, reference):
    """The toy FID of images [N,3,32,32]: the Frechet distance (fid.py's formula) of the metric network's features
    to the reference statistics (mu, sigma)."""
    with warnings.catch_warnings():  # channels a ReLU never opens have zero variance: sqrtm warns, and copes
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return float(frechet_distance(*statistics(features_and_logits(net, images)[0]), *reference))


def class_accuracy(classifier, images, labels):
    """The fraction of images [N,3,32,32] the class-accuracy network assigns to their class labels [N]."""
    return float((features_and_logits(classifier, images)[1].argmax(1) == labels.cpu()).float().mean())


def modes_of(images, labels):
    """Each image's mode: the mode of its class whose best two-colour fit (a background and a foreground colour
    per channel, least squares) leaves the least error -> its name in MODE_NAMES[label] [N]. The fit's residual
    is |x|^2 - b' G^-1 b per channel (mode_projections' G and b), so the best mode maximises the sum of b' G^-1 b."""
    x = images.detach().cpu().double().flatten(2)  # [N,3,P]
    labels = labels.cpu()
    out = torch.empty(len(x), dtype=torch.long)
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().squeeze(1)
        G, b = mode_projections(x[rows], MASKS[c])
        out[rows] = MODE_NAMES[c][torch.einsum("ncji,jik,ncjk->nj", b, torch.linalg.inv(G), b).argmax(1)]
    return out


def noise_rule_modes(z, labels):
    """A rule on the noise alone: the mode whose mask holds the largest sum of the noise z [N,3,32,32] (over
    its pixels and channels, per square root of its area) -> [N]. How often it names the teacher's mode says
    how simple a function of the noise the teacher's choice of shape position and size is."""
    x, labels = z.cpu().double().flatten(2), labels.cpu()
    out = torch.empty(len(x), dtype=torch.long)
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().squeeze(1)
        out[rows] = MODE_NAMES[c][((x[rows] @ MASKS[c].T).sum(1) / MASKS[c].sum(1).sqrt()).argmax(1)]
    return out


def at_their_positions(images, labels, seed=0):
    """Exact draws of the family (colours fresh, edges the family's) with each of images' shapes where images have
    it (modes_of) -> [N,3,32,32]. Their toy FID is what the images' distribution of shape positions and sizes
    costs on its own: a student that puts its shapes where the teacher's are distributed gets the noise level."""
    return draw(len(images), torch.Generator().manual_seed(seed), labels.cpu(), modes_of(images, labels))[0]


def mode_chance():
    """The teacher's-mode rate of images whose modes are drawn independently of the teacher's, as draw() draws
    them: the mean over classes of sum over distinct images of p(mode)^2."""
    return float(np.mean([(torch.bincount(names) / len(names)).pow(2).sum() for names in MODE_NAMES]))


# The toy's reporting protocol: a student is scored at the guidance scale that suits it best, chosen on its samples of
# other noise (SELECTION_SEED, the held-out labels) so that the choice does not flatter its held-out score, with the
# paper's fixed scale 1.5 beside it. Why not one fixed scale for all: the toy teacher samples its family without
# guidance, so guidance only sharpens a soft student, and a sharper student needs less of it (the README's guidance
# plot); at a fixed scale designs are ranked partly by how well that scale suits each. Every evaluation keeps the toy
# FID at every scale of SCALES, of both noises, so another protocol can be read off the records without retraining.
SCALES = tuple(round(1 + 0.1 * k, 1) for k in range(11))  # 1, 1.1, ..., 2
PROTOCOL = "toy_fid_best: the scale of SCALES whose selection-noise samples score lowest; toy_fid: at cfg_scale"
SELECTION_SEED = 2**31 - 1  # no teacher pair's noise comes from it (their seeds are 2 toy_seed + 1, + 2)


def selection_noise(n):
    """The noise [n,3,32,32] whose samples choose a run's guidance scale (Scorer.score_model)."""
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(SELECTION_SEED))


class Scorer:
    """The toy metrics as FID's protocol has them: the metric network (trained_net "metric"), the reference
    statistics of the teacher's training images (the toy's "CIFAR-10 train") and the class-accuracy network.
    scorer(images, labels) -> {"toy_fid", "toy_acc"}; given the teacher's images for the same noise, also
    "toy_mode": the fraction of images drawn in the teacher's mode (shape position and size; chance is
    mode_chance()). The toy FID, like FID, pools its features over the image: it sees how a set's shape positions
    are distributed (python toy.py: the family with every shape large and centred scores far above fresh teacher
    sets), not whether each image has its shape where the teacher put it for the same noise: toy_mode does.
    scorer.score_model applies the protocol."""

    def __init__(self, train_images, cache_dir):
        nets = trained_nets(["metric", "classifier"], cache_dir)
        self.net, self.classifier = nets["metric"], nets["classifier"]
        self.reference = statistics(features_and_logits(self.net, train_images)[0])

    def __call__(self, images, labels, teacher=None):
        out = {"toy_fid": toy_fid(self.net, images, self.reference),
               "toy_acc": class_accuracy(self.classifier, images, labels)}
        if teacher is not None:
            out["toy_mode"] = float((modes_of(images, labels) == modes_of(teacher, labels)).float().mean())
        return out

    def fids_by_scale(self, halves, labels, scales=None):
        """{scale: toy FID} of a model's samples guided at each of scales (default SCALES); halves: its conditional
        and unconditional predictions for some noise and labels [N] (sample.guidance_halves), two passes for all."""
        return {s: toy_fid(self.net, dit.guided(halves, s), self.reference) for s in scales or SCALES}

    def score_model(self, model, halves, labels, teacher, cfg_scale, device):
        """A DiT's toy metrics on the held-out pairs, by the protocol; halves: its predictions for the held-out noise ->
        {"toy_fid", "toy_acc", "toy_mode": of its samples guided at the run's cfg_scale; "toy_fid_best": at
        "cfg_best", the scale whose samples of selection_noise score lowest; "toy_fid_by_cfg" and
        "selection_fid_by_cfg": {scale: toy FID} of the held-out and the selection samples; "toy_protocol" names
        the protocol}."""
        held = self.fids_by_scale(halves, labels)
        selection = self.fids_by_scale(sample.guidance_halves(model, selection_noise(len(labels)), labels, device),
                                       labels)
        best = min(selection, key=selection.get)
        return dict(self(dit.guided(halves, cfg_scale), labels, teacher), toy_fid_best=held[best], cfg_best=best,
                    toy_protocol=PROTOCOL,
                    toy_fid_by_cfg={f"{s:g}": v for s, v in held.items()},
                    selection_fid_by_cfg={f"{s:g}": v for s, v in selection.items()})


# ----------------------------------------------------------------------------------------------
# The toy LPIPS: the paper's perceptual loss, offline

PIXEL_WEIGHT = 10.0  # the pixel term beside the perceptual one (see perceptual_loss)


def unit_channels(f, eps=1e-10):
    """Each pixel's feature vector scaled to unit length, as LPIPS normalises VGG's features [B,C,H,W]."""
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)


def perceptual_loss(cache_dir, device):
    """The toy LPIPS as a loss(pred, target) -> scalar: LPIPS's form (Zhang et al. 2018, without its learned
    channel weights) on the toy perceptual network: per stage, the squared difference of the unit-normalised
    features summed over channels and averaged over pixels, summed over the four stages; plus PIXEL_WEIGHT x
    the mean squared pixel error. The pixel term is this repo's addition: normalised features carry shape and
    contrast but not the colours themselves (a student trained on the perceptual term alone drew the right
    shapes in grey), where VGG's first layers keep them for the real LPIPS."""
    net = trained_net("perceptual", cache_dir).to(device)

    def loss(pred, target):
        distance = sum(((unit_channels(a) - unit_channels(b)) ** 2).sum(1).mean()
                       for a, b in zip(net.stage_outputs(pred), net.stage_outputs(target)))
        return distance + PIXEL_WEIGHT * ((pred - target) ** 2).mean()

    return loss


# ----------------------------------------------------------------------------------------------
# The picture: teacher and students for the same noise

@torch.no_grad()
def save_comparison(models, path, cfg_scale=sample.PAPER_CFG, per_class=2, seed=0, device="cpu"):
    """One figure, written atomically: a row per model [(name, DiT)], the same noise and labels (per_class of each
    class) in every row, headed by the toy teacher's own images for that noise."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(NUM_CLASSES * per_class, 3, IMG, IMG, generator=g)
    y = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    rows = [("toy teacher", teacher_sample(z, y))]
    rows += [(name, model.sample(z.to(device), y.to(device), cfg_scale).float().cpu()) for name, model in models]
    fig, axes = plt.subplots(len(rows), 1, figsize=(len(y) * 0.42, len(rows) * 0.5 + 0.2), squeeze=False)
    for ax, (name, images) in zip(axes[:, 0], rows):
        ax.imshow(np.concatenate(list(sample.to_uint8(images).numpy()), axis=1), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=0.12, right=0.995, top=0.995, bottom=0.005, hspace=0.06)
    save = dict(dpi=100, format=sample.image_format(path).lower(), bbox_inches="tight", pad_inches=0.03)  # whole labels
    atomic_write(path, lambda tmp: fig.savefig(tmp, **save))
    plt.close(fig)



# ----------------------------------------------------------------------------------------------

def foreign_shapes(n, generator):
    """n images of shapes no class draws (a wide ellipse, a cross of diagonals, a square frame, a half disc, a
    diamond) at the family's sizes and positions, in the family's colours: the toy's "wrong shapes"."""
    yy, xx = np.mgrid[0:IMG, 0:IMG].astype(np.float64) + 0.5
    found = []
    for r in SIZES:
        for dy in range(-JITTER, JITTER + 1):
            for dx in range(-JITTER, JITTER + 1):
                ty, tx = yy - IMG / 2 - dy, xx - IMG / 2 - dx
                ay, ax, box = np.abs(ty), np.abs(tx), r - np.maximum(np.abs(ty), np.abs(tx))
                found += [r / 2 * (1 - np.hypot(ty / (r / 2), tx / r)), np.minimum(box, 1.2 - np.abs(ay - ax)),
                          np.minimum(box, 2.5 - box), np.minimum(r - np.hypot(ty, tx), -ty), r - ay - ax]
    m = torch.from_numpy(np.clip(np.stack(found) + 0.5, 0, 1)).float().view(len(found), 1, -1)
    m = m[torch.randint(0, len(found), (n,), generator=generator)]
    bg, fg = (mean + COLOUR_STD * torch.randn(n, CHANNELS, 1, generator=generator) for mean in COLOUR_MEAN)
    return (bg * (1 - m) + fg * m).view(n, *SHAPE)


def calibration(scorer, train, held, repeats=5):
    """What the toy metrics make of known image sets, each of the held-out pairs' size and labels, against the
    teacher's training images -> [(name, metrics)]. A metric that behaves as FID does on CIFAR-10 ranks the
    teacher's own images best (fresh sets of them give its noise), a mild blur of them far ahead of one mean image
    per class, and images of the wrong shapes worst; the last row says whether that order holds."""
    n, y, teacher = len(held["y"]), held["y"], held["x"]
    g = torch.Generator().manual_seed(0)
    rows = [("the teacher's held-out images", scorer(teacher, y, teacher))]
    fresh = [scorer(s["x"], s["y"]) for s in (make_pairs(n, 10_000 + k, desc=f"fresh set {k + 1}")
                                              for k in range(repeats))]
    fids = np.array([r["toy_fid"] for r in fresh])
    rows.append((f"fresh teacher images, {repeats} sets: mean ({fids.min():.1f}-{fids.max():.1f}, std "
                 f"{fids.std(ddof=1):.1f})", {"toy_fid": fids.mean(),
                                              "toy_acc": np.mean([r["toy_acc"] for r in fresh])}))
    for sigma in (0.5, 1.0):
        rows.append((f"the teacher's images, Gaussian blur sigma {sigma:g} px", scorer(
            soften(teacher, torch.full((n,), sigma)), y, teacher)))
    rows.append(("the teacher's images, 3x3 box blur", scorer(
        F.avg_pool2d(F.pad(teacher, (1, 1, 1, 1), mode="replicate"), 3, stride=1), y, teacher)))
    means = torch.stack([train["x"][train["y"] == c].mean(0) for c in range(NUM_CLASSES)])
    rows.append(("the class-mean image of each label", scorer(means[y], y, teacher)))
    rows.append(("shapes of no class (ellipse, cross, frame, ...)", scorer(foreign_shapes(n, g), y)))
    rows.append(("one class's shape for every label (discs)", scorer(draw(n, g, torch.zeros_like(y))[0], y)))
    rule = (noise_rule_modes(held["z"], y) == modes_of(teacher, y)).float().mean()
    rows.append(("a rule on the noise alone (noise_rule_modes)", {"toy_mode": float(rule)}))
    # where shapes are: the toy FID sees how positions are distributed, not whether each is the teacher's
    rows.append(("  the family at the teacher's images' positions", scorer(at_their_positions(teacher, y), y)))
    centred = draw(n, g, y, torch.full((n,), CENTRE_MODE))[0]
    rows.append(("  the family, every shape large and centred", scorer(centred, y, teacher)))
    fid = {name: r["toy_fid"] for name, r in rows if "toy_fid" in r}
    teacher_fid, blur, means, wrong = (fid[k] for k in ("the teacher's held-out images",
                                                        "the teacher's images, Gaussian blur sigma 0.5 px",
                                                        "the class-mean image of each label",
                                                        "one class's shape for every label (discs)"))
    holds = teacher_fid < blur < means / 2 and means < wrong
    rows.append((f"FID's order, teacher < mild blur << class means < wrong shapes: {'holds' if holds else 'FAILS'}",
                 {}))
    return rows


def main(argv=None):
    """The toy metric's calibration: what the teacher's own images, fresh teacher images (the metric's noise),
    class means and blurred images score against the teacher's training images; then any --ckpt's samples."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--toy-pairs", type=int, default=20000, help="the training pairs that make the reference")
    p.add_argument("--holdout", type=int, default=1000, help="held-out pairs (the images a run's samples match)")
    p.add_argument("--toy-seed", type=int, default=0, help="seed of the teacher's pairs")
    p.add_argument("--repeats", type=int, default=5, help="fresh sets of --holdout teacher images: the metric's noise")
    p.add_argument("--ckpt", nargs="+", default=[], help="toy checkpoints (distill.py, ta.py, mi1.py) whose EMA "
                   "samples for the held-out noise to score beside the calibration")
    p.add_argument("--cfg-scale", type=float, nargs="+", help="guidance scales to score each --ckpt at (default: "
                   "its run's, the paper's 1.5); any number of them costs one conditional and one unconditional pass")
    p.add_argument("--compare", metavar="OUT.png", help="instead of scoring, draw the toy teacher's images above each "
                   "--ckpt's samples for the same noise and labels (at the first --cfg-scale)")
    p.add_argument("--per-class", type=int, default=2, help="--compare: samples of each class per row")
    args = p.parse_args(argv)
    with exit_on_usage_error():
        check_number(args.repeats, "--repeats", low=2, integer=True)
        common.positive_ints(args, "per_class")
        if args.compare:
            if not args.ckpt:
                raise common.UsageError("--compare draws the toy teacher above students: name them with --ckpt.")
            sample.image_format(args.compare, "--compare")
            common.writable_file(args.compare, "--compare")
        for scale in args.cfg_scale or []:
            check_number(scale, "--cfg-scale", low=0)
        device = common.pick_device()
        models = [(path, *sample.load_model(path, device)) for path in args.ckpt]  # bad files stop here, not later
        for path, _, cfg in models:
            if cfg.get("data", "toy") != "toy":
                raise common.UsageError(f"--ckpt {path} learned from other pairs, not the toy teacher's; the toy "
                                        f"metrics score toy checkpoints (fid.py scores the others).")
            for scale in args.cfg_scale or []:
                sample.guidance(cfg, scale)  # an unconditional run refuses guidance
        if args.compare:
            scale = (args.cfg_scale or [sample.guidance(models[0][2])[1]])[0]
            names = ["%s %s seed %s, step %s" % (
                cfg.get("loss", ""), dit.design_name(cfg["depth"], cfg["width"], cfg["heads"], cfg.get("mlp_ratio", 4)),
                cfg.get("seed", "?"), cfg["step"] or "?") for _, _, cfg in models]
            save_comparison([(name, model) for name, (_, model, _) in zip(names, models)], args.compare, scale,
                            args.per_class, device=device)
            print(f"wrote {args.compare}: the toy teacher, then {', '.join(names)}, {args.per_class} per class, "
                  f"CFG {scale:g}")
            return
        train, held = load_pairs(common.CACHE_DIR, args.toy_pairs, args.holdout, args.toy_seed)
    scorer = Scorer(train["x"], common.CACHE_DIR)
    n, y, teacher = args.holdout, held["y"], held["x"]
    rows = calibration(scorer, train, held, args.repeats)
    centre_names = torch.stack([MODE_NAMES[c][CENTRE_MODE] for c in y.tolist()])
    for path, model, cfg in models:
        halves = sample.guidance_halves(model, held["z"], y, device)  # made once for every scale
        run = os.path.basename(os.path.dirname(os.path.abspath(path)))  # the run's folder names it
        for scale in args.cfg_scale or [sample.guidance(cfg)[1]]:
            rows.append((f"{run} (step {cfg['step']}, CFG {scale:g})", scorer(dit.guided(halves, scale), y, teacher)))
        best = scorer.score_model(model, halves, y, teacher, 1.0, device)["cfg_best"]
        samples = dit.guided(halves, best)
        rows.append((f"{run} (step {cfg['step']}, its best CFG {best:g})", scorer(samples, y, teacher)))
        centre = float((modes_of(samples, y) == centre_names).float().mean())
        rows.append((f"  the family at its positions ({centre:.0%} large, centred)",
                     scorer(at_their_positions(samples, y), y)))
    print(f"toy metric ({n:,} images each, labels of the held-out pairs) against {len(train['x']):,} teacher "
          f"training images; teacher's mode: the fraction drawn in the teacher's shape position and size for the "
          f"same noise (chance {mode_chance():.1%}):")
    show = {"toy_fid": "toy FID {:9.2f}", "toy_acc": "class accuracy {:6.1%}", "toy_mode": "teacher's mode {:6.1%}"}
    for name, r in rows:
        print(f"  {name:58s} " + "  ".join(fmt.format(r[k]) if k in r else " " * len(fmt.format(0))
                                           for k, fmt in show.items()))


if __name__ == "__main__":
    main()
