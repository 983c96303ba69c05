"""
Teacher noise-image pairs (z, y, x) for one-step distillation: the student learns x = G(z, y).

    python data.py --data toy            # build (or find) the cached toy teacher pairs, print a summary
    python data.py --data PATH           # check (and convert, once) a folder of GET's EDM CIFAR-10 pairs

Two sources, one interface (`load_pairs` -> train and held-out `Pairs`, each with `.batch(idx)`):

- `toy` (the offline default): a procedurally drawn, CIFAR-shaped 10-class image set and an *exact*
  EDM teacher for it, the closed-form optimal denoiser of the empirical class-conditional distribution
  D(x; sigma, c) = sum_i softmax_i(-|x - x_i|^2 / 2 sigma^2) x_i, driven by EDM's deterministic
  18-step Heun sampler (rho 7, sigma 80 -> 0.002, last step Euler) from x = 80 z. Cached under data/.
- `PATH`: the pairs the GET authors released (EDM-Cond-CIFAR / EDM-Uncond-CIFAR, 1M each):
  PATH/latent/*.pkl and PATH/image/*.pkl, saved with torch.save. Conditional latents are a list
  [z float32 [n,3,32,32], one-hot labels float32 [n,10]], unconditional ones the bare z; images are
  the teacher's raw output on [-1,1]. Converted once into one contiguous array (beside the data, or in the
  cache), so a pair is one read and 1M pairs (24.6 GB) never sit in RAM.
"""
import argparse
import glob
import hashlib
import json
import os
import shutil
import time

import numpy as np
import torch

from common import UsageError, atomic_write, check_number, exit_on_usage_error, writable_dir

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE_DIR = os.environ.get("DIT_NANO_CACHE", os.path.join(HERE, "data"))  # where the toy pairs are cached
NUM_CLASSES = 10
SHAPE = (3, 32, 32)
SIGMA_MIN, SIGMA_MAX, RHO, STEPS = 0.002, 80.0, 7.0, 18  # EDM's sampler for CIFAR-10


class Pairs:
    """In-memory pairs: z [N,3,32,32] unit noise, y [N] int64 labels (10 = none), x [N,3,32,32] images."""
    conditional = True  # the toy teacher is class-conditional; ArrayPairs says per folder

    def __init__(self, z, y, x):
        self.z, self.y, self.x = z, y, x

    def __len__(self):
        return len(self.y)

    def batch(self, idx):
        return self.z[idx], self.y[idx], self.x[idx]


# ----------------------------------------------------------------------------------------------
# The toy teacher

def draw_images(per_class, seed):
    """per_class images of each of 10 procedural classes -> float32 [10*per_class,3,32,32] on [-1,1], labels.
    Classes: disc, square, triangle, ring, plus, horizontal stripes, vertical stripes, diagonal
    stripes, checkerboard, two discs; random colours, gradient backgrounds, sizes and positions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) + 0.5  # pixel centres [32,32]
    images, labels = [], []
    for c in range(NUM_CLASSES):
        for _ in range(per_class):
            fg, bg, bg2 = rng.uniform(-1, 1, size=(3, 3, 1, 1)).astype(np.float32)
            cx, cy = rng.uniform(9, 23, size=2)
            r = rng.uniform(5, 10)
            period, phase = rng.uniform(5, 10), rng.uniform(0, 2 * np.pi)
            dx, dy = np.abs(xx - cx), np.abs(yy - cy)
            dist = np.hypot(xx - cx, yy - cy)
            # signed "inside" amount per class; soft edges (1 pixel) keep the images smooth like photos
            inside = [
                r - dist,                                                  # 0 disc
                r - np.maximum(dx, dy),                                    # 1 square
                np.minimum(yy - (cy - r), r - dx - 0.5 * (cy + r - yy)),   # 2 triangle (apex up)
                r / 3 - np.abs(dist - r * 0.75),                           # 3 ring
                np.maximum(np.minimum(r - dx, r / 3 - dy), np.minimum(r / 3 - dx, r - dy)),  # 4 plus
                2 * np.sin(2 * np.pi * yy / period + phase),               # 5 horizontal stripes
                2 * np.sin(2 * np.pi * xx / period + phase),               # 6 vertical stripes
                2 * np.sin(2 * np.pi * (xx + yy) / (1.4 * period) + phase),  # 7 diagonal stripes
                2 * np.sin(np.pi * xx / period + phase) * np.sin(np.pi * yy / period + phase),  # 8 checks
                np.maximum(r / 2 - np.hypot(xx - cx + r / 1.5, yy - cy), r / 2 - np.hypot(xx - cx - r / 1.5, yy - cy)),
            ][c]
            alpha = np.clip(inside + 0.5, 0, 1)[None]  # [1,32,32]
            ramp = (xx + yy)[None] / 64                # background gradient from bg to bg2
            back = bg * (1 - ramp) + bg2 * ramp
            images.append(alpha * fg + (1 - alpha) * back)
            labels.append(c)
    return torch.from_numpy(np.stack(images)).float(), torch.tensor(labels)


def rho_schedule(t, sigma_min=SIGMA_MIN):
    """EDM's noise levels as a function of t in [0,1]: sigma_min at t = 0, SIGMA_MAX at t = 1, evenly spaced
    in sigma^(1/rho). The sampler walks it from t = 1 down; mi1.py reads it forwards."""
    return (sigma_min ** (1 / RHO) + t * (SIGMA_MAX ** (1 / RHO) - sigma_min ** (1 / RHO))) ** RHO


def edm_sigmas(steps=STEPS):
    """EDM's time steps t_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, i < N, then 0."""
    i = torch.arange(steps, dtype=torch.float64)
    return torch.cat([rho_schedule(1 - i / (steps - 1)), torch.zeros(1, dtype=torch.float64)])


def exact_denoiser(x, sigma, bank):
    """Optimal denoiser of the empirical distribution of `bank` [n,D]: x [b,D] -> E[x0 | x] [b,D].
    Float64, because at sigma = 0.002 the logits -|x-x_i|^2/2sigma^2 are ~1e5 times the distances."""
    d2 = (x * x).sum(1, keepdim=True) - 2 * x @ bank.T + (bank * bank).sum(1)[None]  # [b,n]
    return torch.softmax(-d2 / (2 * sigma ** 2), dim=1) @ bank


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


def teacher_sample(z, y, bank, labels, steps=STEPS):
    """EDM's Heun sampler on the exact class-conditional denoiser: unit noise z [B,3,32,32] and labels
    y [B] -> teacher images [B,3,32,32] (float32)."""
    sigmas = edm_sigmas(steps)
    out = torch.empty(z.shape, dtype=torch.float32)
    for c in y.unique().tolist():
        rows = (y == c).nonzero().squeeze(1)
        images = bank[labels == c].flatten(1).double()  # the class's training images [n,D]
        x = heun_solve(z[rows].flatten(1).double() * sigmas[0], sigmas,  # from x = 80 z
                       lambda x, sigma: exact_denoiser(x, sigma, images))
        out[rows] = x.float().view(-1, *SHAPE)
    return out


def toy_pairs(n, seed, bank, labels, chunk=2000, desc="pairs"):
    """n teacher pairs with uniform labels from a seeded generator -> Pairs."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *SHAPE, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    x = torch.empty_like(z)
    t0 = time.time()
    for i in range(0, n, chunk):
        x[i:i + chunk] = teacher_sample(z[i:i + chunk], y[i:i + chunk], bank, labels)
        done = min(i + chunk, n)
        eta = (time.time() - t0) / done * (n - done)
        print(f"toy teacher: {desc} {done}/{n}, {time.time() - t0:.0f}s, eta {eta:.0f}s", flush=True)
    return Pairs(z, y, x)


def check_toy(n_train, n_heldout, per_class, seed):
    """The toy teacher's sizes and seed, as the flags name them; UsageError if out of range."""
    for value, flag in ((n_train, "--toy-pairs"), (n_heldout, "--holdout"), (per_class, "--toy-per-class")):
        check_number(value, flag, low=1, integer=True)
    check_number(seed, "--toy-seed", low=0, integer=True)


def load_toy(n_train=20000, n_heldout=1000, per_class=100, seed=0, cache_dir=None):
    """Toy teacher pairs, built once and cached; deterministic for (n_train, n_heldout, per_class, seed).
    A cache file that cannot be read (a copy cut short, say) is built again."""
    check_toy(n_train, n_heldout, per_class, seed)
    cache_dir = cache_dir or CACHE_DIR
    key = hashlib.sha1(f"toy-v1 {n_train} {n_heldout} {per_class} {seed}".encode()).hexdigest()[:10]
    path = os.path.join(cache_dir, f"toy_{key}.pt")
    if os.path.exists(path):
        try:
            blob = torch.load(path, weights_only=True)
            return Pairs(**blob["train"]), Pairs(**blob["heldout"])
        except Exception as e:  # our own cache: rebuild it rather than stop
            print(f"toy teacher: the cache {path} cannot be read ({type(e).__name__}); building it again")
    writable_dir(cache_dir, "the toy-pair cache folder (DIT_NANO_CACHE)")  # before minutes of work, not after
    bank, labels = draw_images(per_class, seed)
    train = toy_pairs(n_train, seed + 1, bank, labels, desc="train pairs")
    held = toy_pairs(n_heldout, seed + 2, bank, labels, desc="held-out pairs")
    blob = {"bank": bank, "bank_labels": labels, "train": vars(train), "heldout": vars(held),
            "config": dict(n_train=n_train, n_heldout=n_heldout, per_class=per_class, seed=seed)}
    atomic_write(path, lambda tmp: torch.save(blob, tmp))  # an interrupted build leaves no half file
    print(f"toy teacher: cached {n_train} + {n_heldout} pairs in {path}")
    return train, held


# ----------------------------------------------------------------------------------------------
# GET's EDM CIFAR-10 pairs

def _load_mmap(path):
    """torch.load of one .pkl, memory-mapped (no full read), with weights_only: plain tensors and lists."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # unreadable, truncated, legacy (non-zip) format, or not tensors
        raise UsageError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                         f"Expected a file written by torch.save holding a tensor [n,3,32,32] (or, for "
                         f"conditional latents, a list [z [n,3,32,32], one-hot labels [n,10]]). Re-download "
                         f"the file, or check that PATH points at GET's EDM-Cond-CIFAR/EDM-Uncond-CIFAR folder.")


def _check(t, path, what, shape_tail, dtypes):
    if not torch.is_tensor(t) or tuple(t.shape[1:]) != shape_tail or t.dtype not in dtypes:
        got = f"{t.dtype} {list(t.shape)}" if torch.is_tensor(t) else type(t).__name__
        raise UsageError(f"{path}: expected {what} as a tensor [n,{','.join(map(str, shape_tail))}] of "
                         f"{'/'.join(str(d).replace('torch.', '') for d in dtypes)}, got {got}.")


def get_files(root):
    """GET's folder -> [(latent path, image path)] sorted by name (GET names files by their last seed, zero-padded,
    so this is its order); UsageError for a layout that is not GET's."""
    lat_dir, img_dir = os.path.join(root, "latent"), os.path.join(root, "image")
    for d in (root, lat_dir, img_dir):
        if not os.path.isdir(d):
            raise UsageError(f"{d} is not a folder. --data PATH expects GET's pair layout: PATH/latent/*.pkl "
                             f"and PATH/image/*.pkl (see README, 'Real CIFAR-10 pairs'), or use --data toy.")
    names = sorted(os.path.basename(f) for f in glob.glob(os.path.join(lat_dir, "*.pkl")))
    if not names:
        raise UsageError(f"{lat_dir} holds no *.pkl files; expected GET's latent files (e.g. 000012499.pkl).")
    files = [(os.path.join(lat_dir, name), os.path.join(img_dir, name)) for name in names]
    for _, img_path in files:
        if not os.path.exists(img_path):
            raise UsageError(f"{img_path} is missing: every latent file needs an image file of the same name.")
    return files


def read_get_file(lat_path, img_path):
    """One pair of GET files, memory-mapped and checked -> (z float32 [n,3,32,32], labels int64 [n] or None for
    unconditional pairs, images float32/float64 [n,3,32,32])."""
    lat, img = _load_mmap(lat_path), _load_mmap(img_path)
    if isinstance(lat, (list, tuple)):  # conditional: [z, one-hot labels]
        if len(lat) != 2:
            raise UsageError(f"{lat_path}: a conditional latent file must be a list [z, one-hot labels], got a list "
                             f"of {len(lat)} items.")
        z, onehot = lat
        _check(onehot, lat_path, "one-hot labels", (NUM_CLASSES,), (torch.float32, torch.float64, torch.int64,
                                                                     torch.uint8))
        y = onehot.argmax(1)
    else:
        z, y = lat, None
    _check(z, lat_path, "noise z", SHAPE, (torch.float32,))
    _check(img, img_path, "images", SHAPE, (torch.float32, torch.float64))
    if len(img) != len(z) or (y is not None and len(y) != len(z)):
        raise UsageError(f"{lat_path} and {img_path} hold different numbers of pairs ({len(z)} latents, {len(img)} "
                         f"images).")
    return z, y, img


ROW = 2 * int(np.prod(SHAPE))  # float32 values per pair in pairs.npy: z, then x


def source_of(files):
    """What a conversion was made from: every file's name, size and modification time."""
    return [[os.path.relpath(p, os.path.dirname(os.path.dirname(p))), os.path.getsize(p), os.stat(p).st_mtime_ns]
            for pair in files for p in pair]


def arrays_folder(root):
    """Where GET's pairs are kept converted: PATH/dit-nano-arrays beside them when PATH is writable, else a folder
    of the toy cache named by PATH (data/, or $DIT_NANO_CACHE)."""
    root = os.path.realpath(root)
    if os.access(root, os.W_OK):
        return os.path.join(root, "dit-nano-arrays")
    return os.path.join(CACHE_DIR, "get-arrays-" + hashlib.sha1(root.encode()).hexdigest()[:10])


def convert_get(files, folder):
    """GET's files, one pair of files at a time, into two arrays in `folder`: pairs.npy float32 [N,2,3,32,32] (each
    pair's z and x side by side, so a pair is one contiguous read) and labels.npy int64 [N] (10: the null class of
    unconditional pairs), then source.json. Written in a temp folder renamed when complete, so an interrupted
    conversion leaves nothing half-made. Images are stored as float32, what training reads."""
    counts, conditional = [], None
    for lat_path, img_path in files:  # check every file before writing gigabytes
        z, y, x = read_get_file(lat_path, img_path)
        counts.append(len(z))
        if conditional is None:
            conditional = y is not None
        elif conditional != (y is not None):
            raise UsageError(f"{os.path.dirname(lat_path)} mixes conditional and unconditional latent files.")
    total = sum(counts)
    parent = os.path.dirname(folder)
    writable_dir(parent, "the converted pairs' folder")
    need, free = total * (4 * ROW + 8), shutil.disk_usage(parent).free
    if free < need * 1.02:
        raise UsageError(f"converting {total:,} pairs into contiguous arrays needs {need / 1e9:.1f} GB in {parent}, "
                         f"which has {free / 1e9:.1f} GB free; free some space, or point DIT_NANO_CACHE at a disk with "
                         f"room (used when the data folder is read-only).")
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    labels = np.empty(total, np.int64)
    t0, row = time.time(), 0
    with open(os.path.join(tmp, "pairs.npy"), "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (total, 2, *SHAPE)})
        for k, ((lat_path, img_path), n) in enumerate(zip(files, counts)):
            z, y, x = read_get_file(lat_path, img_path)
            np.stack([z.numpy(), x.numpy().astype(np.float32)], 1).tofile(f)  # one file's pairs in memory at a time
            labels[row:row + n] = y.numpy() if y is not None else NUM_CLASSES
            row += n
            eta = (time.time() - t0) / row * (total - row)
            print(f"converting {os.path.dirname(os.path.dirname(lat_path))}: file {k + 1}/{len(files)}, "
                  f"{row:,}/{total:,} pairs, {time.time() - t0:.0f}s, eta {eta:.0f}s", flush=True)
    np.save(os.path.join(tmp, "labels.npy"), labels)
    with open(os.path.join(tmp, "source.json"), "w") as f:
        json.dump({"pairs": total, "conditional": conditional, "files": source_of(files)}, f)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


class ArrayPairs:
    """GET's pairs converted by convert_get, rows start..stop. A batch reads each pair with one positioned read
    (os.preadv, which releases the GIL) straight into the batch's memory, in file order: no file is mapped, so
    resident memory is the labels (8 bytes a pair) and the batches, whatever the set's size."""

    def __init__(self, folder, start=0, stop=None):
        with open(os.path.join(folder, "source.json")) as f:
            source = json.load(f)
        self.folder, self.conditional, self.source = folder, source["conditional"], source["files"]
        self.labels = torch.from_numpy(np.load(os.path.join(folder, "labels.npy")))
        self.path = os.path.join(folder, "pairs.npy")
        with open(self.path, "rb") as f:
            np.lib.format.read_magic(f)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            self.offset = f.tell()  # where row 0 starts
        expected = (source["pairs"], 2, *SHAPE)
        if (shape, fortran, dtype) != (expected, False, np.float32) or self.labels.shape != (source["pairs"],) or \
                os.path.getsize(self.path) != self.offset + 4 * ROW * source["pairs"]:
            raise ValueError(f"{self.path} is {dtype} {shape} of {os.path.getsize(self.path)} bytes and labels.npy "
                             f"{tuple(self.labels.shape)}, not float32 {expected} and ({source['pairs']},)")
        self.fd = os.open(self.path, os.O_RDONLY)
        self.start, self.stop = start, source["pairs"] if stop is None else stop

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)

    def __len__(self):
        return self.stop - self.start

    def batch(self, idx):
        """idx [B] -> (z [B,3,32,32], y [B], x [B,3,32,32]), in idx's order."""
        idx = torch.as_tensor(idx, dtype=torch.long) + self.start
        where = self.offset + 4 * ROW * idx.numpy()  # each pair's byte offset
        out = np.empty((len(idx), 2, *SHAPE), np.float32)
        rows = out.reshape(len(idx), -1)
        order = np.argsort(where, kind="stable")  # ascending offsets: the disk's and the cache's order
        if hasattr(os, "posix_fadvise"):  # ask for every pair at once: a disk serves them in parallel (4x when cold)
            for i in order:
                os.posix_fadvise(self.fd, int(where[i]), 4 * ROW, os.POSIX_FADV_WILLNEED)
        for i in order:
            if os.preadv(self.fd, [rows[i]], int(where[i])) != 4 * ROW:
                raise OSError(f"{self.path} ended early: convert the folder again (delete {self.folder})")
        pairs = torch.from_numpy(out)
        return pairs[:, 0], self.labels[idx], pairs[:, 1]

    def split(self, heldout):
        """The last `heldout` pairs for measurement, the rest for training."""
        if not 0 < heldout < len(self):
            raise UsageError(f"--holdout {heldout} must be between 1 and one less than the {len(self)} pairs found.")
        n = self.stop - heldout
        return ArrayPairs(self.folder, self.start, n), ArrayPairs(self.folder, n, self.stop)


def load_get(root):
    """GET's folder as ArrayPairs: converted once into contiguous arrays (arrays_folder), reused while the
    source files are unchanged (same names, sizes, modification times), converted again when they change."""
    files = get_files(root)
    folder = arrays_folder(root)
    try:
        pairs = ArrayPairs(folder)
        if pairs.source == source_of(files):
            return pairs
        why = "the source files changed since they were converted"
    except FileNotFoundError:
        why = "once; a batch is then one gather instead of a visit to every file"
    except (OSError, ValueError, KeyError, TypeError) as e:  # our own conversion, cut short or damaged: redo it
        why = f"the earlier conversion cannot be read: {type(e).__name__}: {e}"
    print(f"{root}: converting GET's pairs into contiguous arrays in {folder} ({why})", flush=True)
    convert_get(files, folder)
    return ArrayPairs(folder)


def write_synthetic_get(root, n_files=2, per_file=5, conditional=True, image_dtype=torch.float32, seed=0):
    """A folder in GET's exact layout with random pairs (tests, and timing the loader at GET's scale without the
    download): root/latent/NNNNNNNNN.pkl and root/image/NNNNNNNNN.pkl, named like GET's by the last seed,
    latents [z, one-hot labels] (conditional) or z, images tanh(z) in image_dtype. Returns root."""
    for sub in ("latent", "image"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for f in range(n_files):
        z = torch.randn(per_file, *SHAPE, generator=g)
        labels = torch.randint(0, NUM_CLASSES, (per_file,), generator=g)
        latent = [z, torch.nn.functional.one_hot(labels, NUM_CLASSES).float()] if conditional else z
        name = f"{(f + 1) * per_file - 1:09d}.pkl"
        torch.save(latent, os.path.join(root, "latent", name))
        torch.save(torch.tanh(z).to(image_dtype), os.path.join(root, "image", name))
    return root


def add_flags(parser):
    """The data flags, shared by data.py and distill.py (so ta.py and mi1.py): a group on parser."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default="toy", help="'toy' (built-in exact EDM teacher) or a folder of GET's pairs")
    g.add_argument("--holdout", type=int, default=1000, help="held-out pairs for measurement (never trained on)")
    g.add_argument("--toy-pairs", type=int, default=20000, help="toy: training pairs the teacher makes")
    g.add_argument("--toy-per-class", type=int, default=100, help="toy: training images per class")
    g.add_argument("--toy-seed", type=int, default=0, help="toy: seed of the teacher's images and pairs (apart "
                   "from distill.py's --seed, so that seed repeats vary the training, not the task)")
    return g


def toy_options(args):
    """The toy flags as load_toy's keywords; {} for real data, which ignores them."""
    return dict(n_train=args.toy_pairs, per_class=args.toy_per_class, seed=args.toy_seed) if args.data == "toy" else {}


def load_pairs(spec, heldout=1000, **toy_kwargs):
    """'toy' or a GET folder -> (train Pairs, held-out Pairs)."""
    if spec == "toy":
        return load_toy(n_heldout=heldout, **toy_kwargs)
    return load_get(os.path.expanduser(spec)).split(heldout)


def class_means(pairs, max_pairs=20000):
    """Mean teacher image per class [11,3,32,32] (row 10: all classes): the baseline a student must beat."""
    z, y, x = pairs.batch(torch.arange(min(len(pairs), max_pairs)))
    means = torch.stack([x[y == c].mean(0) if (y == c).any() else x.mean(0) for c in range(NUM_CLASSES)])
    return torch.cat([means, x.mean(0, keepdim=True)])


def psnr(mse):
    """PSNR in dB of images on [-1,1] (peak-to-peak 2): 10 log10(4 / MSE)."""
    return 10 * np.log10(4 / max(float(mse), 1e-12))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    add_flags(p)
    args = p.parse_args(argv)
    with exit_on_usage_error():
        train, held = load_pairs(args.data, args.holdout, **toy_options(args))
    means = class_means(train)
    _, y, x = held.batch(torch.arange(len(held)))
    mse = ((means[y] - x) ** 2).mean()
    print(f"{args.data}: {len(train)} training pairs, {len(held)} held-out; x range [{x.min():.2f}, {x.max():.2f}]; "
          f"class-mean baseline on held-out: L2 {mse:.4f}, PSNR {psnr(mse):.2f} dB")


if __name__ == "__main__":
    main()
