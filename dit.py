"""
DiT-Nano: a tiny one-step, class-conditional Diffusion Transformer (Peebles & Xie's DiT module list,
plain PyTorch), its exact parameter and FLOP counts, and the paper's design rules (section 3.2).

    python dit.py --params 5M         # print the design the rules give for a budget
    python dit.py --d 5 --w 64 --h 8  # print parameters and GFLOP/image of a design
    python dit.py --d 5 --w 64 --h 8,8,4,4,2 --mlp-ratio 2   # heads per block; a narrower MLP (paper: 4)

    from dit import DiT, design
    model = DiT(*design("0.42M"))              # (5, 64, 8): 421,068 parameters
    x = model(z, y)                            # one pass: noise [B,3,32,32], labels [B] -> image
    x = model.sample(z, y, cfg_scale=1.5)      # classifier-free guidance, one fused batch
    x, hidden = model(z, y, return_hidden=True)  # hidden[l]: tokens after block l+1, [B,256,w]
    x_l = model.decode(hidden[2], y)           # any hidden state -> image via the final layer
"""
import argparse
import math
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UsageError, exit_on_usage_error

IMG, PATCH, CHANNELS, NUM_CLASSES = 32, 2, 3, 10
TOKENS = (IMG // PATCH) ** 2  # T = 256 tokens of 2x2x3 pixels
FREQ_DIM = 256                 # timestep frequency features, as in DiT
STUDENT_T = 0.0                # the one-step student's constant timestep input (kept for DiT's module list)
CPU_HEAD_WIDTH = 16            # heads narrower than this are zero-padded to it on the CPU (Attention.forward)


# ----------------------------------------------------------------------------------------------
# Counting and design rules (DESIGN.md, "The model and its counts" and "Design rules")

def mlp_width(w, mlp_ratio=4):
    """The MLP's hidden width m = int(r w) (DiT's rule; the paper's r = 4)."""
    return int(mlp_ratio * w)


def param_count(d, w, mlp_ratio=4):
    """All nn.Parameters, pos_embed included: P(d,w) = d(10w^2 + 2wm + m + 11w) + 3w^2 + 296w + 12 + 256w,
    m = mlp_width(w, r); with the paper's r = 4, d(18w^2 + 15w) + .... Heads change no count."""
    m = mlp_width(w, mlp_ratio)
    return d * (10 * w * w + 2 * w * m + m + 11 * w) + 3 * w * w + 296 * w + 12 + 256 * w


def flops_per_image(d, w, cfg=False, mlp_ratio=4):
    """Forward FLOPs (2 per multiply-add) of one image, matmuls only:
    2[d(4Tw^2 + 2Twm + 2T^2 w + 6w^2) + 24Tw + 3w^2 + 256w] (r = 4: 12Tw^2 in the blocks); CFG runs two passes."""
    T, m = TOKENS, mlp_width(w, mlp_ratio)
    macs = d * (4 * T * w * w + 2 * T * w * m + 2 * T * T * w + 6 * w * w) + 24 * T * w + 3 * w * w + FREQ_DIM * w
    return 2 * macs * (2 if cfg else 1)


def rule_heads(w):
    """h = min(median(factors(w))): the lower middle factor when the count is even."""
    factors = [f for f in range(1, w + 1) if w % f == 0]
    return factors[(len(factors) - 1) // 2]


def parse_params(text):
    """'5M' -> 5_000_000, '0.42M' -> 420_000, '500k' -> 500_000, '421068' -> 421068."""
    t = str(text).strip().lower().replace(",", "").replace("_", "")
    scale = {"k": 1e3, "m": 1e6}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale != 1 else t) * scale
    except ValueError:
        raise UsageError(f"cannot read the parameter budget {text!r}: write it like 0.42M, 2.2M, 5M, 500k or 421068.")
    if not 0 < value < math.inf:
        raise UsageError(f"the parameter budget {text!r} must be a positive, finite number, like 0.42M.")
    return int(round(value))


RULE_WIDTHS = sorted({2 ** n for n in range(2, 13)} | {3 * 2 ** n for n in range(2, 12)})  # 4, 8, 12, 16, 24, ...


def rule_depths(w):
    """The depths the rules allow a width: floor(log2 w), else one less."""
    return [d for d in (int(math.log2(w)), int(math.log2(w)) - 1) if d >= 1]


def design(params, tolerance=0.01, mlp_ratio=4):
    """The paper's three principles for a parameter budget -> (depth, width, heads).
    Widths 2^n or 3*2^n; depth floor(log2 w), else one less; take the widest width whose rule depth
    fits the budget within `tolerance` (the paper's "0.42M" model has 421,068 parameters). Another MLP
    ratio changes the counts, so the same budget may buy another design (0.42M at ratio 2: (6, 64, 8))."""
    budget = parse_params(params)
    for w in reversed(RULE_WIDTHS):
        for d in rule_depths(w):
            if param_count(d, w, mlp_ratio) <= budget * (1 + tolerance):
                return d, w, rule_heads(w)
    raise UsageError(f"no design fits a budget of {budget:,} parameters; the smallest, (1, 4, 2), needs "
                     f"{param_count(1, 4):,}")


def heads_per_block(heads, depth):
    """--h as given (one count for every block, or one per block) -> a tuple of depth head counts."""
    return tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * depth


def parse_heads(text):
    """'8' -> 8; '8,8,4,4,2' -> [8, 8, 4, 4, 2] (one per block)."""
    try:
        counts = [int(v) for v in str(text).split(",")]
    except ValueError:  # argparse prints it as the flag's error, exit code 2
        raise argparse.ArgumentTypeError(f"{text!r}: write one head count (--h 8) or one per block (--h 8,8,4,4,2)")
    return counts[0] if len(counts) == 1 else counts


def check_shape(depth, width, heads, mlp_ratio=4):
    """A clear error (UsageError, a ValueError) for a design the model cannot build, instead of a shape crash
    deep in forward."""
    problems = []
    if isinstance(heads, (list, tuple)) and len(heads) != depth:
        raise UsageError(f"--h {','.join(map(str, heads))} names {len(heads)} head counts for {depth} blocks: give "
                         f"one per block, or one for all.")
    if not 1 <= depth <= 256:
        problems.append(f"depth {depth} is outside 1..256")
    if not 4 <= width <= 8192 or width % 4:
        problems.append(f"width {width} must be a multiple of 4 in 4..8192 (the 2-D sin-cos position "
                        f"embedding splits it in four)")
    for h in sorted(set(heads_per_block(heads, max(depth, 1)))):
        if h < 1 or width % h:
            problems.append(f"width {width} is not divisible by heads {h}; heads must divide the width, "
                            f"e.g. --h {rule_heads(width) if width >= 1 else 1} (the design rule's choice)")
    if not (mlp_ratio > 0 and mlp_width(width, mlp_ratio) >= 1):
        problems.append(f"--mlp-ratio {mlp_ratio} gives no MLP width: it must be positive (the paper's is 4)")
    if problems:
        raise UsageError(f"cannot build DiT(depth={depth}, width={width}, heads={heads}, mlp_ratio={mlp_ratio:g}): "
                         f"{'; '.join(problems)}.")


# ----------------------------------------------------------------------------------------------
# The model (DiT, Peebles & Xie 2023), in the order of its module list

def modulate(x, shift, scale):
    # adaLN: x [B,T,w], shift/scale [B,w] from the conditioning vector
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_2d(width, grid):
    """Fixed 2-D sin-cos position embedding [grid*grid, width]: half the channels encode the column,
    half the row, each as [sin, cos] of geometric frequencies (MAE/DiT's formula)."""
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4))  # [w/4]
    col, row = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))  # [grid,grid]

    def embed_1d(pos):
        out = np.outer(pos.reshape(-1), omega)  # [grid*grid, w/4]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # DiT's order: the first half of the channels encodes the column index, the second the row index
    return np.concatenate([embed_1d(col), embed_1d(row)], axis=1).astype(np.float32)


class TimestepEmbedder(nn.Module):
    """Scalar t -> 256 sinusoidal frequencies -> MLP -> [B,w]. Constant for the one-step student."""

    def __init__(self, width):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        half = FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, C = x.shape
        e = C // self.heads  # head width
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, e).permute(2, 0, 3, 1, 4)  # 3x[B,h,T,e]
        if x.device.type == "cpu" and e < CPU_HEAD_WIDTH and not torch.onnx.is_in_onnx_export():
            # PyTorch's fused CPU kernel runs narrow heads slowly (e = 8, the 0.42M design's: 1.5x the time of
            # e = 16 for training, on AVX-512 and AVX2 alike). Zero columns change no score q.k and give zero
            # output columns, which are dropped: the same attention (softmax scale of e, not of the padded
            # width), and the (5,64,8) training step ~25% faster.
            q, k, v = (F.pad(t, (0, CPU_HEAD_WIDTH - e)) for t in (q, k, v))
            x = F.scaled_dot_product_attention(q, k, v, scale=e ** -0.5)[..., :e]
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # [B,h,T,e], the fused kernel where available
        return self.proj(x.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: the class vector c sets shift/scale/gate of both
    sub-layers; gates start at zero so every block starts as the identity."""

    def __init__(self, width, heads, mlp_hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)  # 6x[B,w]
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, PATCH * PATCH * CHANNELS)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # [B,T,2*2*3]


class DiT(nn.Module):
    """heads: one count for every block, or a list of one per block; mlp_ratio: the MLP's hidden width over w."""

    def __init__(self, depth=5, width=64, heads=8, mlp_ratio=4, num_classes=NUM_CLASSES):
        super().__init__()
        check_shape(depth, width, heads, mlp_ratio)
        self.depth, self.width, self.num_classes = depth, width, num_classes
        self.heads = list(heads) if isinstance(heads, (list, tuple)) else heads  # as given: int, or per block
        self.mlp_ratio = mlp_ratio
        self.x_embedder = nn.Conv2d(CHANNELS, width, kernel_size=PATCH, stride=PATCH)  # "PatchEmbed"
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = nn.Embedding(num_classes + 1, width)  # last row: the CFG null class
        self.pos_embed = nn.Parameter(torch.zeros(1, TOKENS, width), requires_grad=False)
        self.blocks = nn.ModuleList([Block(width, h, mlp_width(width, mlp_ratio))
                                     for h in heads_per_block(heads, depth)])
        self.final_layer = FinalLayer(width)
        self.register_buffer("t", torch.tensor([STUDENT_T]), persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        # DiT's scheme: xavier-uniform linears with zero bias; N(0, 0.02) label and timestep embeddings;
        # zero adaLN modulations and output layer (adaLN-Zero), so the untrained model outputs zeros.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_2d(self.width, IMG // PATCH)).unsqueeze(0))
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                         self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition(self, y):
        """Class labels [B] (num_classes = null) -> conditioning vector c [B,w] = t_emb + y_emb."""
        return self.t_embedder(self.t.expand(y.shape[0])) + self.y_embedder(y)

    def head(self, x, c):
        """Tokens [B,T,w] and conditioning c [B,w] -> image [B,3,32,32]: final layer, then unpatchify."""
        x = self.final_layer(x, c)  # [B,T,p*p*3]
        g = IMG // PATCH
        x = x.view(-1, g, g, PATCH, PATCH, CHANNELS)  # [B,gh,gw,p,p,3]
        return torch.einsum("nhwpqc->nchpwq", x).reshape(-1, CHANNELS, IMG, IMG)

    def decode(self, x, y):
        """Any hidden state [B,T,w] -> image, through this model's own final layer (adaLN on class y)."""
        return self.head(x, self.condition(y))

    def forward(self, z, y, return_hidden=False):
        """Noise z [B,3,32,32], labels y [B] -> image [B,3,32,32] in one pass.
        With return_hidden, also the list of hidden states after each block (d x [B,T,w])."""
        c = self.condition(y)  # [B,w]
        x = self.x_embedder(z).flatten(2).transpose(1, 2) + self.pos_embed  # [B,T,w]
        hidden = []
        for block in self.blocks:
            x = block(x, c)
            hidden.append(x)
        image = self.head(x, c)
        return (image, hidden) if return_hidden else image

    @torch.no_grad()
    def guidance_halves(self, z, y):
        """The conditional and unconditional (null-class) predictions (x_c, x_u) for z, y, in one fused batch
        of 2B: every guidance scale s combines them as x_u + s (x_c - x_u)."""
        null = torch.full_like(y, self.num_classes)
        return self(torch.cat([z, z]), torch.cat([y, null])).chunk(2)

    @torch.no_grad()
    def sample(self, z, y, cfg_scale=1.5):
        """Classifier-free guidance: x = x_u + s (x_c - x_u), both halves in one fused batch;
        s = 1 is a single conditional pass."""
        if cfg_scale == 1:
            return self(z, y)
        return guided(self.guidance_halves(z, y), cfg_scale)


def guided(halves, cfg_scale):
    """Classifier-free guidance from the halves (x_c, x_u) of DiT.guidance_halves: x_u + s (x_c - x_u)."""
    cond, uncond = halves
    return uncond + cfg_scale * (cond - uncond)


# ----------------------------------------------------------------------------------------------

def design_parser(doc, title="model"):
    """An argparse parser with --help and the design flags --d/--w/--h or --params, the one way every
    script names a design (no -h for help: --h is the heads). -> (parser, the flags' group)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False, add_help=False)
    parser.add_argument("--help", action="help", help="show this help and exit")
    g = parser.add_argument_group(title)
    g.add_argument("--d", "--depth", dest="depth", type=int, help="DiT blocks")
    g.add_argument("--w", "--width", dest="width", type=int, help="embedding width")
    g.add_argument("--h", "--heads", dest="heads", type=parse_heads, help="attention heads, one count or one per "
                   "block (8,8,4,4,2); default: the design rule's")
    g.add_argument("--params", help="parameter budget (0.42M, 2.2M, 5M): (d,w,h) by the paper's rules")
    return parser, g


def resolve_design(args, default=None):
    """The flags of design_parser -> a checked (d, w, h); `default` (d, w, h) when none is given.
    Raises UsageError."""
    if args.params is not None and (args.depth, args.width, args.heads) != (None, None, None):
        raise UsageError("give --params BUDGET or --d/--w/--h, not both.")
    if args.params is not None:
        d, w, h = design(args.params, mlp_ratio=getattr(args, "mlp_ratio", 4))
    elif args.depth is None and args.width is None:
        if default is None:
            raise UsageError("give --params BUDGET, or --d DEPTH --w WIDTH [--h HEADS].")
        d, w, h = default[0], default[1], args.heads if args.heads is not None else default[2]
    elif args.depth is None or args.width is None:
        raise UsageError("give both --d and --w (or --params BUDGET).")
    else:
        d, w = args.depth, args.width
        h = args.heads if args.heads is not None else rule_heads(w) if w >= 1 else 1
    check_shape(d, w, h, getattr(args, "mlp_ratio", 4))  # the scripts with --mlp-ratio check it here too
    return d, w, h


def add_mlp_ratio_flag(group):
    group.add_argument("--mlp-ratio", type=float, default=4.0, help="MLP hidden width over the model width (paper: 4)")


def design_name(d, w, h, mlp_ratio=4):
    """A design's short name, as in run folders: d5w64h8, d5w64h8-8-4-4-2, d5w64h8r2."""
    heads = "-".join(map(str, h)) if isinstance(h, (list, tuple)) else str(h)
    return f"d{d}w{w}h{heads}" + (f"r{mlp_ratio:g}" if mlp_ratio != 4 else "")


def parse_design_name(text):
    """A design written as design_name writes it, or as D,W,H -> (d, w, h, mlp_ratio), checked:
    'd5w64h8-8-4-4-2' -> (5, 64, [8, 8, 4, 4, 2], 4); 'd6w64h8r2' -> (6, 64, 8, 2.0); '5,64,8' -> (5, 64, 8, 4)."""
    m = re.fullmatch(r"d(\d+)w(\d+)h(\d+(?:-\d+)*)(?:r(\d*\.?\d+))?|(\d+),(\d+),(\d+)", text.strip())
    if not m:
        raise UsageError(f"cannot read the design {text!r}: write D,W,H (5,64,8) or a run folder's name: d5w64h8, "
                         f"d5w64h8-8-4-4-2 (heads per block), d6w64h8r2 (MLP ratio 2).")
    if m.group(5):
        d, w, h, r = int(m.group(5)), int(m.group(6)), int(m.group(7)), 4
    else:
        d, w, r = int(m.group(1)), int(m.group(2)), float(m.group(4)) if m.group(4) else 4
        h = parse_heads(m.group(3).replace("-", ","))
    check_shape(d, w, h, r)
    return d, w, h, r


def main(argv=None):
    parser, group = design_parser(__doc__)
    add_mlp_ratio_flag(group)
    with exit_on_usage_error():
        args = parser.parse_args(argv)
        d, w, h = resolve_design(args)
    r = args.mlp_ratio
    print(f"DiT(d={d}, w={w}, h={h}{f', mlp_ratio={r:g}' if r != 4 else ''}): {param_count(d, w, r):,} parameters, "
          f"{flops_per_image(d, w, mlp_ratio=r) / 1e9:.3f} GFLOP/image (x2 with CFG)")


if __name__ == "__main__":
    main()
