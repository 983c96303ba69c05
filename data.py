"""
Teacher noise-image pairs (z, y, x) for one-step distillation: the student learns x = G(z, y).

    python data.py --data toy            # build (or find) the cached toy teacher pairs, print a summary
    python data.py --data PATH           # check (and convert, once) a folder of GET's EDM CIFAR-10 pairs

Two sources, one interface (`load_pairs` -> train and held-out `Pairs`, each with `.batch(idx)`):

- `toy` (the offline default): toy.py's exact EDM teacher of a CIFAR-shaped family of shapes, its pairs
  made once and cached under data/ (or $DIT_NANO_CACHE).
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

import common
import sample
import toy
from common import UsageError, exit_on_usage_error, writable_dir

NUM_CLASSES, SHAPE = toy.NUM_CLASSES, toy.SHAPE  # CIFAR-10's: 10 classes of 3x32x32 images


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
    return os.path.join(common.CACHE_DIR, "get-arrays-" + hashlib.sha1(root.encode()).hexdigest()[:10])


def convert_get(files, folder):
    """GET's files, one pair of files at a time, into two arrays in `folder`: pairs.npy float32 [N,2,3,32,32] (each
    pair's z and x side by side, so a pair is one contiguous read) and labels.npy int64 [N] (10: the null class of
    unconditional pairs), then source.json. Written in a temp folder renamed when complete (common.atomic_write),
    so an interrupted conversion leaves nothing half-made. Images are stored as float32, what training reads."""
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

    def write_arrays(tmp):
        os.makedirs(tmp)
        labels = np.empty(total, np.int64)
        t0, row = time.time(), 0
        with open(os.path.join(tmp, "pairs.npy"), "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                     "shape": (total, 2, *SHAPE)})
            for k, ((lat_path, img_path), n) in enumerate(zip(files, counts)):
                z, y, x = read_get_file(lat_path, img_path)
                np.stack([z.numpy(), x.numpy().astype(np.float32)], 1).tofile(f)  # one file's pairs at a time
                labels[row:row + n] = y.numpy() if y is not None else NUM_CLASSES
                row += n
                eta = (time.time() - t0) / row * (total - row)
                print(f"converting {os.path.dirname(os.path.dirname(lat_path))}: file {k + 1}/{len(files)}, "
                      f"{row:,}/{total:,} pairs, {time.time() - t0:.0f}s, eta {eta:.0f}s", flush=True)
        np.save(os.path.join(tmp, "labels.npy"), labels)
        with open(os.path.join(tmp, "source.json"), "w") as f:
            json.dump({"pairs": total, "conditional": conditional, "files": source_of(files)}, f)
    common.atomic_write(folder, write_arrays)


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
    g.add_argument("--toy-seed", type=int, default=0, help="toy: seed of the teacher's noise and labels (apart "
                   "from distill.py's --seed, so that seed repeats vary the training, not the task)")
    return g


def toy_options(args):
    """The toy flags as load_pairs' keywords; {} for real data, which ignores them."""
    return dict(n_train=args.toy_pairs, seed=args.toy_seed) if args.data == "toy" else {}


def load_pairs(spec, heldout=1000, **toy_kwargs):
    """'toy' or a GET folder -> (train pairs, held-out pairs): Pairs in memory, or ArrayPairs on disk."""
    if spec == "toy":
        train, held = toy.load_pairs(common.CACHE_DIR, n_heldout=heldout, **toy_kwargs)
        return Pairs(**train), Pairs(**held)
    return load_get(os.path.expanduser(spec)).split(heldout)


def load_for_training(args, master, world):
    """distill.py's pairs -> (train, held-out); sets args.conditional and the guidance scale. Rank 0 first builds
    the toy caches (the pairs, and the toy metric's and toy LPIPS's networks on first use) or converts GET's pairs;
    the other ranks then read them."""
    pairs = None
    if master:
        pairs = load_pairs(args.data, args.holdout, **toy_options(args))
        if args.data == "toy":
            toy.trained_nets(["metric", "classifier"] + ["perceptual"] * (args.loss == "toy-lpips"), common.CACHE_DIR)
    if world > 1:
        torch.distributed.barrier()
        pairs = pairs or load_pairs(args.data, args.holdout, **toy_options(args))
    train_set, held = pairs
    # unconditional pairs train the null class only: such a model is sampled with it, without guidance
    args.conditional = bool(getattr(train_set, "conditional", True))
    _, args.cfg_scale = sample.guidance(vars(args), args.cfg_scale)
    if len(train_set) < args.batch:
        raise UsageError(f"--batch {args.batch} is larger than the {len(train_set)} training pairs.")
    return train_set, held


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
