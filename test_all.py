"""
DiT-Nano's test suite: CPU only, no downloads, a few minutes.

    python -m pytest test_all.py

pytorch-fid is a test-only dependency: an independent FID Inception to check fid.py's against.
"""
import contextlib
import glob
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from pytorch_fid import inception as pytorch_fid_inception
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import assignments
import bench
import common
import data
import dit
import pick
import distill
import fid
import measure
import mi1
import sample
import study
import ta
import toy

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--d", "2", "--w", "32", "--h", "4"]  # 32k-parameter student for fast loops
REAL_SCALES = toy.SCALES  # read before the cache fixture shortens it to TEST_SCALES
TEST_SCALES = (1.0, 1.2, 1.5, 2.0)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A private toy-pair cache: tests never touch data/ and share one small teacher run. Restored after."""
    d = str(tmp_path_factory.mktemp("toy_cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "CACHE_DIR", d)
        mp.setenv("DIT_NANO_CACHE", d)  # for subprocesses; they and the tests score with the shipped toy networks
        mp.setattr(toy, "SCALES", TEST_SCALES)  # the protocol's grid of guidance scales, shortened
        yield d


def toy_flags(cache):
    return ["--data", "toy", "--toy-pairs", "256", "--holdout", "32"]


def run_script(*argv, env=None, **kw):
    """Run one of the repo's scripts in a fresh interpreter; returns CompletedProcess (text)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, *argv], cwd=HERE, capture_output=True, text=True, env=full_env,
                          timeout=300, **kw)


def assert_clean_error(result, *phrases):
    """Exit code 2, one message naming the problem, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert "weights_only" not in result.stderr, result.stderr  # never advise unpickling a file one was handed
    for phrase in phrases:
        assert phrase in result.stderr, (phrase, result.stderr)


# ----------------------------------------------------------------------------------------------
# Files several sections share: a random-weight FID Inception, a fake CIFAR-10 tarball, a tiny checkpoint

def random_inception_state(seed=0):
    """Random weights with pytorch-fid's key names that keep activations O(1): He-scaled convs, BN statistics
    near (0, 1), so the comparisons below see well-conditioned numbers."""
    g = torch.Generator().manual_seed(seed)
    state = fid.FIDInception().state_dict()
    for k, v in state.items():
        if k.endswith("conv.weight"):
            state[k] = torch.randn(v.shape, generator=g) * math.sqrt(2 / v[0].numel())
        elif k.endswith(("bn.weight", "bn.running_var")):
            state[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith(("bn.bias", "bn.running_mean")):
            state[k] = 0.2 * torch.randn(v.shape, generator=g)
        elif k == "fc.weight":
            state[k] = torch.randn(v.shape, generator=g) / math.sqrt(v.shape[1])
        elif k == "fc.bias":
            state[k] = torch.randn(v.shape, generator=g)
    return state


def write_fake_cifar(path, per_train_batch=2, test=10, seed=0):
    """A tarball in the real one's layout: cifar-10-batches-py/{data_batch_1..5,test_batch}, pickled dicts with
    b'data' uint8 [n,3072] (the R, G, B planes of 32x32 images) and b'labels'. Returns the train images
    [10,32,32,3] as an image viewer would show them."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(os.path.dirname(path), "cifar-10-batches-py")
    os.makedirs(folder)
    train = []
    for name, n in [(f"data_batch_{i}", per_train_batch) for i in range(1, 6)] + [("test_batch", test)]:
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        train += [rows.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)] if name != "test_batch" else []
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"data": rows, b"labels": list(range(n))}, f)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return np.concatenate(train)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Files every end-to-end test shares: Inception weights, fake CIFAR-10, a checkpoint and its .npz, and a
    folder for the reference statistics (fid_cache points common.CACHE_DIR there, one test at a time)."""
    d = tmp_path_factory.mktemp("fid")
    state = random_inception_state(seed=4)
    # switch off all but 8 of Mixed_7c's 2048 output channels (a very negative BN bias before the ReLU): the
    # statistics of 10 images are then full-rank in the 8 live dimensions, so sqrtm's result stays real
    for k in [k for k in state if k.startswith("Mixed_7c.") and k.endswith("bn.bias")]:
        live = 8 if k.startswith("Mixed_7c.branch1x1.") else 0
        state[k][live:] = -1e4
    torch.save(state, d / "inception.pth")
    torch.manual_seed(0)
    ema, raw = dit.DiT(1, 32, 4), dit.DiT(1, 32, 4)
    with torch.no_grad():  # DiT's zero-init would make every image the same grey; EMA and raw weights differ
        for e, r in zip(ema.parameters(), raw.parameters()):
            e.add_(0.05 * torch.randn_like(e))
            r.add_(0.05 * torch.randn_like(r))
    ckpt = {"model": raw.state_dict(), "ema": ema.state_dict(), "config": {"depth": 1, "width": 32, "heads": 4}}
    (d / "run").mkdir()
    torch.save(ckpt, d / "run" / "ckpt.pt")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        sample.main(["--ckpt", str(d / "run" / "ckpt.pt"), "--npz", str(d / "samples.npz"), "--n", "10",
                     "--batch", "5", "--device", "cpu"])
    cifar_train = write_fake_cifar(str(d / "cifar.tar.gz"))
    return {"dir": d, "cache": str(d / "cache"), "weights": str(d / "inception.pth"), "cifar": str(d / "cifar.tar.gz"),
            "cifar_train": cifar_train, "ckpt": str(d / "run" / "ckpt.pt"), "npz": str(d / "samples.npz")}


@pytest.fixture
def fid_cache(world, monkeypatch):
    """The world, with FID's reference statistics cached in its own folder for this test (restored after)."""
    monkeypatch.setattr(common, "CACHE_DIR", world["cache"])
    return world


def run_fid(world, *argv):
    return fid.main([*argv, "--inception", world["weights"], "--cifar", world["cifar"], "--batch", "5",
                     "--device", "cpu"])



# ----------------------------------------------------------------------------------------------
# dit.py

@pytest.mark.parametrize("d,w,h,expected", [(5, 64, 8, 421_068), (7, 128, 8, 2_197_644), (7, 192, 12, 4_881_612),
                                            (1, 128, 8, None), (21, 32, 4, None), (3, 12, 3, None)])
def test_dit_parameter_count_matches_formula(d, w, h, expected):
    counted = sum(p.numel() for p in dit.DiT(d, w, h).parameters())
    assert counted == dit.param_count(d, w)
    if expected:
        assert counted == expected


def test_dit_design_rules_give_papers_rows():
    assert dit.design("0.42M") == (5, 64, 8)
    assert dit.design("2.2M") == (7, 128, 8)
    assert dit.design("5M") == (7, 192, 12)
    # heads rule against the paper's tables: 48 -> 6, 32 -> 4, 96 -> 8, 256 -> 16, 192 -> 12
    assert [dit.rule_heads(w) for w in (48, 32, 96, 256, 192, 64, 128)] == [6, 4, 8, 16, 12, 8, 8]
    assert dit.parse_params("500k") == 500_000 and dit.parse_params("421,068") == 421_068
    with pytest.raises(ValueError, match="cannot read"):
        dit.parse_params("five million")


def counted_flops(fn):
    """FLOPs torch's FlopCounterMode sees in fn(), with attention forced onto SDPA's math backend: its two matmuls
    are then plain bmm calls that every torch version counts (a fused CPU attention kernel is counted by some
    versions and not by others, e.g. not by 2.14). Narrow heads unpadded: the padding's zeros are not the model's."""
    with pytest.MonkeyPatch.context() as mp, sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, \
            torch.no_grad():
        mp.setattr(dit, "CPU_HEAD_WIDTH", 0)
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("d,w,h", [(5, 64, 8), (2, 96, 8)])
@pytest.mark.parametrize("cfg_scale", [1.5, 1.0])
def test_dit_flop_count_matches_torch_counter(d, w, h, cfg_scale):
    model, batch = bench.random_dit(d, w, h, seed=1), 3
    z, y = torch.randn(batch, 3, 32, 32), torch.arange(batch)
    cfg = cfg_scale != 1
    assert counted_flops(lambda: model(z, y)) == batch * dit.flops_per_image(d, w)
    assert counted_flops(lambda: model.sample(z, y, cfg_scale)) == batch * dit.flops_per_image(d, w, cfg)
    assert dit.flops_per_image(d, w, cfg=True) == 2 * dit.flops_per_image(d, w)


@pytest.mark.parametrize("mlp_ratio", [2, 1.5, 4])
def test_dit_mlp_ratio_counts_are_exact(mlp_ratio):
    """--mlp-ratio r: the MLP's hidden width int(r w); param_count and flops_per_image count it exactly."""
    d, w = 3, 32
    model = dit.DiT(d, w, 4, mlp_ratio)
    assert model.blocks[0].mlp[0].out_features == int(mlp_ratio * w)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == dit.param_count(d, w, mlp_ratio), f"param_count({d}, {w}, {mlp_ratio}) is not the model's count"
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    z, y = torch.randn(2, 3, 32, 32), torch.arange(2)
    assert counted_flops(lambda: model(z, y)) == 2 * dit.flops_per_image(d, w, mlp_ratio=mlp_ratio)
    assert (dit.param_count(d, w, 4), dit.flops_per_image(d, w, mlp_ratio=4)) == (dit.param_count(d, w),
                                                                                   dit.flops_per_image(d, w))


def test_dit_heads_per_block_change_attention_not_counts():
    """--h 8,8,4,4,2: each block's attention has its own head count; parameters and FLOPs are those of --h 8."""
    model = dit.DiT(5, 64, [8, 8, 4, 4, 2])
    assert [b.attn.heads for b in model.blocks] == [8, 8, 4, 4, 2] and model.heads == [8, 8, 4, 4, 2]
    assert sum(p.numel() for p in model.parameters()) == dit.param_count(5, 64) == 421_068
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    z, y = torch.randn(2, 3, 32, 32), torch.arange(2)
    assert counted_flops(lambda: model(z, y)) == 2 * dit.flops_per_image(5, 64)
    uniform = dit.DiT(5, 64, 8)
    uniform.load_state_dict(model.state_dict())  # the same weights: only the split into heads differs
    assert not torch.allclose(model(z, y), uniform(z, y))
    assert dit.parse_heads("8") == 8 and dit.parse_heads("8,4") == [8, 4]
    assert dit.design_name(5, 64, [8, 4, 4, 2, 2], 2) == "d5w64h8-4-4-2-2r2" and dit.design_name(5, 64, 8) == "d5w64h8"
    for heads, ratio, phrase in [([8, 4], 4, "2 head counts for 5 blocks"), ([8, 8, 8, 8, 5], 4, "by heads 5"),
                                 (8, 0, "--mlp-ratio 0")]:
        with pytest.raises(ValueError, match=phrase):
            dit.DiT(5, 64, heads, ratio)


def test_dit_design_rules_at_another_mlp_ratio_and_design_names_read_back():
    """The rules re-size a budget for another MLP ratio (0.42M at ratio 2 buys a sixth block); a design's name, as run
    folders write it, reads back to the same design."""
    assert dit.design("0.42M", mlp_ratio=2) == (6, 64, 8) and dit.param_count(6, 64, 2) <= 420_000
    assert dit.design("0.42M", mlp_ratio=4) == (5, 64, 8)
    for d, w, h, r in [(5, 64, 8, 4), (5, 64, [8, 8, 4, 4, 2], 4), (6, 64, 8, 2.0), (3, 32, [4, 2, 1], 1.5)]:
        assert dit.parse_design_name(dit.design_name(d, w, h, r)) == (d, w, h, r)
    assert dit.parse_design_name("7,128,8") == (7, 128, 8, 4)
    for text, phrase in [("5x64x8", "cannot read the design"), ("d5w64h7", "not divisible by heads 7"),
                         ("d5w64h8-4", "2 head counts for 5 blocks")]:
        with pytest.raises(ValueError, match=phrase):
            dit.parse_design_name(text)


def test_dit_forward_hidden_decode_and_cfg():
    torch.manual_seed(0)
    model = dit.DiT(3, 32, 4)
    for p in model.parameters():  # leave the zero init so outputs and gates are non-trivial
        p.data.add_(0.05 * torch.randn_like(p))
    z, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 9, 10])
    x, hidden = model(z, y, return_hidden=True)
    assert x.shape == (4, 3, 32, 32) and len(hidden) == 3 and hidden[1].shape == (4, 256, 32)
    assert torch.allclose(model.decode(hidden[-1], y), x, atol=1e-6)  # last hidden through the head = output
    assert torch.allclose(model.sample(z, y, cfg_scale=1), x)
    null = torch.full_like(y, 10)
    guided = model(z, null) + 1.5 * (model(z, y) - model(z, null))
    assert torch.allclose(model.sample(z, y, cfg_scale=1.5), guided, atol=1e-5)


@pytest.mark.parametrize("width,heads", [(32, 8), (64, 8), (96, 8), (64, 4)])  # head widths 4, 8, 12, 16
def test_dit_cpu_head_padding_is_the_same_attention(width, heads, monkeypatch):
    """Narrow heads zero-padded on the CPU (the fast kernel path) give the outputs and gradients of plain SDPA."""
    torch.manual_seed(0)
    attn, x = dit.Attention(width, heads), torch.randn(3, 256, width)
    runs = []
    for pad_to in (dit.CPU_HEAD_WIDTH, 0):
        monkeypatch.setattr(dit, "CPU_HEAD_WIDTH", pad_to)
        xi = x.clone().requires_grad_()
        out = attn(xi)
        out.square().sum().backward()
        runs.append((out.detach(), xi.grad, attn.qkv.weight.grad.clone()))
        attn.zero_grad()
    for a, b in zip(*runs):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_dit_zero_init_outputs_zero():
    assert dit.DiT(2, 32, 4)(torch.randn(2, 3, 32, 32), torch.tensor([1, 2])).abs().max() == 0  # adaLN-Zero


@pytest.mark.parametrize("d,w,h,phrase", [(5, 64, 7, "not divisible by heads"), (0, 64, 8, "depth 0"),
                                          (5, 66, 6, "multiple of 4"), (5, 2, 1, "multiple of 4")])
def test_dit_bad_shapes_raise_clear_errors(d, w, h, phrase):
    with pytest.raises(ValueError, match=phrase):
        dit.DiT(d, w, h)


# ----------------------------------------------------------------------------------------------
# Course assignments (ASSIGNMENTS.md): each test names what it checks, and its message names the likely slip

def random_modulation(module, seed=0):
    """Give a module's zero-initialised adaLN and output layers random values, so that their use shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return module


def test_a1_modulate_shifts_and_scales_by_one_plus_scale():
    x, shift, scale = torch.randn(2, 5, 4), torch.randn(2, 4), torch.randn(2, 4)
    expected = x * (1 + scale[:, None, :]) + shift[:, None, :]
    got = dit.modulate(x, shift, scale)
    assert got.shape == x.shape, f"modulate must keep the tokens' shape {tuple(x.shape)}, got {tuple(got.shape)}"
    assert not torch.allclose(got, x * scale[:, None] + shift[:, None]), \
        "modulate multiplies by scale alone: adaLN scales by (1 + scale), so that a zero scale leaves x unchanged"
    assert not torch.allclose(got, x * (1 + shift[:, None]) + scale[:, None]), "modulate swaps shift and scale"
    assert torch.allclose(got, expected, atol=1e-6), \
        "modulate(x, shift, scale) must be x * (1 + scale) + shift, shift and scale broadcast over the tokens"


def block_by_hand(block, x, c):
    """DiT's block written out: chunk order shift, scale, gate of attention, then of the MLP; pre-norm; gated
    residuals."""
    s1, sc1, g1, s2, sc2, g2 = block.adaLN_modulation(c).chunk(6, dim=1)
    h = block.norm1(x) * (1 + sc1[:, None]) + s1[:, None]
    x = x + g1[:, None] * block.attn(h)
    h = block.norm2(x) * (1 + sc2[:, None]) + s2[:, None]
    return x + g2[:, None] * block.mlp(h)


def test_a1_block_applies_gated_residuals_in_ditS_order():
    torch.manual_seed(0)
    block = random_modulation(dit.Block(16, 4, 64))
    x, c = torch.randn(2, 256, 16), torch.randn(2, 16)
    got = block(x, c)
    assert got.shape == x.shape, f"a block maps tokens [B,T,w] to [B,T,w], got {tuple(got.shape)}"
    assert torch.allclose(got, block_by_hand(block, x, c), atol=1e-5), (
        "Block.forward differs from DiT's: x + gate1 * attn(modulate(norm1(x), shift1, scale1)), then "
        "x + gate2 * mlp(modulate(norm2(x), shift2, scale2)), with adaLN_modulation(c).chunk(6) in the order shift1, "
        "scale1, gate1, shift2, scale2, gate2 (check the order, the gates, norm1 before attention and norm2 before "
        "the MLP, and that each sub-layer is added to its input)")


def test_a1_zero_init_makes_every_block_the_identity_and_the_output_zero():
    torch.manual_seed(0)
    model = dit.DiT(2, 32, 4)
    for i, block in enumerate(model.blocks):
        last = block.adaLN_modulation[-1]
        assert not last.weight.any() and not last.bias.any(), \
            f"block {i}'s adaLN_modulation output layer must start at zero (adaLN-Zero: every gate starts at 0)"
        x = torch.randn(2, 256, 32)
        assert torch.equal(block(x, torch.randn(2, 32)), x), f"block {i} must start as the identity"
    head = model.final_layer
    assert not head.linear.weight.any() and not head.adaLN_modulation[-1].weight.any(), \
        "the final layer's linear and adaLN layers must start at zero, so the untrained model outputs zeros"
    qkv = model.blocks[0].attn.qkv
    assert qkv.weight.abs().max() <= math.sqrt(6 / (qkv.in_features + qkv.out_features)) + 1e-6 and qkv.weight.any(), \
        "the other linear layers start Xavier-uniform (not zero: then nothing would learn), with zero biases"
    assert not qkv.bias.any(), "linear biases start at zero"
    assert torch.allclose(model.pos_embed[0], torch.from_numpy(dit.sincos_2d(32, 16))), \
        "pos_embed must hold the fixed 2-D sin-cos table (dit.sincos_2d)"
    assert model.y_embedder.weight.std() < 0.05 and model.y_embedder.weight.any(), \
        "the label embedding starts N(0, 0.02), not zero (else every class looks the same)"


def test_a2_attention_matches_per_head_softmax_attention():
    torch.manual_seed(0)
    width, heads = 32, 4
    attn, x = dit.Attention(width, heads), torch.randn(2, 256, width)
    e = width // heads
    q, k, v = attn.qkv(x).split(width, dim=-1)  # [B,T,w] each; head h owns columns h*e:(h+1)*e
    outs = []
    for h in range(heads):
        cols = slice(h * e, (h + 1) * e)
        weights = torch.softmax(q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(e), dim=-1)  # [B,T,T]
        outs.append(weights @ v[..., cols])
    expected = attn.proj(torch.cat(outs, dim=-1))
    got = attn(x)
    assert got.shape == x.shape, f"attention maps [B,T,w] to [B,T,w], got {tuple(got.shape)}"
    heads_cols = [slice(h * e, (h + 1) * e) for h in range(heads)]
    wrong_scale = torch.cat([torch.softmax(q[..., c] @ k[..., c].transpose(1, 2) / math.sqrt(width), -1) @ v[..., c]
                             for c in heads_cols], -1)
    assert not torch.allclose(got, attn.proj(wrong_scale), atol=1e-4), \
        "the scores are divided by sqrt(width): divide by sqrt(head width) = sqrt(width / heads)"
    assert torch.allclose(got, expected, atol=1e-4), (
        "Attention.forward differs from per-head softmax(q k^T / sqrt(e)) v: qkv(x) is [q | k | v] along the last "
        "axis, head h owns columns h*e:(h+1)*e of each, the heads' outputs are concatenated in order and then "
        "projected by proj (check the split of qkv, the order of heads, the transpose back, and the projection)")


def test_a4_rule_heads_is_the_lower_median_factor():
    def by_definition(w):
        factors = [f for f in range(1, w + 1) if w % f == 0]
        return factors[(len(factors) - 1) // 2]  # odd count: the median; even: the lower of the two middle ones
    for w in (12, 24, 32, 48, 64, 96, 128, 192, 256, 384, 768):
        got = dit.rule_heads(w)
        upper = sorted(f for f in range(1, w + 1) if w % f == 0)[len([f for f in range(1, w + 1) if w % f == 0]) // 2]
        assert got == by_definition(w), (
            f"rule_heads({w}) = {got}, expected {by_definition(w)}: min(median(factors(w))) takes the lower middle "
            f"factor when there are two" + (f" (you took the upper one, {upper})" if got == upper else ""))


def test_a5_guided_extrapolates_from_the_unconditional_half():
    cond, uncond = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    assert torch.allclose(dit.guided((cond, uncond), 1.0), cond, atol=1e-6), \
        "guidance scale 1 must give the conditional prediction itself"
    assert torch.allclose(dit.guided((cond, uncond), 0.0), uncond, atol=1e-6), \
        "guidance scale 0 must give the unconditional prediction: the halves are (conditional, unconditional)"
    assert torch.allclose(dit.guided((cond, uncond), 1.5), uncond + 1.5 * (cond - uncond), atol=1e-5), \
        "guided must be x_u + s (x_c - x_u): extrapolate from the unconditional half towards the conditional one"


def test_a6_learning_rate_warms_up_holds_and_decays():
    rates = [distill.learning_rate(s, 1.0, 4, 0, 10) for s in range(10)]
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]), \
        f"warm-up: step s (0-based) of 4 warm-up steps has rate lr * (s + 1) / 4, got {rates[:4]}"
    assert rates[4:] == pytest.approx([1.0] * 6), f"after the warm-up the rate is constant, got {rates[4:]}"
    decayed = [distill.learning_rate(s, 2.0, 0, 4, 10) for s in range(10)]
    assert decayed == pytest.approx([2, 2, 2, 2, 2, 2, 2, 1.5, 1, 0.5]), \
        f"decay over the last 4 of 10 steps: lr (total - step) / decay, reaching lr / 4 at the last step; got {decayed}"


def test_a8_psnr_of_images_on_minus_one_to_one():
    assert data.psnr(4.0) == pytest.approx(0.0), \
        "images lie on [-1, 1], a peak-to-peak range of 2: PSNR = 10 log10(2^2 / MSE), 0 dB at MSE 4 (not a peak of 1)"
    assert data.psnr(0.04) == pytest.approx(20.0), "PSNR is 10 log10(4 / MSE) in dB (base 10): 20 dB at MSE 0.04"
    assert data.psnr(0.0) > 100, "a perfect match (MSE 0) must give a large finite PSNR, not an error"



# ----------------------------------------------------------------------------------------------
# toy.py: the family, its exact teacher, the toy metrics

def brute_force_denoiser(x, sigma, m, mean=toy.COLOUR_MEAN, std=toy.COLOUR_STD):
    """E[x0 | x] of toy.py's family written out with explicit covariances: modes j equally likely, per mode
    x0 = B_j a with a ~ N(mu, tau^2 I) (6 colours), so x | j ~ N(B_j mu, sigma^2 I + tau^2 B_j B_j^T) and
    E[x0 | x, j] = B_j mu + tau^2 B_j^T' C_j^-1 (x - B_j mu). x [b,3,P], masks m [J,P], all float64."""
    b, channels, pixels = x.shape
    eye = torch.eye(channels, dtype=torch.float64)
    flat = x.reshape(b, -1)
    log_p, means = [], []
    for mask in m:
        basis = torch.kron(eye, torch.stack([1 - mask, mask], 1))  # [3P, 6]: (bg, fg) of each channel
        centre = basis @ torch.tensor(mean, dtype=torch.float64).repeat(channels)
        cov = sigma ** 2 * torch.eye(channels * pixels, dtype=torch.float64) + std ** 2 * basis @ basis.T
        log_p.append(torch.distributions.MultivariateNormal(centre, cov).log_prob(flat))
        means.append(centre + std ** 2 * (basis @ basis.T @ torch.linalg.solve(cov, (flat - centre).T)).T)
    weight = torch.softmax(torch.stack(log_p, 1), 1)
    return (weight[:, :, None] * torch.stack(means, 1)).sum(1).view(b, channels, pixels)


@pytest.mark.parametrize("sigma", [0.01, 0.3, 2.0, 30.0])
def test_toy_denoiser_is_the_exact_posterior_mean(sigma):
    g = torch.Generator().manual_seed(0)
    m = torch.rand(4, 40, generator=g, dtype=torch.float64)  # 4 modes of 40 "pixels": small enough to write out
    x = torch.randn(3, 3, 40, generator=g, dtype=torch.float64) * 0.8
    assert torch.allclose(toy.denoiser(x, sigma, m), brute_force_denoiser(x, sigma, m), atol=1e-9, rtol=1e-9)


def test_toy_draws_and_teacher_images_lie_on_the_family():
    g = torch.Generator().manual_seed(0)
    x, y = toy.draw(40, g)
    assert x.shape == (40, 3, 32, 32) and y.shape == (40,) and set(y.tolist()) <= set(range(10))

    def residual(images, labels):  # distance to the nearest image of its class's family (best mode, best colours)
        out = []
        for img, c in zip(images.double(), labels):
            m = toy.MASKS[int(c)]
            per_mode = []
            for mask in m:
                basis = torch.stack([1 - mask, mask], 1)  # [P,2]
                fit = basis @ torch.linalg.lstsq(basis, img.view(3, -1).T).solution
                per_mode.append(((fit - img.view(3, -1).T) ** 2).mean())
            out.append(min(per_mode))
        return torch.stack(out)
    assert residual(x, y).max() < 1e-12
    z = torch.randn(20, 3, 32, 32, generator=g)
    labels = torch.arange(20) % 10
    teacher = toy.teacher_sample(z, labels)
    assert residual(teacher, labels).max() < 1e-5  # EDM's sampler lands on the family, in its class
    assert residual(teacher, (labels + 1) % 10).min() > 1e-3  # and not on another class's


def test_toy_edm_sigmas():
    s = toy.edm_sigmas()
    assert len(s) == 19 and s[0] == 80 and abs(s[17] - 0.002) < 1e-12 and s[18] == 0
    assert (s[1:] < s[:-1]).all()
    i = torch.arange(18, dtype=torch.float64)  # EDM eq. 5, written out here
    assert torch.allclose(s[:18], (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7, rtol=1e-12)


def test_toy_teacher_follows_edm_algorithm_1():
    """The sampler's trajectory, not only its end (the last step, Euler to sigma = 0, lands on the family
    whatever came before): stopped at sigma 0.5, a wrong Heun weight or a skipped correction shows."""
    def denoise(x, sigma):
        return toy.denoiser(x.view(len(x), 3, -1), sigma, toy.MASKS[5]).flatten(1)
    z = torch.randn(2, 3 * 32 * 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = [80.0, 10.0, 2.5, 0.5]
    x = z * t[0]
    for i in range(3):  # Karras et al. 2022, Algorithm 1, deterministic (no churn), written out here
        d = (x - denoise(x, t[i])) / t[i]
        x_euler = x + (t[i + 1] - t[i]) * d
        x = x + (t[i + 1] - t[i]) * (0.5 * d + 0.5 * (x_euler - denoise(x_euler, t[i + 1])) / t[i + 1])
    assert torch.allclose(toy.heun_solve(z * t[0], torch.tensor(t, dtype=torch.float64), denoise), x, atol=1e-9)
    # ... and teacher_sample is that solver over EDM's schedule, from x = 80 z
    expected = toy.heun_solve(z * 80, toy.edm_sigmas(4), denoise).float().view(2, 3, 32, 32)
    assert torch.allclose(toy.teacher_sample(z.float().view(2, 3, 32, 32), torch.tensor([5, 5]), steps=4),
                          expected, atol=1e-5)


def test_toy_pairs_are_cached_and_deterministic(tmp_path):
    a_train, a_held = toy.load_pairs(str(tmp_path), 64, 8, seed=3)
    assert len(os.listdir(tmp_path)) == 1
    b_train, b_held = toy.load_pairs(str(tmp_path / "other"), 64, 8, seed=3)
    assert torch.equal(a_train["x"], b_train["x"]) and torch.equal(a_held["z"], b_held["z"])
    assert not torch.equal(a_train["z"][:8], a_held["z"])  # held-out noise is not training noise
    c_train, _ = toy.load_pairs(str(tmp_path), 64, 8, seed=4)
    assert not torch.equal(a_train["z"], c_train["z"]) and len(glob.glob(str(tmp_path / "toy_*.pt"))) == 2


def test_toy_metric_ranks_sets_as_fid_would(tmp_path):
    """On the shipped networks: exact draws of the family score near 0 against other draws, a mild blur of them a
    little more, one mean image per class far more, one shape for every label most; the class accuracy counts the
    labels the images were meant to have."""
    nets = toy.trained_nets(["metric", "classifier"], str(tmp_path))
    net, classifier = nets["metric"], nets["classifier"]
    g = torch.Generator().manual_seed(1)
    ref_x, ref_y = toy.draw(1500, g)
    reference = toy.statistics(toy.features_and_logits(net, ref_x)[0])
    x, y = toy.draw(500, g)
    means = torch.stack([ref_x[ref_y == c].mean(0) for c in range(10)])
    fid_of = {"itself": toy.toy_fid(net, ref_x, reference), "draws": toy.toy_fid(net, x, reference),
              "blur 1 px": toy.toy_fid(net, toy.soften(x, torch.ones(500)), reference),
              "class means": toy.toy_fid(net, means[y], reference),
              "discs": toy.toy_fid(net, toy.draw(500, g, torch.zeros_like(y))[0], reference)}
    assert abs(fid_of["itself"]) < 1e-6, "a set against its own statistics must score 0"
    order = ["draws", "blur 1 px", "class means", "discs"]
    assert all(fid_of[a] < fid_of[b] for a, b in zip(order, order[1:])), f"expected {' < '.join(order)}: {fid_of}"
    assert fid_of["blur 1 px"] < 0.5 * fid_of["class means"], f"a blur must score far better than class means: {fid_of}"
    assert toy.toy_fid(net, x, reference) == fid_of["draws"]  # deterministic
    assert toy.class_accuracy(classifier, x, y) > 0.95 > 2 * toy.class_accuracy(classifier, x, (y + 1) % 10)
    # it sees how shapes' positions are distributed (all large and centred: far worse), not which draw has which
    # position (fresh colours at each image's own position and size: as good as the draws)
    again = toy.at_their_positions(x, y)
    assert torch.equal(toy.modes_of(again, y), toy.modes_of(x, y)) and not torch.equal(again, x)
    centred = toy.draw(500, g, y, torch.full((500,), toy.CENTRE_MODE))[0]
    assert toy.toy_fid(net, again, reference) < 0.25 * toy.toy_fid(net, centred, reference)


def test_toy_calibration_orders_the_teacher_a_blur_class_means_and_wrong_shapes(cache):
    """python toy.py's calibration on 1,000 held-out teacher pairs: the teacher's images best, a mild blur of them
    far ahead of the class means, one shape for every label worst; its last row says so."""
    train, held = toy.make_pairs(2000, 5, desc="train"), toy.make_pairs(1000, 6, desc="held")
    rows = dict(toy.calibration(toy.Scorer(train["x"], cache), train, held, repeats=2))
    assert "the teacher's images, 3x3 box blur" in rows and "shapes of no class (ellipse, cross, frame, ...)" in rows
    verdict = [name for name in rows if name.startswith("FID's order")][0]
    assert verdict.endswith("holds"), {k: v.get("toy_fid") for k, v in rows.items()}


def test_toy_modes_of_names_each_images_mode_and_the_noise_predicts_the_teachers():
    g = torch.Generator().manual_seed(2)
    J = len(toy.MASKS[0])
    labels, modes = torch.arange(10).repeat_interleave(J), torch.arange(J).repeat(10)  # every mode of every class
    bg, fg = (mean + toy.COLOUR_STD * torch.randn(len(labels), 3, 1, generator=g) for mean in toy.COLOUR_MEAN)
    m = torch.stack([toy.MASKS[c][j] for c, j in zip(labels.tolist(), modes.tolist())]).float()[:, None]
    x = (bg * (1 - m) + fg * m).view(-1, 3, 32, 32)
    names = torch.stack([toy.MODE_NAMES[c][j] for c, j in zip(labels.tolist(), modes.tolist())])
    assert torch.equal(toy.modes_of(x, labels), names)  # whatever the colours; modes that draw one image are one
    assert 1 / J <= toy.mode_chance() < 1
    if toy.JITTER:  # positions a pixel apart: some modes draw one image, and a pixel to the right is another mode
        assert (names != modes).any() and toy.mode_chance() > 1 / J
        assert 0.5 < (toy.modes_of(torch.roll(x, 1, dims=3), labels) != names).float().mean() < 1
    # the teacher's choice of mode is a simple function of its noise: a rule on the noise alone names it far
    # more often than chance, so a student can learn it
    z, y = torch.randn(100, 3, 32, 32, generator=g), torch.arange(100) % 10
    rule = (toy.noise_rule_modes(z, y) == toy.modes_of(toy.teacher_sample(z, y), y)).float().mean()
    assert rule > toy.mode_chance() + 0.25


def test_toy_best_scale_is_chosen_on_the_selection_samples(cache):
    """Halves built so that guidance at one scale gives exact images of the family (and others add noise): the toy
    FID by scale is lowest there, and score_model's best scale is the selection samples' own, not the held-out's."""
    g = torch.Generator().manual_seed(3)
    scorer = toy.Scorer(toy.draw(500, g)[0], cache)
    x, y = toy.draw(200, g)
    d = torch.randn(x.shape, generator=g)
    exact_at = {1.5: (x - d, x - 3 * d), 2.0: (x - d, x - 2 * d)}  # x_u + s (x_c - x_u) = x + (s(b - a) - b) d
    for scale, halves in exact_at.items():
        assert torch.allclose(dit.guided(halves, scale), x, atol=1e-5)
        fids = scorer.fids_by_scale(halves, y, scales=(1.0, 1.5, 2.0))
        assert min(fids, key=fids.get) == scale, fids

    class Fixed(torch.nn.Module):  # a "model" whose halves are exact at 2.0 for every noise
        def guidance_halves(self, z, labels):
            return exact_at[2.0][0][:len(z)], exact_at[2.0][1][:len(z)]
    held = scorer.score_model(Fixed(), exact_at[1.5], y, x, 1.5, "cpu")  # held-out halves exact at 1.5
    assert held["cfg_best"] == 2.0 and held["toy_fid_best"] == held["toy_fid_by_cfg"]["2"]
    assert held["toy_fid_by_cfg"]["1.5"] < held["toy_fid_best"]  # chosen on the selection samples, not held-out
    assert set(held["toy_fid_by_cfg"]) == set(held["selection_fid_by_cfg"]) == {f"{s:g}" for s in toy.SCALES}
    # the real grid (the fixture shortens it) runs from 1 and holds the paper's 1.5, 2.0 and the tests' scales
    assert REAL_SCALES[0] == 1 and set(TEST_SCALES) <= set(REAL_SCALES)
    _, held_pairs = toy.load_pairs(cache, 256, 32)
    assert not torch.equal(toy.selection_noise(32), held_pairs["z"]) and torch.equal(toy.selection_noise(4),
                                                                                     toy.selection_noise(4))


def test_toy_py_scores_checkpoints_beside_the_calibration(cache, tmp_path, capsys):
    distill.main(train_args(cache, tmp_path / "run", "--steps", "2"))
    capsys.readouterr()
    flags = ["--toy-pairs", "256", "--holdout", "32", "--repeats", "2", "--ckpt", str(tmp_path / "run" / "ckpt.pt")]
    toy.main(flags)
    out = capsys.readouterr().out
    teacher = next(line for line in out.splitlines() if "the teacher's held-out images " in line)
    assert "teacher's mode 100.0%" in teacher  # the teacher's own images are drawn in its modes
    run = next(line for line in out.splitlines() if "run (step 2, CFG 1.5)" in line)  # the run's own scale
    assert "toy FID" in run and "teacher's mode" in run
    assert "the family at the teacher's images' positions" in out and "its positions (" in out
    toy.main(flags + ["--cfg-scale", "1", "1.5"])  # both scales from one pair of passes, as DiT.sample guides
    lines = capsys.readouterr().out.splitlines()
    assert next(line for line in lines if "run (step 2, CFG 1.5)" in line) == run
    assert next(line for line in lines if "run (step 2, CFG 1)" in line) != run
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 <= results["ema"]["toy_mode"] <= 1 and "toy_mode" in results["class_mean"]  # and every toy eval
    # every toy eval also scores the run at its best scale, chosen on other noise: toy.py finds the same scale,
    # and its toy FID at that scale is the eval's
    best = results["ema"]["cfg_best"]
    assert best in toy.SCALES and f"run (step 2, its best CFG {best:g})" in out
    toy.main(flags + ["--cfg-scale", str(best)])
    row = next(line for line in capsys.readouterr().out.splitlines() if f"run (step 2, CFG {best:g})" in line)
    assert f"toy FID {results['ema']['toy_fid_best']:9.2f}" in row
    # every evaluation keeps the toy FID at every scale it tried, of both noises: another protocol needs no rerun
    by_cfg, selection = results["ema"]["toy_fid_by_cfg"], results["ema"]["selection_fid_by_cfg"]
    assert set(by_cfg) == set(selection) == {f"{s:g}" for s in toy.SCALES}
    assert by_cfg[f"{best:g}"] == results["ema"]["toy_fid_best"] and min(selection, key=selection.get) == f"{best:g}"
    assert by_cfg["1.5"] == pytest.approx(results["ema"]["toy_fid"])  # the run's own scale, the paper's 1.5
    assert results["ema"]["toy_protocol"] == toy.PROTOCOL  # each record names its protocol


def test_toy_networks_are_trained_once_deterministically_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(toy, "NETS", {kind: spec._replace(steps=3) for kind, spec in toy.NETS.items()})
    threads = torch.get_num_threads()
    torch.manual_seed(123)  # the global state must not matter, nor the caller's thread count
    torch.set_num_threads(2)
    state = torch.get_rng_state()
    both = toy.trained_nets(list(toy.NETS), str(tmp_path))  # trained side by side, a thread each
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == 2  # the caller's, untouched
    first = both["metric"]
    torch.set_num_threads(1)
    for kind in toy.NETS:  # the same weights as one network trained alone
        other = toy.train_net(kind, 3)
        assert all(torch.equal(a, b) for a, b in zip(both[kind].state_dict().values(), other.state_dict().values()))
    torch.set_num_threads(threads)
    assert [f for f in os.listdir(tmp_path) if f.startswith("toy_metric_")] and not first.training
    monkeypatch.setattr(toy, "train_net", lambda *a, **k: pytest.fail("trained again instead of loaded"))
    again = toy.trained_net("metric", str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert not any(p.requires_grad for p in again.parameters())
    monkeypatch.setattr(toy, "NETS_DIR", str(tmp_path))  # shipped there: found before an empty cache is tried
    shipped = toy.trained_net("metric", str(tmp_path / "empty"))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), shipped.state_dict().values()))
    assert not os.path.exists(tmp_path / "empty")


def test_toy_ships_the_default_familys_networks_and_they_know_its_classes(tmp_path, monkeypatch):
    # A changed family, seed or step count names other files: then this fails until assets/toy_nets is retrained
    # (rather than every quick start training both networks for minutes).
    monkeypatch.setattr(toy, "train_net", lambda *a, **k: pytest.fail("a shipped network is missing"))
    nets = toy.trained_nets(list(toy.NETS), str(tmp_path / "cache"))
    assert not os.path.exists(tmp_path / "cache")
    x, y = toy.draw(500, torch.Generator().manual_seed(99))
    for kind, net in nets.items():
        assert (net(x).argmax(1) == y).float().mean() > 0.95, kind


SCRIPT_TRAIN_NETS = """
import sys, torch, toy
nets = {kind: toy.train_net(kind, 3, batch=16) for kind in toy.NETS}
torch.save({kind: net.state_dict() for kind, net in nets.items()}, sys.argv[1])
"""


def test_toy_networks_are_the_same_whatever_the_cpus_vector_kernels(tmp_path):
    # The same training with torch's and oneDNN's vector kernels capped at AVX2 (on a CPU with AVX-512 the two
    # runs take different kernels): in float32 the sums round differently and the weights part (0.14 after a
    # hundred steps); in float64 they agree over these three steps. (Over 600 steps float64's perceptual network
    # parts too, 0.35, and at the scalar baseline 1.7e-6 within three steps: the shipped files cover that.)
    kernels = {"default": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
    for name, env in kernels.items():
        result = run_script("-c", SCRIPT_TRAIN_NETS, str(tmp_path / f"{name}.pt"), env=env)
        assert result.returncode == 0, result.stderr
    a, b = (torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in kernels)
    for kind in toy.NETS:
        for key, value in a[kind].items():
            assert value.dtype == torch.float32 and torch.allclose(value, b[kind][key], rtol=0, atol=1e-12), key


def test_toy_lpips_loss_prefers_the_image_to_its_blur_and_trains(tmp_path):
    loss_fn = toy.perceptual_loss(str(tmp_path), "cpu")
    x, _ = toy.draw(8, torch.Generator().manual_seed(0))
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    assert loss_fn(x, x) < 1e-8 < loss_fn(blurred, x)
    pred = blurred.clone().requires_grad_(True)
    loss_fn(pred, x).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in toy.trained_net("perceptual", str(tmp_path)).parameters())


# ----------------------------------------------------------------------------------------------
# data.py: GET's layout

def write_get_folder(root, n_files=2, per_file=5, conditional=True, image_dtype=torch.float32):
    """A tiny folder in GET's layout (data.write_synthetic_get): files 000000004.pkl, 000000009.pkl, ..."""
    return data.write_synthetic_get(root, n_files, per_file, conditional, image_dtype)


@pytest.mark.parametrize("conditional,image_dtype", [(True, torch.float32), (False, torch.float64)])
def test_data_get_layout_is_converted_and_read_exactly(tmp_path, conditional, image_dtype):
    root = write_get_folder(tmp_path / "pairs", conditional=conditional, image_dtype=image_dtype)
    train, held = data.load_pairs(str(root), heldout=3)
    assert sorted(os.listdir(root / "dit-nano-arrays")) == ["labels.npy", "pairs.npy", "source.json"]
    assert train.conditional is conditional and len(train) == 7 and len(held) == 3
    z, y, x = train.batch(torch.tensor([6, 0, 5]))  # rows 6 and 5 in file 1, row 0 in file 0
    lat1 = torch.load(root / "latent" / "000000009.pkl", weights_only=True)
    z1 = lat1[0] if conditional else lat1
    assert torch.equal(z[0], z1[1]) and torch.equal(z[2], z1[0])
    assert x.dtype == torch.float32 and torch.allclose(x, torch.tanh(z), atol=1e-6)
    if conditional:
        assert torch.equal(y[0], lat1[1][1].argmax())
    else:
        assert (y == 10).all()  # unconditional pairs train the null class
    hz, _, _ = held.batch(torch.tensor([0]))
    assert torch.equal(hz[0], z1[2])  # held-out = the last pairs
    pairs = np.load(root / "dit-nano-arrays" / "pairs.npy", mmap_mode="r")  # the layout a reader can load too
    assert pairs.shape == (10, 2, 3, 32, 32) and np.array_equal(pairs[6, 0], z1[1].numpy())


def test_data_get_conversion_is_reused_redone_when_the_source_changes_and_atomic(tmp_path, monkeypatch, capsys):
    root = write_get_folder(tmp_path / "pairs", n_files=3, per_file=4)
    first, _ = data.load_pairs(str(root), heldout=2)
    assert "converting" in capsys.readouterr().out
    data.load_pairs(str(root), heldout=2)
    assert "converting" not in capsys.readouterr().out  # reused
    lat = torch.load(root / "latent" / "000000007.pkl", weights_only=True)
    lat[0] = lat[0] + 1
    torch.save(lat, root / "latent" / "000000007.pkl")
    again, _ = data.load_pairs(str(root), heldout=2)
    assert "the source files changed" in capsys.readouterr().out
    assert torch.equal(again.batch(torch.tensor([5]))[0], first.batch(torch.tensor([5]))[0] + 1)
    # a conversion cut short leaves the last good one in place and no half-written folder
    os.remove(root / "latent" / "000000011.pkl")
    os.remove(root / "image" / "000000011.pkl")
    real_read = data.read_get_file
    calls = []

    def read_then_stop(*paths):
        calls.append(paths)
        if len(calls) == 4:  # 2 files checked, then the first written: stop in the middle
            raise KeyboardInterrupt
        return real_read(*paths)
    monkeypatch.setattr(data, "read_get_file", read_then_stop)
    with pytest.raises(KeyboardInterrupt):
        data.load_pairs(str(root), heldout=2)
    monkeypatch.setattr(data, "read_get_file", real_read)
    with open(root / "dit-nano-arrays" / "source.json") as f:
        assert json.load(f)["pairs"] == 12  # the earlier, complete conversion
    assert not list(root.glob("dit-nano-arrays.*tmp"))  # the interrupted one's temp folder is gone
    # a killed conversion's temp folder is removed by the next; a live process's is left alone
    temp = f"dit-nano-arrays.{socket.gethostname()}."
    dead, alive = root / f"{temp}999999999.tmp", root / f"{temp}{os.getppid()}.tmp"
    dead.mkdir(), alive.mkdir()
    train, held = data.load_pairs(str(root), heldout=2)  # converted again, whole
    assert len(train) + len(held) == 8 and not dead.exists() and alive.exists()


def test_data_get_read_only_folder_converts_into_the_cache(tmp_path, monkeypatch):
    root = write_get_folder(tmp_path / "pairs")
    monkeypatch.setattr(common, "CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "access", lambda path, mode: path != os.path.realpath(root))  # as if read-only
    train, _ = data.load_pairs(str(root), heldout=2)
    assert not os.path.exists(root / "dit-nano-arrays")
    assert os.path.dirname(train.folder) == str(tmp_path / "cache")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    with pytest.raises(common.UsageError, match="needs 0.0 GB .* DIT_NANO_CACHE"):
        data.load_pairs(str(write_get_folder(tmp_path / "other")), heldout=2)


def test_data_get_layout_errors(tmp_path):
    with pytest.raises(common.UsageError, match="is not a folder"):
        data.load_pairs(str(tmp_path / "missing"))
    root = write_get_folder(tmp_path / "a")
    torch.save(torch.zeros(5, 3, 28, 28), root / "image" / "000000009.pkl")
    with pytest.raises(common.UsageError, match=r"image.*000000009.pkl: expected images as a tensor \[n,3,32,32\]"):
        data.load_pairs(str(root))
    root = write_get_folder(tmp_path / "b")
    torch.save(torch.zeros(5, 3, 32, 32, dtype=torch.int32), root / "latent" / "000000004.pkl")
    with pytest.raises(common.UsageError, match="noise z.*float32, got torch.int32"):
        data.load_pairs(str(root))
    root = write_get_folder(tmp_path / "c")
    (root / "image" / "000000004.pkl").write_bytes(b"not a torch file")
    with pytest.raises(common.UsageError, match="cannot read .*000000004.pkl"):
        data.load_pairs(str(root))
    root = write_get_folder(tmp_path / "d")
    os.remove(root / "image" / "000000009.pkl")
    with pytest.raises(common.UsageError, match="000000009.pkl is missing"):
        data.load_pairs(str(root))


# ----------------------------------------------------------------------------------------------
# distill.py: losses, training, checkpoints

def test_distill_every_loss_is_finite_with_gradients():
    args = distill.get_parser().parse_args(["--lpips-backbone", "random", "--lpips-size", "64"])
    torch.manual_seed(0)
    target = torch.rand(2, 3, 32, 32) * 2 - 1
    for name in distill.LOSSES:
        args.loss = name
        loss_fn, _ = distill.build_loss(args, torch.device("cpu"))
        pred = torch.zeros(2, 3, 32, 32, requires_grad=True)
        value = loss_fn(pred, target)
        value.backward()
        assert value.ndim == 0 and torch.isfinite(value) and value > 0, name
        assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0, name


def test_distill_lpips_net_is_frozen():
    net = measure.build_lpips("alex", "cpu", backbone="random")
    assert not any(p.requires_grad for p in net.parameters()) and not net.training


def train_args(cache, out, *extra):
    # a constant rate after the warm-up (no --decay): a run to step n is then the first n steps of a longer one
    return toy_flags(cache) + TINY + ["--out", str(out), "--batch", "16", "--log-every", "5", "--decay", "0",
                                      *extra]


def test_distill_tiny_overfit_lowers_loss(cache, tmp_path):
    _, held = data.load_pairs("toy", 32, n_train=256, seed=0)
    args = distill.resolve(distill.get_parser().parse_args(train_args(cache, tmp_path, "--steps", "1")))
    loss_fn, _ = distill.build_loss(args, torch.device("cpu"))
    torch.manual_seed(0)
    model = dit.DiT(2, 32, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    z, y, x = held.batch(torch.arange(16))
    losses = []
    for _ in range(100):
        loss = loss_fn(model(z, y), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_distill_trains_heads_per_block_and_an_mlp_ratio_and_sample_loads_them(cache, tmp_path):
    distill.main(train_args(cache, tmp_path, "--d", "3", "--w", "32", "--h", "4,2,1", "--mlp-ratio", "2",
                            "--steps", "2"))
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["design"] == [3, 32, [4, 2, 1]] and record["mlp_ratio"] == 2
    assert record["param_count"] == dit.param_count(3, 32, 2) < dit.param_count(3, 32)
    model, cfg = sample.load_model(str(tmp_path / "ckpt.pt"))
    assert [b.attn.heads for b in model.blocks] == [4, 2, 1] and model.blocks[0].mlp[0].out_features == 64
    sample.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "g.png"), "--per-class", "1",
                 "--device", "cpu"])
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit) as stop:  # a run's knobs are its recipe: --resume refuses another
        distill.main(train_args(cache, tmp_path, "--d", "3", "--w", "32", "--h", "4,2,1", "--steps", "4", "--resume"))
    assert stop.value.code == 2


def test_distill_warmup_ramps_the_rate_and_grad_clip_bounds_the_norm(cache, tmp_path):
    args = distill.resolve(distill.get_parser().parse_args(train_args(
        cache, tmp_path, "--steps", "1", "--loss", "l2", "--lr", "1e-3", "--warmup", "4", "--grad-clip", "0.01",
        "--decay", "0")))
    run = distill.build_student(args, torch.device("cpu"), distill.build_loss(args, torch.device("cpu"))[0])
    _, held = data.load_pairs("toy", 32, n_train=256, seed=0)
    z, y, x = held.batch(torch.arange(8))

    def grad_norm():
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in run.model.parameters()
                                                     if p.grad is not None])).item()
    rates, norms = [], []
    for step in range(6):
        distill.train_step(run, z, y, x, step)
        rates.append(run.opt.param_groups[0]["lr"])
        norms.append(grad_norm())
    assert rates == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 1e-3, 1e-3])  # linear to --lr, then constant
    # with a decay over the last 3 of 6 steps: warm-up, constant, then linearly down to lr / decay at the last step
    assert [distill.learning_rate(s, 1.0, 2, 3, 6) for s in range(6)] == pytest.approx([0.5, 1, 1, 1, 2 / 3, 1 / 3])
    assert [distill.learning_rate(s, 1.0, 0, 0, 6) for s in range(6)] == [1.0] * 6
    assert max(norms) <= 0.01 * (1 + 1e-4)
    run.grad_clip = 0  # the same step unclipped: the norm was above the bound, so the clip did something
    distill.train_step(run, z, y, x, 6)
    assert grad_norm() > 0.02


def test_distill_run_writes_everything(cache, tmp_path, capsys):
    distill.main(train_args(cache, tmp_path, "--steps", "10", "--eval-every", "5"))
    assert "FID skipped: the toy teacher's images are not CIFAR-10" in capsys.readouterr().out
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == 10 and state["config"]["depth"] == 2 and state["config"]["loss"] == "toy-lpips"
    assert set(state) >= {"model", "ema", "optimizer", "step", "rng", "config"}
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"psnr"' in lines[0]
    assert (tmp_path / "grid.png").exists() and (tmp_path / "results.json").exists()
    # the EMA moved away from its (zero-output) start but lags the model
    assert not torch.equal(state["ema"]["final_layer.linear.weight"], state["model"]["final_layer.linear.weight"])


def test_distill_seed_varies_training_and_toy_seed_the_task(cache, tmp_path):
    """Seed repeats of a study share one toy teacher (same class-mean baseline) but train differently."""
    runs = {}
    for name, flags in {"s0": [], "s1": ["--seed", "1"], "toy1": ["--toy-seed", "1"]}.items():
        distill.main(train_args(cache, tmp_path / name, "--steps", "2", "--eval-every", "2", *flags))
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert runs["s0"]["class_mean"] == runs["s1"]["class_mean"] != runs["toy1"]["class_mean"]
    assert runs["s0"]["ema"] != runs["s1"]["ema"]
    assert (runs["s1"]["seed"], runs["s1"]["toy_seed"], runs["toy1"]["toy_seed"]) == (1, 0, 1)


def test_distill_resume_is_exact(cache, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    distill.main(train_args(cache, straight, "--steps", "20", "--eval-every", "10"))
    distill.main(train_args(cache, split, "--steps", "10", "--eval-every", "10"))
    distill.main(train_args(cache, split, "--steps", "20", "--eval-every", "10", "--resume"))
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(split / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 20
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])
    # a finished run resumed with its own step count is measured again (e.g. after a metric is added), unchanged
    (straight / "results.json").unlink()
    distill.main(train_args(cache, straight, "--steps", "20", "--eval-every", "10", "--resume"))
    again = torch.load(straight / "ckpt.pt", weights_only=True)
    assert again["step"] == 20 and all(torch.equal(a["ema"][k], again["ema"][k]) for k in a["ema"])
    lines = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20, 20] and lines[-1]["ema"] == lines[-2]["ema"]
    assert json.loads((straight / "results.json").read_text())["wall_s"] == lines[-2]["wall_s"]
    with pytest.raises(SystemExit) as stop:  # fewer steps than it has: refused, not silently "done"
        distill.main(train_args(cache, straight, "--steps", "10", "--resume"))
    assert stop.value.code == 2
    for flag, value in [("--batch", "8"), ("--lr", "1e-3")]:  # another recipe: refused, it would be neither
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            distill.main(train_args(cache, split, "--steps", "30", "--resume") + [flag, value])
        assert stop.value.code == 2 and f"{flag[2:]}=" in capsys.readouterr().err, flag
    assert torch.load(split / "ckpt.pt", weights_only=True)["step"] == 20  # untouched


def test_distill_nan_loss_stops_and_keeps_last_good_checkpoint(cache, tmp_path, monkeypatch):
    calls = {"n": 0}

    def poisoned(args, device, lpips_net):
        def loss(pred, target):
            calls["n"] += 1
            value = ((pred - target) ** 2).mean()
            return value * float("nan") if calls["n"] > 7 else value
        return loss

    monkeypatch.setitem(distill.LOSSES, "l2", poisoned)
    with pytest.raises(SystemExit) as stop:
        distill.main(train_args(cache, tmp_path, "--steps", "20", "--eval-every", "5", "--loss", "l2"))
    assert stop.value.code == 1
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == 5 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_distill_checkpoint_is_not_overwritten_without_resume(cache, tmp_path):
    distill.main(train_args(cache, tmp_path, "--steps", "5"))
    with pytest.raises(SystemExit) as stop:
        distill.main(train_args(cache, tmp_path, "--steps", "5"))
    assert stop.value.code == 2


def test_distill_ddp_two_processes_matches_single_process(cache, tmp_path):
    # long flag names: torchrun's own parser would take --d and --h as abbreviations of its options
    flags = [{"--d": "--depth", "--w": "--width", "--h": "--heads"}.get(f, f)
             for f in train_args(cache, tmp_path / "ddp", "--steps", "4", "--eval-every", "4")]
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                        "distill.py", *flags, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    distill.main(train_args(cache, tmp_path / "single", "--steps", "4", "--eval-every", "4"))
    a = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "single" / "ckpt.pt", weights_only=True)
    assert a["config"]["world"] == 2
    for name in b["model"]:  # same global batch, gradients averaged over ranks = one big batch
        assert torch.allclose(a["model"][name], b["model"][name], atol=1e-5), name


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C, or a scheduler ending the job
def test_distill_ctrl_c_saves_a_checkpoint(cache, tmp_path, stop):
    proc = subprocess.Popen([sys.executable, "distill.py", *train_args(cache, tmp_path, "--steps", "100000",
                                                                         "--log-every", "2")],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell starts background jobs with SIGINT ignored; give the run a terminal's Ctrl-C
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step "):
            break
    proc.send_signal(stop)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] >= 2 and "--resume" in out


def test_common_prefetched_batches_come_in_order_errors_surface_and_the_thread_stops():
    def make(step):
        if step == 5:
            raise RuntimeError("no batch 5")
        return (torch.tensor([step]),)
    batches = common.prefetched(make, range(3, 8), depth=2)
    assert [int(next(batches)[0]) for _ in range(2)] == [3, 4]
    with pytest.raises(RuntimeError, match="no batch 5"):  # raised in the training thread, at its step
        next(batches)
    batches = common.prefetched(lambda step: (torch.zeros(1),), range(10 ** 6), depth=2)
    next(batches)
    batches.close()  # the loop ended early (Ctrl-C, an error): the thread has stopped when close returns (a
    assert not any(t.name == "prefetch" for t in threading.enumerate())  # thread left in torch aborts the exit)
    batches = common.prefetched(make, range(3, 8), depth=1)
    next(batches)
    time.sleep(0.3)  # batch 4 fills the queue, then batch 5 fails with nowhere to go: close must still return
    batches.close()
    assert not any(t.name == "prefetch" for t in threading.enumerate())


def test_distill_ema_after_known_updates():
    assert [distill.ema_decay(s, 0.9999) for s in (0, 1, 8)] == [1 / 10, 2 / 11, 9 / 18]
    assert distill.ema_decay(10 ** 6, 0.9999) == 0.9999 and distill.ema_decay(5, 0.3) == 0.3
    model, ema = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    for m, v in ((model, 1.0), (ema, 0.0)):
        torch.nn.init.constant_(m.weight, v)
        torch.nn.init.constant_(m.bias, v)
    distill.ema_update(ema, model, 0.9)  # 0.9 * 0 + 0.1 * 1
    assert torch.allclose(ema.weight, torch.full((1, 2), 0.1))
    torch.nn.init.constant_(model.weight, 3.0)
    distill.ema_update(ema, model, 0.5)  # 0.5 * 0.1 + 0.5 * 3
    assert torch.allclose(ema.weight, torch.full((1, 2), 1.55)) and torch.allclose(ema.bias, torch.tensor([0.55]))
    assert model.weight.eq(3).all()  # the model is left alone


def test_distill_batches_drop_labels_at_the_rate_asked():
    n = 400
    pairs = data.Pairs(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 32, 32).clone(),
                       torch.arange(n) % 10, torch.zeros(n, 3, 32, 32))
    args = SimpleNamespace(batch=100, seed=3, label_dropout=0.1)
    dropped, seen = 0, []
    for step in range(8):  # two epochs
        z, y, _ = distill.batch_of_step(pairs, step, args)
        index = z[:, 0, 0, 0].long()  # which pairs this batch holds
        seen.append(index)
        kept = y != dit.NUM_CLASSES
        assert torch.equal(y[kept], index[kept] % 10)  # a label is either the pair's own or the null class
        dropped += (~kept).sum().item()
        again = distill.batch_of_step(pairs, step, args)[1]
        assert torch.equal(again, y)  # seeded by (seed, step): a resume drops the same labels
    assert 0.06 < dropped / 800 < 0.14  # 10% of 800 labels, binomial sd ~1%
    assert torch.equal(torch.cat(seen[:4]).sort().values, torch.arange(n))  # an epoch is a permutation
    assert not torch.equal(torch.cat(seen[:4]), torch.cat(seen[4:]))  # reshuffled every epoch
    for rate, expected in ((0.0, 0), (1.0, 100)):
        y = distill.batch_of_step(pairs, 0, SimpleNamespace(batch=100, seed=3, label_dropout=rate))[1]
        assert (y == dit.NUM_CLASSES).sum() == expected
    halves = [distill.batch_of_step(pairs, 5, args, rank, 2) for rank in (0, 1)]  # DDP: ranks split the batch
    whole = distill.batch_of_step(pairs, 5, args)
    for a, b in zip(whole, (torch.cat(t) for t in zip(*halves))):
        assert torch.equal(a, b)


def test_distill_fid_every_records_fid_in_results(cache, fid_cache, tmp_path, capsys):
    flags = train_args(cache, tmp_path, "--steps", "2", "--fid-every", "2", "--fid-n", "10",
                       "--inception", fid_cache["weights"], "--cifar", fid_cache["cifar"])
    distill.main(flags)
    out = capsys.readouterr().out
    assert "FID of 10 samples is not comparable" in out and "fid " in out
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["fid_n"] == 10 and record["fid_ref"] == "cifar10-train" and math.isfinite(record["fid"])
    assert record["ema"]["is_mean"] >= 1 - 1e-6
    # no weights: one line says why, and training goes on
    distill.main(train_args(cache, tmp_path / "none", "--steps", "1", "--fid-every", "1",
                            "--inception", str(tmp_path / "missing.pth")))
    assert "FID skipped: no FID Inception weights" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# sample.py

def test_sample_grid_and_npz(cache, tmp_path, capsys):
    distill.main(train_args(cache, tmp_path, "--steps", "2"))
    model, cfg = sample.load_model(str(tmp_path / "ckpt.pt"))
    assert cfg["width"] == 32 and not model.training
    images, labels = sample.generate(model, 25, batch=10)
    assert images.shape == (25, 32, 32, 3) and images.dtype == np.uint8 and list(labels[:11]) == list(range(10)) + [0]
    again, _ = sample.generate(model, 25, batch=7)
    assert np.array_equal(images, again)  # fixed seeds, whatever the batch
    sample.save_grid(model, str(tmp_path / "g.png"), per_class=3)
    assert Image.open(tmp_path / "g.png").size == (3 * 32, 10 * 32)
    pixels = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)  # [B,3,H,W]
    assert sample.to_uint8(pixels)[0, 0, :, 0].tolist() == [0, 128, 255, 255]  # EDM's x*127.5+128, clipped
    # --compare: the toy teacher's images for the same noise above each model's, a row each
    drawn = []
    real_teacher = toy.teacher_sample
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(toy, "teacher_sample", lambda z, y, *a: drawn.append((z, y)) or real_teacher(z, y, *a))
        toy.main(["--ckpt", str(tmp_path / "ckpt.pt"), str(tmp_path / "ckpt.pt"), "--compare",
                  str(tmp_path / "c.png"), "--per-class", "1"])
    assert Image.open(tmp_path / "c.png").size[0] > 10 * 32 and drawn[0][1].tolist() == list(range(10))
    assert "toy-lpips d2w32h4 seed 0, step 2" in capsys.readouterr().out  # a row says which run and how far it trained
    with pytest.raises(SystemExit):  # a grid samples one checkpoint
        sample.main(["--ckpt", str(tmp_path / "ckpt.pt"), str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "x.png")])


def test_sample_unconditional_pairs_use_the_null_class_in_every_tool(fid_cache, tmp_path, monkeypatch, capsys):
    """A model trained on GET-layout unconditional pairs records it in its checkpoint; then the training grid,
    the held-out eval, FID, sample.py (grid and .npz), fid.py --ckpt and bench.py --ckpt all sample it with the
    null class in one pass (no guidance), and an explicit guided request of it is refused."""
    root = write_get_folder(tmp_path / "uncond", n_files=2, per_file=12, conditional=False, image_dtype=torch.float64)
    seen, scales = [], []  # labels of every evaluation-mode forward pass, and every guidance scale, whoever asks
    real_forward, real_sample = dit.DiT.forward, dit.DiT.sample
    monkeypatch.setattr(dit.DiT, "forward", lambda self, z, y, return_hidden=False: (
        seen.append(y.clone()) if not self.training else None) or real_forward(self, z, y, return_hidden))
    monkeypatch.setattr(dit.DiT, "sample", lambda self, z, y, cfg_scale=1.5: scales.append(cfg_scale) or
                        real_sample(self, z, y, cfg_scale))
    out = tmp_path / "run"
    distill.main(["--data", str(root), "--holdout", "4", *TINY, "--loss", "l2", "--batch", "8", "--steps", "2",
                  "--out", str(out), "--fid-every", "2", "--fid-n", "10", "--inception", fid_cache["weights"],
                  "--cifar", fid_cache["cifar"]])
    ckpt, results = str(out / "ckpt.pt"), json.loads((out / "results.json").read_text())
    assert torch.load(ckpt, weights_only=True)["config"]["conditional"] is False
    assert results["conditional"] is False and results["fid_cfg_scale"] == 1 and "fid" in results
    assert seen and all((y == dit.NUM_CLASSES).all() for y in seen) and set(scales) == {1}  # eval, grid, FID
    seen.clear()
    scales.clear()
    sample.main(["--ckpt", ckpt, "--npz", str(tmp_path / "s.npz"), "--n", "12", "--batch", "5", "--device", "cpu"])
    sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "g.png"), "--per-class", "2", "--device", "cpu"])
    assert (np.load(tmp_path / "s.npz")["labels"] == dit.NUM_CLASSES).all()
    fid.main(["--ckpt", ckpt, "--n", "10", "--batch", "5", "--inception", fid_cache["weights"], "--cifar",
              fid_cache["cifar"], "--device", "cpu"])
    assert json.loads((out / "results.json").read_text())["fid_cfg_scale"] == 1
    measured = bench.main(["--ckpt", ckpt, "--modes", "fp32", *FAST])
    assert [r["cfg_scale"] for r in measured] == [1.0]
    assert seen and all((y == dit.NUM_CLASSES).all() for y in seen) and set(scales) == {1}  # one unguided pass
    capsys.readouterr()
    for script, argv in [("sample", ["--ckpt", ckpt, "--npz", str(tmp_path / "t.npz"), "--cfg-scale", "1.5"]),
                         ("fid", ["--ckpt", ckpt, "--cfg-scale", "1.5", "--inception", fid_cache["weights"]]),
                         ("bench", ["--ckpt", ckpt, "--cfg-scale", "1.5", *FAST]),
                         ("distill", ["--data", str(root), "--holdout", "4", *TINY, "--loss", "l2", "--cfg-scale",
                                      "1.5", "--out", str(tmp_path / "guided")])]:
        assert_refused(script, argv, "trained on unconditional pairs", capsys)
    assert_refused("toy", ["--ckpt", ckpt, "--compare", str(tmp_path / "c.png")], "learned from other pairs", capsys)


# ----------------------------------------------------------------------------------------------
# mi1.py and ta.py

def test_mi1_trajectory_targets():
    g = torch.Generator().manual_seed(0)
    z, x0 = torch.randn(4, 3, 32, 32, generator=g), torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    assert torch.equal(mi1.trajectory_point(z, x0, 0), x0)
    assert torch.allclose(mi1.trajectory_point(z, x0, 1), 80 * z / math.sqrt(1 + 80 ** 2), atol=1e-5)
    sigmas = toy.rho_schedule(torch.linspace(0, 1, 101, dtype=torch.float64))
    assert (sigmas.diff() > 0).all() and math.isclose(sigmas[0], 0.002) and math.isclose(sigmas[-1], 80)
    # mid-way: sigma is the 7th power of the mean of the end points' 7th roots, and x(t) the VP mix
    s = ((0.002 ** (1 / 7) + 80 ** (1 / 7)) / 2) ** 7
    assert math.isclose(toy.rho_schedule(0.5), s) and 2.5 < s < 2.53
    eps = z - x0 / 80
    mix = x0 / math.sqrt(1 + s * s) + s / math.sqrt(1 + s * s) * eps
    assert torch.allclose(mi1.trajectory_point(z, x0, 0.5), mix, atol=1e-6)
    # --sigma-min moves the schedule's image end (the paper's printed 0.02), not its noise end
    s02 = ((0.02 ** (1 / 7) + 80 ** (1 / 7)) / 2) ** 7
    assert math.isclose(toy.rho_schedule(0.0, 0.02), 0.02) and math.isclose(toy.rho_schedule(1.0, 0.02), 80)
    assert math.isclose(toy.rho_schedule(0.5, 0.02), s02) and s02 > s
    mix02 = (x0 + s02 * eps) / math.sqrt(1 + s02 * s02)
    assert torch.allclose(mi1.trajectory_point(z, x0, 0.5, sigma_min=0.02), mix02, atol=1e-6)


def test_mi1_every_mapped_layer_gets_gradient():
    torch.manual_seed(0)
    model = dit.DiT(6, 32, 4)
    for p in model.parameters():  # leave adaLN-Zero's zero start, which would block every gradient
        p.data.normal_(0, 0.05)
    args = mi1.get_parser().parse_args(["--d", "6", "--layers", "2,4,6", "--t", "0.66,0.33,0"])
    extra = mi1.MultiInOne(mi1.parse_mapping(args), lambda a, b: ((a - b) ** 2).mean())
    z, y, x = torch.randn(2, 3, 32, 32), torch.tensor([1, 10]), torch.rand(2, 3, 32, 32)
    pred, hidden = model(z, y, return_hidden=True)
    loss, terms = extra(model, z, y, x, pred, hidden)
    loss.backward()
    assert set(terms) == {"l2@t0.66", "l4@t0.33"}
    grads = [b.attn.qkv.weight.grad for b in model.blocks]
    assert all(g is not None and g.abs().sum() > 0 for g in grads[:4])  # blocks feeding layers 2 and 4
    assert all(g is None for g in grads[4:])  # blocks 5 and 6 only feed the final output (distill's term)
    assert model.final_layer.linear.weight.grad.abs().sum() > 0  # x_hat_l decodes through the final layer


def test_mi1_takes_a_budget_like_every_script():
    args = distill.resolve(mi1.get_parser().parse_args(["--params", "2.2M", "--layers", "3,7", "--t", "0.5,0"]))
    assert (args.depth, args.width, args.heads) == (7, 128, 8) and mi1.parse_mapping(args) == [(3, 0.5), (7, 0.0)]
    args = distill.resolve(mi1.get_parser().parse_args([]))
    assert (args.depth, args.width, args.heads) == (6, 64, 8)  # Table 4's 6-block student by default


@pytest.mark.parametrize("layers,times,phrase", [("3,5", "0.5,0", "final block"), ("4,2,6", "0.5,0.2,0", "increasing"),
                                                 ("3,6", "1.5,0", "in [0, 1]"), ("3,6", "0.5", "one time per"),
                                                 ("3,6", "0.5,0.1", "must be 0"), ("3,7", "0.5,0", "final block")])
def test_mi1_bad_mappings(layers, times, phrase):
    args = mi1.get_parser().parse_args(["--layers", layers, "--t", times])
    with pytest.raises(common.UsageError, match=re.escape(phrase)):
        mi1.parse_mapping(distill.resolve(args))


def test_mi1_runs_resumes_and_samples(cache, tmp_path):
    flags = toy_flags(cache) + ["--d", "4", "--w", "32", "--h", "4", "--layers", "2,4", "--t", "0.5,0", "--decay", "0",
                                "--batch", "16", "--log-every", "2", "--eval-every", "3"]
    mi1.main(flags + ["--out", str(tmp_path / "straight"), "--steps", "6"])
    mi1.main(flags + ["--out", str(tmp_path / "split"), "--steps", "3"])
    mi1.main(flags + ["--out", str(tmp_path / "split"), "--steps", "6", "--resume"])
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("straight", "split"))
    assert a["config"]["method"] == "mi1" and a["config"]["layers"] == "2,4"
    record = json.loads((tmp_path / "split" / "results.json").read_text())
    assert (record["method"], record["layers"], record["times"]) == ("mi1", "2,4", "0.5,0"), \
        "results.json should name the method's settings (MI1's layers and times), not only the method"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    model, _ = sample.load_model(str(tmp_path / "split" / "ckpt.pt"))
    assert sample.generate(model, 4)[0].shape == (4, 32, 32, 3)


@pytest.fixture(scope="session")
def ta_ckpt(cache, tmp_path_factory):
    """A tiny TA, distilled first like any student (wider and deeper than TINY's student)."""
    out = tmp_path_factory.mktemp("ta")
    distill.main(toy_flags(cache) + ["--d", "3", "--w", "48", "--h", "4", "--steps", "4", "--batch", "16",
                                     "--out", str(out)])
    return str(out / "ckpt.pt")


def test_ta_is_frozen_while_student_and_expansion_learn(ta_ckpt):
    teacher_assistant, _ = ta.load_ta(ta_ckpt, "cpu")
    for p in teacher_assistant.parameters():  # a TA with non-zero gates, so that every path carries gradient
        p.data.normal_(0, 0.05)
    before = {k: v.clone() for k, v in teacher_assistant.state_dict().items()}
    torch.manual_seed(0)
    student = dit.DiT(2, 32, 4)
    for p in student.parameters():
        p.data.normal_(0, 0.05)
    pairs = ta.parse_feature_layers("penultimate", 2, 3)
    extra = ta.TeachingAssistant(teacher_assistant, 32, pairs, (1.0, 1.0, 1.0), lambda a, b: (a - b).abs().mean())
    assert pairs == [(1, 2)] and "ta" not in extra.state_dict() and set(extra.state_dict()) == {
        "expand.0.weight", "expand.0.bias"}
    student_before, expand_before = student.state_dict()["blocks.0.attn.qkv.weight"].clone(), extra.expand[0].weight.clone()
    opt = torch.optim.AdamW(list(student.parameters()) + list(extra.parameters()), lr=1e-2)
    z, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 9, 10])
    pred, hidden = student(z, y, return_hidden=True)
    loss, terms = extra(student, z, y, torch.rand(4, 3, 32, 32), pred, hidden)
    loss.backward()
    opt.step()
    assert set(terms) == {"ta", "feat1:2"}
    assert all(p.grad is None for p in teacher_assistant.parameters()) and not teacher_assistant.training
    assert all(torch.equal(v, before[k]) for k, v in teacher_assistant.state_dict().items())
    assert not torch.equal(student.state_dict()["blocks.0.attn.qkv.weight"], student_before)
    assert not torch.equal(extra.expand[0].weight, expand_before)


@pytest.mark.parametrize("row", [[], ["--feature-weight", "1"], ["--teacher-weight", "1", "--feature-weight", "1"]])
def test_ta_table3_rows_run(cache, ta_ckpt, tmp_path, row):
    flags = train_args(cache, tmp_path, "--ta", ta_ckpt, "--steps", "3", "--eval-every", "3", *row)
    ta.main(flags)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["config"]["ta_design"] == [3, 48, 4] and state["step"] == 3
    assert bool(state["extra"]) == ("--feature-weight" in row)  # the expansion is saved with the student
    sample.load_model(str(tmp_path / "ckpt.pt"))


def test_ta_resumes_exactly_and_refuses_another_ta(cache, ta_ckpt, tmp_path):
    flags = ["--ta", ta_ckpt, "--feature-weight", "1", "--eval-every", "3"]
    ta.main(train_args(cache, tmp_path / "straight", *flags, "--steps", "6"))
    ta.main(train_args(cache, tmp_path / "split", *flags, "--steps", "3"))
    ta.main(train_args(cache, tmp_path / "split", *flags, "--steps", "6", "--resume"))
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("straight", "split"))
    for key in ("model", "extra"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    wider = tmp_path / "wider"
    distill.main(toy_flags(cache) + ["--d", "3", "--w", "64", "--h", "4", "--steps", "1", "--out", str(wider)])
    with pytest.raises(SystemExit) as stop:
        ta.main(train_args(cache, tmp_path / "split", "--ta", str(wider / "ckpt.pt"), "--feature-weight", "1",
                           "--steps", "8", "--resume"))
    assert stop.value.code == 2


# ----------------------------------------------------------------------------------------------
# bench.py

CPU = torch.device("cpu")
FAST = ["--device", "cpu", "--n", "4", "--batch", "4", "--repeats", "1", "--warmup", "0"]


@pytest.fixture(scope="module")
def bench_model():
    return bench.random_dit(2, 32, 4, seed=1)


def mode_images(bench_model, mode, cfg_scale=1.5, batch=6):
    """A mode's images and the plain fp32 model's, for the same noise and labels (incl. CFG's null class)."""
    z = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        run, z_buffer, y = bench.build(bench_model, bench.parse_mode(mode, CPU), cfg_scale, batch, CPU)
        z_buffer.copy_(z)
        return run().clone(), bench_model.sample(z, y, cfg_scale)


@pytest.mark.parametrize("mode,tolerance", [("lut", 1e-5), ("bf16", 5e-2), ("bf16+lut", 5e-2), ("fp16", 2e-2),
                                            ("bf16-weights+lut", 5e-2)])
@pytest.mark.parametrize("cfg_scale", [1.5, 1.0])
def test_bench_modes_match_fp32(bench_model, mode, tolerance, cfg_scale):
    images, reference = mode_images(bench_model, mode, cfg_scale)
    scale = reference.abs().max().item()
    assert scale > 0.1  # random weights: real images, not adaLN-Zero's zeros
    err = (images - reference).abs().max().item()
    assert err <= tolerance * scale, (mode, err, scale)
    if mode != "lut":  # reduced precision really ran (autocast silently disables unsupported dtypes)
        assert err > 1e-5 * scale, (mode, err)


def test_bench_compile_matches_fp32_on_cpu(bench_model):
    images, reference = mode_images(bench_model, "compile+lut", 1.5)
    assert (images - reference).abs().max().item() <= 1e-4 * reference.abs().max().item()


def test_bench_fold_shares_weights_and_leaves_the_model_intact(bench_model):
    folded = bench.fold_adaln(bench_model)
    assert folded.blocks[0].attn.qkv.weight is bench_model.blocks[0].attn.qkv.weight
    assert isinstance(bench_model.blocks[0].adaLN_modulation, torch.nn.Sequential)  # the DiT keeps its modulation
    assert folded.blocks[1].adaLN_modulation.table.shape == (dit.NUM_CLASSES + 1, 6 * 32)
    assert folded.final_layer.adaLN_modulation.table.shape == (dit.NUM_CLASSES + 1, 2 * 32)
    assert not hasattr(folded, "t_embedder") and hasattr(bench_model, "t_embedder")
    z, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 9, dit.NUM_CLASSES])  # incl. the null class
    with torch.no_grad():
        torch.testing.assert_close(folded(z, y), bench_model(z, y), atol=1e-5, rtol=0)


def test_bench_a_mode_that_differs_is_not_timed(bench_model, monkeypatch):
    def broken_fold(m):  # a fold that is wrong for one class: the check must catch it
        folded = real_fold(m)
        folded.final_layer.adaLN_modulation.table[3] += 0.5
        return folded
    real_fold = bench.fold_adaln
    monkeypatch.setattr(bench, "fold_adaln", broken_fold)
    with pytest.raises(bench.AccuracyError, match="differs from fp32"):
        bench.latency(bench_model, n=10, batch=10, mode="lut", device="cpu", repeats=1, warmup=0)


def test_bench_latency_reports_consistent_numbers(bench_model):
    for cfg_scale in (1.5, 1.0):  # the FLOPs it reports are dit.flops_per_image's (checked against torch's counter)
        r = bench.latency(bench_model, n=3, batch=3, mode="fp32", cfg_scale=cfg_scale, device="cpu", repeats=1,
                          warmup=0)
        assert r["gflop_per_image"] * 1e9 == dit.flops_per_image(bench_model.depth, bench_model.width, cfg_scale != 1)
    r = bench.latency((2, 32, 4), n=10, batch=4, mode="bf16+lut", cfg_scale=1.5, device="cpu", repeats=3, warmup=1)
    assert r["batches"] == 3 and r["design"] == [2, 32, 4] and r["params"] == dit.param_count(2, 32)
    assert r["seconds_min"] <= r["seconds"] <= r["seconds_max"]
    assert r["images_per_s"] == pytest.approx(10 / r["seconds"])
    assert r["ms_per_batch"] == pytest.approx(r["seconds"] / 3 * 1e3)
    assert r["seconds_per_50k"] == pytest.approx(r["seconds"] * 5000) and r["extrapolated"]
    assert r["tflops"] == pytest.approx(dit.flops_per_image(2, 32, cfg=True) * 10 / r["seconds"] / 1e12)
    assert 0 < r["max_err"] <= r["tolerance"] * r["image_scale"] and r["matmul_tflops"] > 0


def test_bench_onnx_export_matches_onnxruntime(bench_model, tmp_path):
    import onnx
    import onnxruntime
    path = str(tmp_path / "g.onnx")
    err = bench.export_onnx(bench_model, path, batch=4, cfg_scale=1.5)
    assert err is not None and err < 1e-4
    graph = onnx.load(path).graph
    assert [i.name for i in graph.input] == ["noise", "labels"]
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [4, 3, 32, 32]  # static batch
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    z = torch.randn(4, 3, 32, 32)
    (images,) = session.run(None, {"noise": z.numpy(), "labels": torch.tensor([1, 2, 3, 4], dtype=torch.int32).numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(images), bench_model.sample(z, torch.tensor([1, 2, 3, 4])),
                                   atol=1e-4, rtol=0)


def test_bench_onnx_cli_prints_trtexec(tmp_path, capsys):
    path = str(tmp_path / "m.onnx")
    bench.main(["--d", "1", "--w", "16", "--h", "2", "--device", "cpu", "--batch", "2", "--onnx", path])
    out = capsys.readouterr().out
    assert os.path.getsize(path) > 0 and f"trtexec --onnx={path}" in out and "max error" in out


def test_bench_default_modes_parse_on_every_device():
    for kind in ("cpu", "cuda", "mps"):
        for mode in bench.BASE_MODES[kind] + [bench.fastest_mode(torch.device(kind))]:
            assert bench.parse_mode(mode, torch.device(kind)).name == mode


def test_bench_compile_mode_defaults_and_graph_conflict():
    cuda = torch.device("cuda")  # parsing and choosing need no GPU
    assert bench.pick_compile_mode(None, bench.parse_mode("bf16-weights+lut+compile+graph", cuda), cuda) == \
        "max-autotune-no-cudagraphs"
    assert bench.pick_compile_mode(None, bench.parse_mode("compile", cuda), cuda) == "max-autotune"
    assert bench.pick_compile_mode(None, bench.parse_mode("compile", CPU), CPU) == "default"
    with pytest.raises(common.UsageError, match="makes its own CUDA graphs"):
        bench.pick_compile_mode("reduce-overhead", bench.parse_mode("lut+compile+graph", cuda), cuda)


@pytest.mark.parametrize("argv,phrase", [
    (["--device", "tpu"], "expected cuda, cuda:N, mps or cpu"),
    (["--device", "cuda"], "no CUDA device"),
    (["--n", "0"], "--n must be a positive integer"),
    (["--batch", "-3"], "--batch must be a positive integer"),
    (["--modes", "fp8"], "cannot read mode 'fp8'"),
    (["--modes", "tf32", "--device", "cpu"], "needs a CUDA device"),
    (["--modes", "lut+graph", "--device", "cpu"], "needs a CUDA device"),
    (["--modes", "bf16-weights", "--device", "cpu"], "need the LUT fold"),
    (["--d", "5", "--w", "60", "--h", "8", "--device", "cpu"], "not divisible by heads"),
    (["--ckpt", "missing.pt", "--device", "cpu"], "no checkpoint at missing.pt"),
    (["--train", "--sweep", "--device", "cpu"], "use it without --sweep"),
    (["--train", "--modes", "bf16+lut", "--device", "cpu"], "training modes are fp32 or bf16"),
    (["--train", "--lpips-size", "16", "--device", "cpu"], "--lpips-size"),
    (["--designs", "5,64,8", "--device", "cpu"], "add --sweep"),
    (["--sweep", "--designs", "5,64,8", "foo", "--device", "cpu"], "--designs"),
])
def test_bench_bad_flags_give_one_clear_error(argv, phrase, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "CUDA asked for on a CPU machine"
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and phrase in err and "Traceback" not in err


def test_bench_cli_error_is_one_paragraph_without_traceback():
    result = subprocess.run([sys.executable, "bench.py", "--n", "abc"], cwd=HERE, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "--n" in result.stderr
    result = subprocess.run([sys.executable, "bench.py", *FAST, "--d", "1", "--w", "16", "--modes", "lut"], cwd=HERE,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| lut | 1.5 |" in result.stdout and "| lut | 1 |" in result.stdout


# ----------------------------------------------------------------------------------------------
# study.py and study.sh

def test_bench_sweep_times_every_design_and_study_reports_them(tmp_path, capsys):
    timings = tmp_path / "sweep.json"
    rows = bench.main(["--sweep", "--device", "cpu", "--n", "2", "--batch", "2", "--repeats", "1", "--warmup", "0",
                       "--modes", "lut", "--json", str(timings)])
    expected = [(r.depth, r.width, r.heads) for r in bench.TABLE6]
    assert [tuple(r["design"]) for r in rows] == expected and json.loads(timings.read_text()) == rows
    assert rows[3]["name"] == "0.42M proposed" and rows[3]["jetson_s"] == 198.7 and rows[3]["paper_fid"] == 29.14
    # study.py: the timings alone -> the paper's FIDs as quality; with runs -> the runs' FIDs
    out, plot = tmp_path / "sweep.md", tmp_path / "fig.png"
    study.main(["--timings", str(timings), "--sweep-out", str(out), "--plot", str(plot)])
    table = out.read_text()
    for d, w, h in expected:
        assert table.count(f"| d{d}w{w}h{h} |") == 1
    assert "extrapolated" in table and "paper FID" in table and "FID (runs" not in table
    params = [int(line.split("|")[3].replace(",", "")) for line in table.splitlines()
              if line.startswith("| d") and not line.startswith("| design")]
    assert params == sorted(params), f"study.py's sweep table should list designs smallest first, not {params}"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = tmp_path / "run1"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"design": [5, 64, 8], "fid": 30.5, "ema": {"psnr": 14.0}}))
    (tmp_path / "other.json").write_text(json.dumps({"design": [2, 96, 8], "fid": 60.0, "ema": {"psnr": 11.0}}))
    study.main(["--timings", str(timings), "--sweep-out", str(out), "--plot", str(plot), "--runs-out",
                str(tmp_path / "records"), "--results", str(tmp_path / "run*" / "results.json"),
                str(tmp_path / "other.json")])
    table = out.read_text()
    assert "FID (runs" in table and "| d5w64h8 | 0.42M proposed | 421,068 |" in table
    assert "| 30.50 | 14.00 |" in table and "| 60.00 | 11.00 |" in table  # FID, then PSNR
    # seed repeats of a design: the mean and their spread
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "results.json").write_text(json.dumps({"design": [5, 64, 8], "fid": 31.5, "ema": {}}))
    study.main(["--timings", str(timings), "--sweep-out", str(out), "--plot", str(plot), "--results",
                str(tmp_path / "run*" / "results.json")])
    assert "| 31.00 +- 0.71 (2 runs) | 14.00 |" in out.read_text()
    record = json.loads((tmp_path / "records" / "run1.json").read_text())
    assert record["fid"] == 30.5 and record["latency"]["images_per_s"] == rows[3]["images_per_s"]
    (tmp_path / "untimed.json").write_text(json.dumps({"design": [3, 48, 4], "ema": {"psnr": 11.0}}))
    for argv, phrase in ((["--results", str(tmp_path / "untimed.json")], "no latency for the runs' designs d3w48h4"),
                         (["--results", str(tmp_path / "none*.json")], "matches no file"),
                         (["--runs-out", str(tmp_path / "r")], "give --results too")):
        with pytest.raises(SystemExit) as stop:
            study.main(["--timings", str(timings), "--sweep-out", str(out), "--plot", str(plot), *argv])
        assert stop.value.code == 2 and phrase in capsys.readouterr().err


def test_pick_candidates_are_the_rules_designs_with_head_layouts_and_their_neighbours():
    cands = pick.candidates(dit.parse_params("0.5M"), grid=[(2, 96, 8), (9, 48, 6), (7, 192, 12)])
    names = [pick.name(c) for c in cands]
    assert len(names) == len(set(names)) and all(c.params <= 500_000 for c in cands)
    rules = {pick.name(c) for c in cands if c.rules}
    assert {"d5w64h8", "d5w64h4", "d5w64h8-8-4-4-2", "d6w64h8", "d4w48h6", "d5w32h4"} <= rules
    assert {"d2w96h8", "d9w48h6", "d6w48h6", "d4w64h8"} <= set(names) - rules  # the grid and the neighbours
    assert "d7w192h12" not in names  # over the budget
    assert pick.halving_heads(5, 64, 8) == (8, 8, 4, 4, 2), "heads halve toward the output in three groups of blocks"
    assert pick.halving_heads(7, 192, 12) == (12, 12, 12, 6, 6, 6, 3)
    assert pick.halving_heads(5, 48, 6) == (6, 6, 3, 3, 3), "a block keeps its heads where half does not divide w"


def test_pick_cli_lists_the_candidates_and_refuses_a_budget_too_small(capsys):
    cands = pick.main(["--max-params", "0.5M"])
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == len(cands) and "d5w64h8: 421,068 parameters, a rules' design" in out, out
    for argv, phrase in [(["--max-params", "50k"], "no candidate design has at most 50,000"),
                         (["--mlp-ratio", "0"], "--mlp-ratio must be")]:
        with pytest.raises(SystemExit) as stop:
            pick.main(argv)
        assert stop.value.code == 2 and phrase in capsys.readouterr().err, argv


def test_pick_front_and_choice_follow_size_then_latency():
    C = pick.Candidate
    cands = [C(5, 64, 8, 4, 421_068, True), C(5, 64, 4, 4, 421_068, True), C(4, 48, 6, 4, 202_188, True),
             C(2, 96, 8, 4, 415_308, False), C(6, 64, 8, 4, 495_756, True)]
    ms = {"d5w64h8": 3.0, "d5w64h4": 2.0, "d4w48h6": 1.0, "d2w96h8": 2.5, "d6w64h8": 4.0}
    assert pick.pareto_front(cands, ms) == {"d4w48h6", "d5w64h4", "d6w64h8"}, \
        "on the front: no other candidate has at least as many parameters and at most the latency"
    assert pick.name(pick.choose(cands, ms, max_ms=3.5)) == "d5w64h4", "most parameters within the budget, then fastest"
    assert pick.name(pick.choose(cands, ms, max_ms=4.0)) == "d6w64h8"
    assert pick.name(pick.choose(cands, ms, max_ms=1.0)) == "d4w48h6"
    ms["d2w96h8"] = 0.1  # a faster design that is not a rules' one is shown, never picked
    with pytest.raises(ValueError, match="the fastest, d4w48h6 .* takes 1 ms"):
        pick.choose(cands, ms, max_ms=0.5)


def test_bench_pick_times_each_candidate_once_caches_it_and_refuses_an_impossible_budget(tmp_path, monkeypatch,
                                                                                         capsys):
    cache = tmp_path / "not yet made"  # a fresh clone has no cache folder: --pick makes it
    monkeypatch.setattr(common, "CACHE_DIR", str(cache))
    argv = ["--pick", "--max-params", "0.12M", "--max-ms", "1000", "--device", "cpu", "--n", "2", "--batch", "2",
            "--repeats", "1", "--warmup", "0", "--modes", "lut"]
    (best,) = bench.main(argv)
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("pick: (d, w, h) = (5, 32, "), out
    assert best["params"] == dit.param_count(5, 32) and "| yes |" in out and "Pareto front" in out
    timed = json.loads((cache / "latency_cache.json").read_text())
    assert len(timed) == len(pick.candidates(120_000, [(r.depth, r.width, r.heads) for r in bench.TABLE6]))

    def no_timing(*args, **kwargs):
        raise AssertionError("a second --pick with the same setting must read the cache, not time again")
    monkeypatch.setattr(bench, "latency", no_timing)
    assert bench.main(argv) == [best]
    assert f"{len(timed)} candidates, {len(timed)} in the cache" in capsys.readouterr().out
    for flags, phrase in [(["--max-ms", "1e-9"], "Raise --max-ms to at least"),
                          (["--max-params", "50k"], "no candidate design has at most 50,000"),
                          (["--max-ms", "-1"], "--max-ms must be"), (["--max-params", "lots"], "cannot read")]:
        bad = list(argv)
        for flag, value in zip(flags[::2], flags[1::2]):
            bad[bad.index(flag) + 1] = value
        with pytest.raises(SystemExit) as stop:
            bench.main(bad)
        assert stop.value.code == 2 and phrase in capsys.readouterr().err, flags
    for flags, phrase in [(["--pick", "--max-params", "5M"], "needs both budgets"), (["--max-ms", "3"], "add --pick"),
                          (["--pick", "--max-params", "5M", "--max-ms", "3", "--sweep"], "without --sweep")]:
        with pytest.raises(SystemExit) as stop:
            bench.main(flags + ["--device", "cpu"])
        assert stop.value.code == 2 and phrase in capsys.readouterr().err, flags


@pytest.mark.parametrize("script, settings", [
    ("knobs.sh", [("SEEDS=0 x", "each seed must be an integer"), ("STEPS=-5", "STEPS=-5 must be"),
                  ("PYTHON=/no/python", "PYTHON=/no/python")]),
    ("methods.sh", [("SEEDS=0 x", "each seed must be an integer"), ("PYTHON=/no/python", "PYTHON=/no/python"),
                    ("ONLY=t3-9-nothing", "unknown row 't3-9-nothing'")])])
def test_quick_recipe_scripts_refuse_bad_settings(tmp_path, script, settings):
    for setting, phrase in settings:
        key, value = setting.split("=", 1)
        env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "runs"), RESULTS=str(tmp_path / "results"))
        r = subprocess.run(["bash", script], cwd=HERE, capture_output=True, text=True, timeout=60,
                           env=dict(env, **{key: value}))
        assert r.returncode == 2 and r.stderr.startswith("error: ") and phrase in r.stderr, (script, setting, r.stderr)
    assert not os.path.exists(tmp_path / "runs")


def test_methods_sh_runs_each_row_per_seed_and_goes_on_from_committed_records(tmp_path):
    """methods.sh's bookkeeping, with a stand-in for Python that writes each run's results.json at once: the
    assistant first, every row once per seed, one table row per row; then a fresh clone (records only) reruns
    nothing but the assistant, whose checkpoint the TA rows load; empty SEEDS with a TA row trains the assistant
    alone."""
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(f"""#!{sys.executable}
import json, os, sys
script, args = sys.argv[1], sys.argv[2:]
if script == "study.py":
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
with open({str(calls)!r}, "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
value = lambda flag: args[args.index(flag) + 1]
record = dict(design=[int(value(k)) for k in ("--d", "--w", "--h")], method=script[:-3], loss="toy-lpips", step=900,
              ema=dict(toy_fid_best=100.0 + int(value("--seed"))))
json.dump(record, open(os.path.join(value("--out"), "results.json"), "w"))
""")
    stub.chmod(0o755)
    env = dict(os.environ, PYTHON=str(stub), SEEDS="0 1", OUT=str(tmp_path / "runs"), RESULTS=str(tmp_path / "res"))
    run = lambda **extra: subprocess.run(["bash", "methods.sh"], cwd=HERE, capture_output=True, text=True, timeout=300,
                                         env=dict(env, **extra))
    first = run()
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    lines = calls.read_text().splitlines()
    assert len(lines) == 1 + 7 * 2 and lines[0].startswith("distill.py --d 7 --w 128 --h 8 --batch 128"), lines[:2]
    assert sum(line.startswith("ta.py --ta ") for line in lines) == 6 and sum("mi1.py" in line for line in lines) == 4
    table = (tmp_path / "res" / "methods.md").read_text()
    assert "| t3-2-ta | d5w64h8 | ta | 2 | 100.50 +- 0.71 |" in table, table
    assert "| t3-0-assistant | d7w128h8 | distill | 1 |" in table
    assert "| t4-3-layers-2-4-6 | d6w64h8 | mi1 | 2 |" in table
    assert (tmp_path / "res" / "t4-2-layers-3-6_s1.json").exists(), "methods.sh keeps no record of a finished run"
    shutil.rmtree(tmp_path / "runs")  # a fresh clone: the records only
    calls.unlink()
    again = run()
    assert again.returncode == 0 and again.stdout.count("finished, skipped") == 14, again.stdout[-2000:]
    assert calls.read_text().startswith("distill.py --d 7 --w 128") and len(calls.read_text().splitlines()) == 1, \
        "a fresh clone should retrain only the assistant (its checkpoint is not in the records)"
    assert "| t3-2-ta | d5w64h8 | ta | 2 | 100.50 +- 0.71 |" in (tmp_path / "res" / "methods.md").read_text()
    calls.unlink()
    assert run(ONLY="t4-2-layers-3-6", SEEDS="2").returncode == 0
    seed0 = next(line for line in lines if "mi1.py" in line and "--layers 3,6" in line)
    assert calls.read_text().splitlines() == [seed0.replace("--seed 0", "--seed 2").replace("_s0", "_s2")]
    shutil.rmtree(tmp_path / "runs")
    calls.unlink()
    assert run(ONLY="t3-2-ta", SEEDS="").returncode == 0
    assert calls.read_text().splitlines() == lines[:1], "SEEDS= with a TA row should train the assistant alone"


def test_study_compare_out_gives_each_run_setup_one_row_over_its_seeds(tmp_path, capsys):
    for run, method, fid_value in (("t3-1-baseline_s0", "distill", 40.0), ("t3-1-baseline_s1", "distill", 44.0),
                                   ("t3-2-ta_s0", "ta", 50.0)):
        (tmp_path / run).mkdir()
        (tmp_path / run / "results.json").write_text(json.dumps({"design": [5, 64, 8], "method": method, "step": 900,
                                                                "ema": {"toy_fid_best": fid_value}}))
    out = tmp_path / "methods.md"
    study.main(["--results", str(tmp_path / "t3-*" / "results.json"), "--compare-out", str(out), "--runs-out",
                str(tmp_path / "records")])
    record = json.loads((tmp_path / "records" / "t3-2-ta_s0.json").read_text())
    assert record["run"] == "t3-2-ta_s0" and record["ema"]["toy_fid_best"] == 50.0 and "latency" not in record
    rows = [line for line in out.read_text().splitlines() if line.startswith("| t3-")]
    assert rows == ["| t3-1-baseline | d5w64h8 | distill | 2 | 42.00 +- 2.83 |",
                    "| t3-2-ta | d5w64h8 | ta | 1 | 50.00 |"], \
        f"study.py --compare-out should give one row per run setup (seeds pooled: mean +- sd), by name; got {rows}"
    for argv, phrase in ((["--compare-out", str(out)], "give them with --results"),
                         (["--results", str(tmp_path / "t3-*" / "results.json")], "--timings is needed")):
        with pytest.raises(SystemExit) as stop:
            study.main(argv)
        assert stop.value.code == 2 and phrase in capsys.readouterr().err


def test_study_tells_apart_designs_that_differ_only_in_heads_per_block_or_mlp_ratio(tmp_path):
    timings = tmp_path / "sweep.json"
    names = ["d5w64h8", "d5w64h8-8-4-4-2", "d5w64h8r2"]
    rows = bench.main(["--sweep", "--device", "cpu", "--n", "2", "--batch", "2", "--repeats", "1", "--warmup", "0",
                       "--modes", "lut", "--designs", "5,64,8", *names[1:], "--json", str(timings)])
    assert [r["design"] for r in rows] == [[5, 64, 8], [5, 64, [8, 8, 4, 4, 2]], [5, 64, 8]]
    assert [r["params"] for r in rows] == [421_068, 421_068, dit.param_count(5, 64, 2)] and rows[2]["mlp_ratio"] == 2
    for name, design, ratio, fid_value in zip(names, ([5, 64, 8], [5, 64, [8, 8, 4, 4, 2]], [5, 64, 8]), (4, 4, 2),
                                              (30.0, 40.0, 50.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"design": design, "mlp_ratio": ratio,
                                                                  "fid": fid_value, "ema": {}}))
    out = tmp_path / "sweep.md"
    study.main(["--timings", str(timings), "--sweep-out", str(out), "--plot", str(tmp_path / "fig.png"),
                "--results", str(tmp_path / "d5*" / "results.json")])
    table = out.read_text()
    for name, fid_value in zip(names, ("30.00", "40.00", "50.00")):
        assert table.count(f"| {name} |") == 1 and f"| {fid_value} |" in table.split(f"| {name} |")[1].split("\n")[0], \
            f"study.py's table mixes up the runs of {name} with another design's: each design's own FID belongs on its row"


def test_study_runs_records_and_skips_finished_runs(cache, tmp_path):
    """study.sh end to end on two tiny runs: one record per run with its latency, the L1 run kept out of
    its design's quality point; a second call skips both, one finished in OUT and one by its record alone."""
    env = dict(STEPS="3", BATCH="8", EVERY="1", OUT=str(tmp_path / "runs"), RESULTS=str(tmp_path / "results"),
               ONLY="d5w64h8_toy-lpips d5w64h8_l1", BENCH_N="2", PYTHON=sys.executable,
               TORCH_HOME=str(tmp_path / "torch_home"))  # an empty hub cache, whatever this machine has
    argv = ["bash", "study.sh", *toy_flags(cache)]
    first = subprocess.run(argv, cwd=HERE, capture_output=True, text=True, env=dict(os.environ, **env), timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    records = {name: json.loads((tmp_path / "results" / f"{name}.json").read_text())
               for name in ("d5w64h8_toy-lpips", "d5w64h8_l1")}
    for name, r in records.items():
        assert r["run"] == name and r["design"] == [5, 64, 8] and r["step"] == 3 and r["batch"] == 8
        assert r["param_count"] == dit.param_count(5, 64) and r["wall_s"] > 0 and r["hardware"]
        assert r["ema"]["psnr"] > 0 and r["class_mean"]["psnr"] > 0
        assert r["ema"]["toy_fid"] > 0 and 0 <= r["ema"]["toy_acc"] <= 1 and r["teacher"]["toy_fid"] >= 0
        assert 0 <= r["ema"]["toy_mode"] <= 1 and r["ema"]["toy_fid_best"] > 0 and r["ema"]["cfg_best"] >= 1
        assert r["latency"]["mode"] == "lut" and r["latency"]["ms_per_image"] > 0
    assert records["d5w64h8_l1"]["loss"] == "l1" and records["d5w64h8_toy-lpips"]["loss"] == "toy-lpips"
    table = (tmp_path / "results" / "sweep.md").read_text()
    main = records["d5w64h8_toy-lpips"]["ema"]
    assert table.count("| d5w64h8 |") == 1 and "toy FID at its best CFG (runs" in table  # the quality axis
    assert "Runs (2): steps 3, batch 8, lr 0.002, warm-up 100, final decay 400, gradient clip 1, loss " in table
    assert " Rows: loss toy-lpips, method distill (1 of the runs)." in table, \
        "sweep.md's recipe line lists both losses but does not say its rows average only the toy-lpips run"
    assert (f"| {main['toy_fid_best']:.2f} | {main['cfg_best']:.2f} | {main['toy_fid']:.2f} | "
            f"{main['toy_acc']:.3f} | {main['toy_mode']:.3f} | {main['psnr']:.2f} |") in table  # not the L1 run's
    assert (tmp_path / "results" / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "results" / "guidance.png").read_bytes()[:4] == b"\x89PNG"  # toy FID against the scale
    curve = records["d5w64h8_toy-lpips"]["curve"]  # the run's record holds its training curve too
    assert [c["step"] for c in curve] == [1, 2, 3] and curve[-1]["toy_fid_best"] == main["toy_fid_best"]
    (tmp_path / "results" / "sweep.md").unlink()
    shutil.rmtree(tmp_path / "runs" / "d5w64h8_toy-lpips")  # as in a fresh clone: this run's record only
    env["ONLY"] = "d5w64h8_l1 d5w64h8_toy-lpips"  # one finished in OUT, one by its record in RESULTS
    second = subprocess.run(argv, cwd=HERE, capture_output=True, text=True, env=dict(os.environ, **env), timeout=900)
    assert second.returncode == 0 and second.stdout.count("finished, skipped") == 2, second.stdout[-2000:]
    assert "config:" not in second.stdout, "study.sh retrained a finished run (in OUT, or by its record in RESULTS)"
    assert "Runs (2): " in (tmp_path / "results" / "sweep.md").read_text()
    again = json.loads((tmp_path / "results" / "d5w64h8_toy-lpips.json").read_text())
    assert again["run"] == "d5w64h8_toy-lpips" and again["curve"] == curve, "a record passed back in lost its curve"
    for setting, recorded in (("BATCH", "(batch 8)"), ("DECAY", "(decay 400)")):  # another recipe than the records':
        third = subprocess.run(argv, cwd=HERE, capture_output=True, text=True, timeout=900,  # refused, not skipped
                               env=dict(os.environ, **dict(env, ONLY="", **{setting: "4"})))
        assert third.returncode == 2 and "another recipe" in third.stderr and recorded in third.stderr, third.stderr
        assert "config:" not in third.stdout and "skipped" not in third.stdout


def test_bench_train_times_distills_own_step(tmp_path, monkeypatch):
    calls = []
    real_step = distill.train_step
    monkeypatch.setattr(distill, "train_step", lambda *a: calls.append(a[-1]) or real_step(*a))
    rows = bench.main(["--train", "--d", "1", "--w", "16", "--h", "2", "--lpips-size", "32", "--batch", "2",
                       "--repeats", "2", "--warmup", "1", "--device", "cpu", "--modes", "fp32",
                       "--json", str(tmp_path / "t.json")])
    (r,) = rows
    assert calls == [0, 1, 2, 3]  # warm-up, two timed steps, the finite-loss check: distill.py's step itself
    assert r["loss"] == "lpips" and r["batch"] == 2 and r["design"] == [1, 16, 2] and r["mode"] == "fp32"
    assert r["seconds_min"] <= r["seconds_per_step"] <= r["seconds_max"]
    assert math.isclose(r["images_per_s"], 2 / r["seconds_per_step"])
    assert math.isclose(r["paper_training_hours"], 100 * 1_000_000 / r["images_per_s"] / 3600)
    assert json.loads((tmp_path / "t.json").read_text()) == rows


def test_bench_loader_times_distills_batches(tmp_path, monkeypatch):
    root = write_get_folder(tmp_path / "pairs", n_files=3, per_file=6)
    steps = []
    real_batch = distill.batch_of_step
    monkeypatch.setattr(distill, "batch_of_step", lambda pairs, step, *a, **k: steps.append(step) or
                        real_batch(pairs, step, *a, **k))
    (r,) = bench.main(["--loader", str(root), "--batch", "4", "--n", "12", "--json", str(tmp_path / "l.json")])
    assert steps == [0, 1, 2]  # distill.py's own batches, in its order
    assert r["pairs"] == 17 and r["batch"] == 4 and r["batches"] == 3  # 18 pairs less the held-out one
    assert 0 < r["ms_per_batch"] <= r["ms_max"] and 0 < r["batches_per_s"] <= 1e3 / r["ms_mean"]
    assert r["peak_rss_mib"] >= r["rss_mib"] > 0
    assert json.loads((tmp_path / "l.json").read_text()) == [r]


# ----------------------------------------------------------------------------------------------
# fid.py

def pytorch_fid_network(state):
    """pytorch-fid's FID Inception built the way its fid_inception_v3() builds it, without the download."""
    net = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b = pytorch_fid_inception.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pytorch_fid_inception.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pytorch_fid_inception.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pytorch_fid_inception.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pytorch_fid_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pytorch_fid_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pytorch_fid_inception.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pytorch_fid_inception.FIDInceptionE_1(1280)
    net.Mixed_7c = pytorch_fid_inception.FIDInceptionE_2(2048)
    net.load_state_dict(state)  # strict: the key names must be the same
    return net.eval()


def torchvision_pool3_and_logits(net, x):
    pooled = []
    hook = net.avgpool.register_forward_hook(lambda module, inp, out: pooled.append(out.flatten(1)))
    logits = net(x)  # eval mode: the fc output, with its bias
    hook.remove()
    return pooled[0], logits


# ----------------------------------------------------------------------------------------------
# The network

def test_fid_inception_matches_pytorch_fid():
    state = random_inception_state()
    ours = fid.FIDInception().eval()
    ours.load_state_dict(state)
    theirs = pytorch_fid_network(state)
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(1)) * 2 - 1  # already 299, on [-1,1]
    with torch.no_grad():
        pool3, logits = ours(x)
        ref_pool3, ref_logits = torchvision_pool3_and_logits(theirs, x)
        # control: torchvision's own Inception blocks (average pools counting the padding, no max pool in
        # Mixed_7c) with the same weights must give other features, or this test could not tell them apart
        plain = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
        plain.load_state_dict(state)
        plain_pool3, _ = torchvision_pool3_and_logits(plain.eval(), x)
    assert pool3.shape == (2, 2048) and logits.shape == (2, 1008)
    assert 0.1 < pool3.std() < 100  # well-scaled features, so the tolerances below mean something
    torch.testing.assert_close(pool3, ref_pool3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits + state["fc.bias"], ref_logits, rtol=1e-5, atol=1e-4)  # ours: bias-free
    assert (plain_pool3 - ref_pool3).abs().max() > 1e-2


def test_fid_tf1_resize_hand_cases():
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]])[None, None]
    # 2 -> 4: src = 0, 0.5, 1, 1.5; the last two clamp to the border pixel
    expected = torch.tensor([[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30.0]])
    assert torch.equal(fid.tf1_resize(x, 4)[0, 0], expected)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(fid.tf1_resize(x, 2)[0, 0], torch.tensor([[0.0, 2], [8, 10]]))  # src 0, 2: no averaging
    x = torch.tensor([0.0, 10, 20])[None, None, None].expand(1, 1, 3, 3)
    assert torch.equal(fid.tf1_resize(x, 2)[0, 0, 0], torch.tensor([0.0, 15]))      # src 0, 1.5
    x = torch.rand(1, 3, 299, 299) * 255
    assert torch.equal(fid.tf1_resize(x), x)                                         # same size: identity


def test_fid_tf1_resize_matches_its_definition_and_differs_from_pytorch_fids():
    img = (torch.rand(7, 5, generator=torch.Generator().manual_seed(2)) * 255).numpy()
    size = 13
    ref = np.empty((size, size), np.float32)
    f32 = np.float32
    for i in range(size):  # TF1's kernel, pixel by pixel, in float32
        fy = f32(i) * (f32(7) / f32(size))
        y0 = int(np.floor(fy))
        y1, wy = min(y0 + 1, 6), fy - f32(y0)
        for j in range(size):
            fx = f32(j) * (f32(5) / f32(size))
            x0 = int(np.floor(fx))
            x1, wx = min(x0 + 1, 4), fx - f32(x0)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * wx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * wx
            ref[i, j] = top + (bottom - top) * wy
    np.testing.assert_allclose(fid.tf1_resize(torch.from_numpy(img)[None, None], size)[0, 0].numpy(), ref,
                               rtol=1e-6, atol=1e-4)
    x = torch.rand(1, 3, 32, 32) * 255
    pytorch_fids = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert (fid.tf1_resize(x) - pytorch_fids).abs().max() > 1


# ----------------------------------------------------------------------------------------------
# Statistics, FID, IS

def test_fid_statistics_are_float64_mean_and_unbiased_covariance():
    f = np.random.default_rng(0).standard_normal((25000, 3)).astype(np.float32) * [1, 2, 3] + 5
    mu, sigma = fid.statistics(f)  # 25k rows: three chunks
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False, ddof=1), rtol=1e-9)


def test_fid_of_a_set_with_itself_is_zero():
    f = np.random.default_rng(1).standard_normal((1000, 64)) @ np.random.default_rng(2).standard_normal((64, 64))
    mu, sigma = fid.statistics(f)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_fid_closed_forms():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    a, b = rng.uniform(0.1, 4, 6), rng.uniform(0.1, 4, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))  # commuting, not diagonal: same eigenvectors
    assert fid.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T) == pytest.approx(expected,
                                                                                                      rel=1e-8)
    # from samples of two Gaussians: the statistics and the distance together
    x = mu1[:3] + rng.standard_normal((200000, 3)) * np.sqrt(a[:3])
    y = mu2[:3] + rng.standard_normal((200000, 3)) * np.sqrt(b[:3])
    expected3 = ((mu1[:3] - mu2[:3]) ** 2).sum() + ((np.sqrt(a[:3]) - np.sqrt(b[:3])) ** 2).sum()
    assert fid.frechet_distance(*fid.statistics(x), *fid.statistics(y)) == pytest.approx(expected3, rel=0.03)


def test_fid_rejects_a_complex_square_root():
    with pytest.raises(common.UsageError, match="imaginary"):
        fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))  # sqrt(-1) on the diagonal


def test_fid_inception_score():
    mean, std = fid.inception_score(np.zeros((100, 1008)))  # p(y|x) = p(y): no information
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    logits = 100 * np.eye(1008)[:1000]  # 1000 confident, distinct classes: each split of 100 scores 100
    mean, std = fid.inception_score(logits)
    assert mean == pytest.approx(100, rel=1e-6) and std < 1e-6


# ----------------------------------------------------------------------------------------------
# Weights: missing, undownloadable, wrong

def test_fid_missing_or_undownloadable_weights_say_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    ok, why = fid.inception_available()
    assert not ok and fid.WEIGHTS_URL in why and "--inception" in why
    with pytest.raises(common.UsageError, match="--inception") as e:
        fid.load_inception(download=False)
    assert fid.WEIGHTS_URL in str(e.value)

    def offline(url, dst, hash_prefix=None, **kw):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(common.UsageError, match="network is unreachable") as e:
        fid.load_inception()
    assert fid.WEIGHTS_URL in str(e.value) and "--inception" in str(e.value)
    monkeypatch.setattr(common, "CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(common.UsageError, match="--cifar") as e:
        fid.cifar_tarball()
    assert fid.CIFAR_URL in str(e.value)


# ----------------------------------------------------------------------------------------------
# End to end: FID of images, folders, checkpoints against a fake CIFAR-10

@pytest.fixture(scope="module")
def train_vs_train(world):
    """The fake CIFAR-10 train images, as a folder of PNGs, against the CIFAR-10 train statistics (computed from
    the tarball and cached in the world's folder on the way)."""
    png_dir = world["dir"] / "train_png"
    png_dir.mkdir()
    for i, img in enumerate(world["cifar_train"]):
        Image.fromarray(img).save(png_dir / f"{i:05d}.png")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "CACHE_DIR", world["cache"])
        result = run_fid(world, "--images", str(png_dir), "--ref", "train")
    return result, out.getvalue(), err.getvalue()


def test_fid_loaders_agree_on_the_same_images(world, tmp_path):
    nhwc = world["cifar_train"]
    assert torch.equal(fid.read_cifar(world["cifar"], "train"), torch.from_numpy(nhwc).permute(0, 3, 1, 2))
    np.savez(tmp_path / "a.npz", images=nhwc)
    for i, img in enumerate(nhwc):
        Image.fromarray(img).save(tmp_path / f"{i:05d}.png")
    assert torch.equal(fid.load_png_folder(str(tmp_path)), fid.load_npz_images(str(tmp_path / "a.npz")))
    assert fid.read_cifar(world["cifar"], "test").shape == (10, 3, 32, 32)


def test_fid_train_images_against_train_statistics_give_zero_and_are_cached(world, train_vs_train):
    result, out, err = train_vs_train
    assert abs(result["fid"]) < 1e-3, result
    assert 1 <= result["is_mean"] < 1008
    assert "not the official CIFAR-10 tarball" in err and "not comparable with published" in out
    weights_id, tar_md5 = common.file_digest(world["weights"])[:8], common.file_digest(world["cifar"], "md5")[:8]
    files = [f for f in os.listdir(world["cache"]) if f.startswith("fid_ref")]  # (other tests cache toy pairs there)
    assert files == [f"fid_ref_cifar10_train_inception-{weights_id}_tar-{tar_md5}.npz"], files  # no temp file left
    with np.load(os.path.join(world["cache"], files[0])) as f:
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048) and int(f["n"]) == 10


def test_fid_checkpoint_uses_ema_seeds_and_cache_and_merges_results_json(fid_cache, train_vs_train, monkeypatch,
                                                                         capsys):
    world = fid_cache
    # the train statistics must come from the cache now: reading CIFAR-10 again fails the test
    monkeypatch.setattr(fid, "read_cifar", lambda *a: pytest.fail("the cached statistics were not used"))
    seen = []
    real_features = fid.features_and_logits
    monkeypatch.setattr(fid, "features_and_logits", lambda net, images, *a: seen.append(images) or
                        real_features(net, images, *a))
    results = os.path.join(os.path.dirname(world["ckpt"]), "results.json")
    with open(results, "w") as f:
        json.dump({"step": 20, "ema": {"psnr": 14.0}}, f)
    capsys.readouterr()
    result = run_fid(world, "--ckpt", world["ckpt"], "--n", "10")
    # the images measured are sample.py --npz's: EMA weights, seed 0, labels i % 10
    assert len(seen) == 1 and np.array_equal(seen[0], np.load(world["npz"])["images"])
    assert math.isfinite(result["fid"]) and result["fid"] > 1e-3 and 1 <= result["is_mean"] < 1008
    with open(results) as f:
        record = json.load(f)
    assert record["step"] == 20 and record["ema"] == {"psnr": 14.0}  # merged, not overwritten
    assert {k: record[k] for k in result} == result
    assert record["fid_n"] == 10 and record["fid_ref"] == "cifar10-train" and record["fid_cfg_scale"] == 1.5
    out = capsys.readouterr().out
    assert f"FID {result['fid']:.3f}" in out and "merged into" in out and "not comparable" in out


# ----------------------------------------------------------------------------------------------
# Bad input: one message, exit code 2

def bad_inputs(d, world):
    np.savez(d / "float.npz", images=np.zeros((10, 32, 32, 3), np.float32))
    np.savez(d / "gray.npz", images=np.zeros((10, 32, 32), np.uint8))
    (d / "empty").mkdir()
    (d / "mixed").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(d / "mixed" / "a.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(d / "mixed" / "b.png")
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, d / "wrong.pth")
    np.savez(d / "ref_no_sigma.npz", mu=np.zeros(2048))
    (d / "garbage.tar.gz").write_bytes(b"not a tarball")
    (d / "run").mkdir()
    torch.save({"config": {}}, d / "run" / "ckpt.pt")
    (d / "listrun").mkdir()
    (d / "listrun" / "results.json").write_text("[1, 2]")
    npz, w = world["npz"], world["weights"]
    return [
        (["--npz", str(d / "float.npz")], "uint8"),
        (["--npz", str(d / "gray.npz")], "shape"),
        (["--npz", str(d / "missing.npz")], "no such file"),
        (["--images", str(d / "empty")], "no .png"),
        (["--images", str(d / "mixed")], "one size"),
        (["--npz", npz, "--n", "5"], "at least 10"),
        (["--npz", npz, "--n", "100"], "holds only 10"),
        (["--npz", npz, "--device", "tpu"], "not available"),
        (["--npz", npz, "--inception", str(d / "missing.pth")], fid.WEIGHTS_URL),
        (["--npz", npz, "--inception", str(d / "wrong.pth")], "not pytorch-fid's"),
        (["--npz", npz, "--inception", w, "--ref", str(d / "ref_no_sigma.npz")], "mu and sigma"),
        (["--npz", npz, "--inception", w, "--cifar", str(d / "garbage.tar.gz")], "not the CIFAR-10 python tarball"),
        (["--ckpt", str(d / "run" / "ckpt.pt")], "not a DiT-Nano checkpoint"),
        (["--ckpt", world["ckpt"], "--json", str(d / "listrun" / "results.json")], "not a JSON object"),
    ]


def test_fid_bad_inputs_give_one_message_and_exit_code_2(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    for argv, phrase in bad_inputs(tmp_path, world):
        with pytest.raises(SystemExit) as e:
            fid.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2, argv
        assert "error: " in err and phrase in err and "Traceback" not in err, (argv, err)
    assert not os.path.exists(tmp_path / "cache")  # nothing was computed or cached on the way


def test_fid_cli_error_has_no_traceback(tmp_path):
    np.savez(tmp_path / "float.npz", images=np.zeros((10, 32, 32, 3), np.float32))
    r = subprocess.run([sys.executable, "fid.py", "--npz", str(tmp_path / "float.npz")], cwd=HERE,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "uint8" in r.stderr, r.stderr


# ----------------------------------------------------------------------------------------------
# Bad input, by class of error, for every script: one paragraph, exit code 2, no traceback, no file damaged

SCRIPTS = {"assignments": assignments.main, "dit": dit.main, "data": data.main, "distill": distill.main, "ta": ta.main, "mi1": mi1.main,
           "sample": sample.main, "fid": fid.main, "bench": bench.main, "study": study.main, "toy": toy.main}


def test_cli_errors_of_every_script(cache, tmp_path):
    assert_clean_error(run_script("distill.py", "--d", "5", "--w", "64", "--h", "7"), "not divisible by heads")
    assert_clean_error(run_script("distill.py", "--data", str(tmp_path / "nope")), "is not a folder")
    assert_clean_error(run_script("distill.py", "--steps", "0"), "--steps must be a positive integer")
    # LPIPS offline with an empty cache: stops before step 0 naming the file, the folder and --loss l2
    r = run_script("distill.py", "--loss", "lpips", *toy_flags(cache), "--out", str(tmp_path / "l"),
                   env={"TORCH_HOME": str(tmp_path / "hub")})
    assert_clean_error(r, "vgg16-397923af.pth", str(tmp_path / "hub"), "--loss l2")
    assert not (tmp_path / "l" / "ckpt.pt").exists()
    (tmp_path / "bad.pt").write_bytes(b"junk")
    assert_clean_error(run_script("sample.py", "--ckpt", str(tmp_path / "bad.pt")), "not a DiT-Nano checkpoint")
    assert_clean_error(run_script("sample.py", "--ckpt", str(tmp_path / "none.pt")), "no checkpoint")
    assert_clean_error(run_script("dit.py", "--params", "lots"), "cannot read the parameter budget")
    assert_clean_error(run_script("ta.py", *toy_flags(cache)), "needs --ta CKPT")
    assert_clean_error(run_script("ta.py", "--ta", str(tmp_path / "none.pt"), *toy_flags(cache), "--out",
                                  str(tmp_path / "t")), "no checkpoint")
    assert_clean_error(run_script("ta.py", "--ta", "x.pt", "--ta-weight", "0"), "not all 0")
    assert_clean_error(run_script("mi1.py", "--layers", "3,5"), "final block")


def assert_refused(script, argv, phrase, capsys):
    """SCRIPTS[script](argv) stops with exit code 2 and one error naming `phrase`, without a traceback: the last
    line of stderr is 'error: ...' (argparse's: 'PROG: error: ...' after its usage), and no other line errs."""
    with pytest.raises(SystemExit) as stop:
        SCRIPTS[script](argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, (script, argv, err)
    assert phrase in err and "Traceback" not in err and "weights_only" not in err, (script, argv, phrase, err)
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") or (lines[0].startswith("usage:") and ": error: " in lines[-1]), err
    assert sum("error: " in line for line in lines) == 1, err


OUT_OF_RANGE = [  # (script, argv, phrase): values no run can use, refused before any work
    ("dit", ["--params", "inf"], "positive, finite"),
    ("dit", ["--d", "5", "--w", "0"], "multiple of 4"),
    ("dit", ["--d", "5", "--w", "64", "--h", "0"], "not divisible by heads 0"),
    ("dit", ["--params", "5M", "--h", "8"], "not both"),
    ("data", ["--toy-pairs", "0"], "--toy-pairs must be a positive integer"),
    ("toy", ["--toy-pairs", "0"], "--toy-pairs must be a positive integer"),
    ("toy", ["--repeats", "1"], "--repeats must be an integer at least 2"),
    ("toy", ["--ckpt", "no_such_ckpt.pt"], "no checkpoint at no_such_ckpt.pt"),
    ("toy", ["--cfg-scale", "1", "-1"], "--cfg-scale must be"),
    ("distill", ["--data", "PATH", "--loss", "toy-lpips"], "--loss toy-lpips compares images"),
    ("toy", ["--compare", "c.png"], "name them with --ckpt"),
    ("assignments", ["grade", "--only", "99"], "no assignment 99"),
    ("assignments", ["make", "copy", "--only", "1,x"], "--only 1,x"),
    ("assignments", ["grade", "--repo", "nowhere"], "no dit.py there"),
    ("data", ["--toy-seed", "-1"], "--toy-seed must be an integer at least 0"),
    ("data", ["--holdout", "0"], "--holdout must be a positive integer"),
    ("distill", ["--lr", "-1"], "--lr must be a number greater than 0"),
    ("distill", ["--lr", "nan"], "--lr must be a number greater than 0, got nan"),
    ("distill", ["--weight-decay", "-0.1"], "--weight-decay must be a number at least 0"),
    ("distill", ["--warmup", "-5"], "--warmup must be an integer at least 0"),
    ("distill", ["--decay", "-1"], "--decay must be an integer at least 0"),
    ("distill", ["--grad-clip", "nan"], "--grad-clip must be a number at least 0"),
    ("distill", ["--ema", "1.5"], "--ema must be a number at least 0 and at most 1"),
    ("distill", ["--label-dropout", "-0.5"], "--label-dropout must be"),
    ("distill", ["--epochs", "inf"], "--epochs must be"),
    ("distill", ["--seed", "-3"], "--seed must be an integer at least 0"),
    ("distill", ["--lpips-size", "8"], "--lpips-size"),
    ("distill", ["--cfg-scale", "nan"], "--cfg-scale must be"),
    ("distill", ["--fid-n", "5"], "--fid-n must be an integer at least 10"),
    ("distill", ["--eval-every", "-1"], "--eval-every must be a positive integer"),
    ("distill", ["--device", "cuda:x"], "not available here"),
    ("ta", ["--ta", "x.pt", "--ta-weight", "nan"], "--ta-weight must be"),
    ("ta", ["--ta", "x.pt", "--teacher-weight", "-1"], "--teacher-weight must be"),
    ("mi1", ["--t", "0.5,nan"], "in [0, 1]"),
    ("mi1", ["--params", "5M"], "final block 7"),  # (7,192,12) with the default --layers 3,6
    ("sample", ["--ckpt", "x.pt", "--n", "0", "--npz", "s.npz"], "--n must be a positive integer"),
    ("sample", ["--ckpt", "x.pt", "--cfg-scale", "inf"], "--cfg-scale must be"),
    ("sample", ["--ckpt", "x.pt", "--seed", "-1"], "--seed must be"),
    ("fid", ["--npz", "x.npz", "--n", "5"], "--n must be an integer at least 10"),
    ("fid", ["--npz", "x.npz", "--cfg-scale", "-1"], "--cfg-scale must be"),
    ("bench", ["--cfg-scale", "nan"], "--cfg-scale must be"),
    ("bench", ["--warmup", "-1"], "--warmup must be"),
    ("bench", ["--seed", "-1"], "--seed must be"),
    ("bench", ["--threads", "0"], "--threads must be a positive integer"),
    ("bench", ["--loader", "PATH", "--step-ms", "-1"], "--step-ms must be"),
    ("bench", ["--loader", "PATH", "--train"], "--loader times data loading alone"),
    ("bench", ["--opset", "5"], "invalid choice"),
    ("bench", ["--d", "5", "--w", "64", "--mlp-ratio", "0"], "--mlp-ratio must be a number greater than 0"),
    ("bench", ["--sweep", "--designs", "5x64x8"], "cannot read the design '5x64x8'"),
    ("bench", ["--sweep", "--mlp-ratio", "2"], "write it in the design's name"),
    ("bench", ["--ckpt", "x.pt", "--mlp-ratio", "2"], "a checkpoint has its own"),
    ("bench", ["--pick", "--max-params", "5M", "--max-ms", "20", "--modes", "lut,fp32"], "names several"),
    ("bench", ["--compile-mode", "fastest"], "invalid choice"),
]


@pytest.mark.parametrize("script,argv,phrase", OUT_OF_RANGE)
def test_cli_out_of_range_numbers_are_refused(script, argv, phrase, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative paths in argv land here; nothing may be written anyway
    assert_refused(script, argv, phrase, capsys)
    assert os.listdir(tmp_path) == []


def bad_copies(good, other, folder):
    """Stand-ins for the wrong file a user may hand over, from a good file of the expected kind: missing, empty,
    cut in half, random bytes, a folder of that name, and a good file of another kind -> {kind: path}, each
    path FOLDER/KIND/<the good file's name>."""
    raw = open(good, "rb").read()
    contents = {"empty": b"", "truncated": raw[:len(raw) // 2], "garbage": bytes(range(256)) * 16,
                "other kind": open(other, "rb").read()}
    paths = {kind: str(folder / kind.replace(" ", "_") / os.path.basename(good))
             for kind in ("missing", "folder", *contents)}
    os.makedirs(paths["folder"])
    for kind, blob in contents.items():
        os.makedirs(os.path.dirname(paths[kind]))
        with open(paths[kind], "wb") as f:
            f.write(blob)
    return paths


@pytest.fixture(scope="module")
def good_files(world, ta_ckpt, tmp_path_factory):
    """One good file of every kind a script reads, to spoil: checkpoint, .npz, weights, statistics, ..."""
    d = tmp_path_factory.mktemp("good")
    np.savez(d / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    (d / "results.json").write_text(json.dumps({"design": [1, 16, 2], "ema": {"psnr": 12.0}}))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(d / "a.png")
    alex = torchvision.models.alexnet(weights=None).features.state_dict()
    torch.save({"features." + k: v for k, v in alex.items()}, d / "alexnet-owt-7be5be79.pth")
    write_get_folder(d / "get")
    bench.main(["--sweep", "--designs", "1,16,2", "--modes", "lut", *FAST, "--json", str(d / "timings.json")])
    return dict(ckpt=ta_ckpt, npz=world["npz"], inception=world["weights"], ref=str(d / "ref.npz"),
                cifar=world["cifar"], png=str(d / "a.png"), results=str(d / "results.json"),
                timings=str(d / "timings.json"),
                alex=str(d / "alexnet-owt-7be5be79.pth"), get_image=str(d / "get" / "image" / "000000004.pkl"))


def file_targets(good, cache, out):
    """Every flag that reads a file: (script, good file, other kind, argv for a file at PATH), or, for files
    inside a folder (GET pairs, PNGs), argv for the folder that holds PATH."""
    fidflags = ["--device", "cpu", "--batch", "5", "--json", str(out / "r.json")]
    toy = toy_flags(cache) + TINY + ["--out", str(out / "run")]
    return {
        "sample --ckpt": ("sample", "ckpt", "npz", lambda p: ["--ckpt", p, "--out", str(out / "g.png")]),
        "fid --ckpt": ("fid", "ckpt", "npz", lambda p: ["--ckpt", p, "--n", "10", *fidflags]),
        "fid --npz": ("fid", "npz", "ckpt", lambda p: ["--npz", p, *fidflags]),
        "fid --images": ("fid", "png", "ckpt", lambda p: ["--images", os.path.dirname(p), *fidflags]),
        "fid --inception": ("fid", "inception", "npz", lambda p: ["--npz", good["npz"], "--inception", p, *fidflags]),
        "fid --ref": ("fid", "ref", "ckpt", lambda p: ["--npz", good["npz"], "--inception", good["inception"],
                                                        "--ref", p, *fidflags]),
        "fid --cifar": ("fid", "cifar", "ckpt", lambda p: ["--npz", good["npz"], "--inception", good["inception"],
                                                            "--cifar", p, *fidflags]),
        "bench --ckpt": ("bench", "ckpt", "npz", lambda p: ["--ckpt", p, *FAST]),
        "study --results": ("study", "results", "ckpt", lambda p: ["--timings", good["timings"], "--results", p,
                                                                    "--sweep-out", str(out / "s.md"), "--plot",
                                                                    str(out / "p.png")]),
        "study --timings": ("study", "timings", "results", lambda p: ["--timings", p, "--sweep-out",
                                                                      str(out / "s.md"), "--plot", str(out / "p.png")]),
        "ta --ta": ("ta", "ckpt", "npz", lambda p: toy + ["--ta", p]),
        "distill --lpips-backbone": ("distill", "alex", "npz", lambda p: toy + ["--loss", "lpips", "--lpips-net",
                                                                              "alex", "--lpips-backbone", p]),
        "data --data": ("data", "get_image", "npz", lambda p: ["--data", os.path.dirname(os.path.dirname(p)),
                                                               "--holdout", "2"]),
    }


@pytest.mark.parametrize("target", ["sample --ckpt", "fid --ckpt", "fid --npz", "fid --images", "fid --inception",
                                    "fid --ref", "fid --cifar", "bench --ckpt", "study --results", "study --timings",
                                    "ta --ta",
                                    "distill --lpips-backbone", "data --data", "distill --resume"])
def test_cli_unreadable_input_files_are_refused(target, good_files, cache, tmp_path, monkeypatch, capsys):
    """Missing, empty, truncated, random, a folder, or another kind of file: each named in one message, exit
    code 2, and left exactly as it was."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # an empty hub cache, and no download may start
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    if target == "distill --resume":  # the file is OUT/ckpt.pt of the run being resumed
        script, kind, other = "distill", "ckpt", "npz"
        argv = lambda p: toy_flags(cache) + TINY + ["--out", os.path.dirname(p), "--resume"]
    else:
        script, kind, other, argv = file_targets(good_files, cache, tmp_path / "out")[target]
    for bad, path in bad_copies(good_files[kind], good_files[other], tmp_path / kind).items():
        if bad == "missing" and target in ("fid --images", "data --data"):
            continue  # a file missing from a folder is another file's absence, tested with the folder itself
        if target in ("fid --images", "data --data"):  # the bad file sits among good ones
            folder = os.path.dirname(path)
            if target == "data --data":
                shutil.copytree(os.path.dirname(os.path.dirname(good_files["get_image"])), folder + "_get")
                os.remove(os.path.join(folder + "_get", "image", "000000004.pkl"))
                shutil.move(path, os.path.join(folder + "_get", "image", "000000004.pkl"))
                path = os.path.join(folder + "_get", "image", "000000004.pkl")
            else:
                shutil.copy(good_files["png"], os.path.join(folder, "b.png"))
        before = open(path, "rb").read() if os.path.isfile(path) else None
        assert_refused(script, argv(path), os.path.basename(path), capsys)
        assert (open(path, "rb").read() if os.path.isfile(path) else None) == before, (target, bad)
    assert not os.path.exists(tmp_path / "out" / "run" / "ckpt.pt")  # no run started


def test_cli_unwritable_outputs_are_refused_before_any_work(cache, good_files, tmp_path, monkeypatch, capsys):
    """An output under a regular file (unwritable for root too), a file where a folder belongs, a folder
    where a file belongs, or an image type nobody writes: refused at the start, nothing created."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    under = str(blocker / "sub")
    monkeypatch.setattr(common, "CACHE_DIR", under + "/cache")
    toy = toy_flags(cache) + TINY
    cases = [
        ("distill", toy + ["--out", under], "--out"),
        ("distill", toy + ["--out", str(blocker)], "is a file, not a folder"),
        ("data", ["--toy-pairs", "64", "--holdout", "8", "--toy-seed", "5"], "cache folder"),
        ("sample", ["--ckpt", good_files["ckpt"], "--out", under + "/g.png"], "--out"),
        ("sample", ["--ckpt", good_files["ckpt"], "--out", str(tmp_path / "g.xyz")], "cannot write images of type"),
        ("sample", ["--ckpt", good_files["ckpt"], "--npz", under + "/s.npz"], "--npz"),
        ("sample", ["--ckpt", good_files["ckpt"], "--npz", str(tmp_path)], "is a folder"),
        ("fid", ["--npz", good_files["npz"], "--json", under + "/r.json"], "--json"),
        ("bench", FAST + ["--d", "1", "--w", "16", "--json", under + "/b.json"], "--json"),
        ("bench", FAST + ["--d", "1", "--w", "16", "--onnx", under + "/m.onnx"], "--onnx"),
        ("study", ["--timings", good_files["timings"], "--sweep-out", under + "/s.md"], "--sweep-out"),
        ("study", ["--timings", good_files["timings"], "--plot", str(tmp_path / "p.txt")], "--plot"),
        ("study", ["--timings", good_files["timings"], "--results", good_files["results"], "--runs-out",
                   str(blocker)], "--runs-out"),
    ]
    for script, argv, phrase in cases:
        assert_refused(script, argv, phrase, capsys)
    assert sorted(os.listdir(tmp_path)) == ["file.txt"] and blocker.read_text() == "keep me"


def test_assignments_make_a_student_copy_and_grade_names_the_failing_test(tmp_path, capsys):
    assignments.main([])
    listing = capsys.readouterr().out
    assert all(f"{n:2d}. " in listing for n in assignments.ASSIGNMENTS) and "dit.py:Attention.forward" in listing
    copy = tmp_path / "student"
    assignments.main(["make", str(copy), "--only", "2,5"])
    assert not (copy / ".git").exists() and not list(copy.rglob("*.pyc")) and (copy / "assets" / "toy_nets").is_dir()
    source = (copy / "dit.py").read_text()
    assert 'raise NotImplementedError("assignment 2: write Attention.forward' in source
    assert "scaled_dot_product_attention" not in source.split("class Attention")[1].split("class Block")[0]
    assert '"""Classifier-free guidance from the halves' in source  # the docstring stays, the body goes
    assert "def modulate(x, shift, scale):" in source and "return x * (1 + scale" in source  # others intact
    with pytest.raises(SystemExit) as stop:  # an existing folder is never written into
        assignments.main(["make", str(copy)])
    assert stop.value.code == 2 and "exists" in capsys.readouterr().err
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        assignments.main(["grade", "--repo", str(copy), "--only", "2,5,10"])
    lines = capsys.readouterr().out.splitlines()
    assert stop.value.code == 1, lines
    assert lines[0].startswith(" 2. Multi-head self-attention: FAIL  test_a2_") and "assignment 2" in lines[0], lines
    assert lines[1].startswith(" 5. ") and "FAIL" in lines[1] and lines[2].endswith("not handed in"), lines
    with pytest.raises(SystemExit) as stop:  # the repository itself passes
        assignments.main(["grade", "--only", "2,5"])
    assert stop.value.code == 0, capsys.readouterr().out


def test_assignments_grade_table1_from_the_handed_in_records(tmp_path, capsys):
    """Assignment 10 passes only for the quick start's recipe run to the end with each loss, each run better
    than the class means (which loss wins is the student's finding, not graded)."""
    def hand_in(fids, **change):
        for loss, fid in fids.items():
            record = dict(assignments.quick_start_recipe(), loss=loss, ema={"toy_fid_best": fid},
                          class_mean={"toy_fid": 200.0}, **change)
            os.makedirs(tmp_path / "table1" / loss, exist_ok=True)
            common.write_json(str(tmp_path / "table1" / loss / "results.json"), record)
    assert assignments.grade_table1(str(tmp_path)) is None  # not handed in
    hand_in({"l1": 150.0, "l2": 120.0, "toy-lpips": 100.0})
    assert "no " + str(tmp_path) + "/table1/WRITEUP.md" in assignments.grade_table1(str(tmp_path))
    (tmp_path / "table1" / "WRITEUP.md").write_text("L2 wins on toy FID, the toy LPIPS on accuracy, because ...")
    assert assignments.grade_table1(str(tmp_path)) == ""
    hand_in({"l2": 80.0, "toy-lpips": 170.0})  # L2 beating the toy LPIPS is a finding, not a fault
    assert assignments.grade_table1(str(tmp_path)) == ""
    assert assignments.grade(HERE, [10], str(tmp_path))
    assert capsys.readouterr().out.strip().endswith("pass; the write-up is graded by hand")
    hand_in({"l1": 210.0})
    assert "l1 scores toy FID 210.0, 1.05 of the class means' 200.0" in assignments.grade_table1(str(tmp_path))
    hand_in({"l1": 100.0})
    hand_in({"toy-lpips": 100.0}, step=10)
    assert "was not trained as asked" in assignments.grade_table1(str(tmp_path))


def test_scripts_import_in_layers_without_a_circle():
    """Every import among the scripts, those inside functions included, goes one way: dit -> sample -> the metrics
    (fid, toy) -> data, measure -> training (distill, then ta, mi1) -> tools (bench, study); common under all."""
    import ast
    scripts = {os.path.splitext(f)[0] for f in os.listdir(HERE) if f.endswith(".py") and f != "test_all.py"}
    graph = {}
    for name in scripts:
        tree = ast.parse(open(os.path.join(HERE, name + ".py")).read())
        found = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        found |= {node.module.split(".")[0] for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and node.module}
        graph[name] = (found & scripts) - {name}

    def reaches(start, goal, seen=()):
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen + (nxt,))) for nxt in graph[start])
    circles = sorted(name for name in scripts if reaches(name, name))
    assert not circles, f"these scripts import themselves through others: {circles} ({graph})"
    assert graph["common"] == set() and graph["dit"] == {"common"} and "toy" not in graph["sample"]


def test_common_an_interrupted_write_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"step": 1}')

    def half_then_stop(tmp):
        with open(tmp, "w") as f:
            f.write('{"step": 2, "e')
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        common.atomic_write(str(path), half_then_stop)
    assert path.read_text() == '{"step": 1}' and os.listdir(tmp_path) == ["results.json"]
    (tmp_path / f"results.json.{socket.gethostname()}.999999999.tmp").write_text("{")  # a killed writer's
    common.write_json(str(path), {"step": 2})
    assert json.loads(path.read_text()) == {"step": 2} and os.listdir(tmp_path) == ["results.json"]


def test_common_two_processes_writing_one_file_at_once_both_succeed(tmp_path):
    # runs started together each build the shared toy cache: their atomic writes of one path overlap in time
    out, ready = tmp_path / "out", tmp_path / "ready"
    out.mkdir(), ready.mkdir()
    path = out / "cache.txt"
    writer = ("import os, sys, time, common\n"
              "def write(tmp):\n"
              "    open(tmp, 'w').write(sys.argv[2] * 1000)\n"
              "    open(os.path.join(sys.argv[3], sys.argv[2]), 'w').close()\n"
              "    for _ in range(600):  # both processes are inside their write before either renames\n"
              "        if len(os.listdir(sys.argv[3])) == 2: break\n"
              "        time.sleep(0.05)\n"
              "common.atomic_write(sys.argv[1], write)\n")
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(path), text, str(ready)], cwd=HERE,
                              stderr=subprocess.PIPE) for text in "ab"]
    errors = [p.communicate()[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert path.read_text() in ("a" * 1000, "b" * 1000) and os.listdir(out) == ["cache.txt"]


def test_study_sh_refuses_bad_settings(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    for setting, phrase in [("STEPS=0", "STEPS=0 must be a positive integer"), ("BATCH=abc", "BATCH=abc"),
                            ("JOBS=-2", "JOBS=-2"), ("BENCH_N=1e3", "BENCH_N=1e3"), ("SEED=x", "SEED=x"),
                            ("WITH_5M=2", "WITH_5M=2 must be 0 or 1"), ("ALL=yes", "ALL=yes must be 0 or 1"),
                            ("PYTHON=/no/python", "PYTHON=/no/python"),
                            ("ONLY=d5w64h8_l3", "unknown run 'd5w64h8_l3'"), ("LOSS=mse", "LOSS=mse must be"),
                            ("LR=fast", "LR=fast must be a number"), ("WARMUP=-1", "WARMUP=-1 must be"),
                            ("DECAY=x", "DECAY=x must be"),
                            ("CLIP=x", "CLIP=x must be a number"), ("EVERY=0", "EVERY=0 must be a positive"),
                            (f"OUT={blocker}/runs", "cannot write to the folder")]:
        key, value = setting.split("=", 1)
        env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "runs"), RESULTS=str(tmp_path / "results"))
        r = subprocess.run(["bash", "study.sh"], cwd=HERE, capture_output=True, text=True, timeout=300,
                           env=dict(env, **{key: value}))
        assert r.returncode == 2 and r.stderr.startswith("error: ") and phrase in r.stderr, (setting, r.stderr)
        assert "config:" not in r.stdout  # no run started
    assert not os.path.exists(tmp_path / "runs")
