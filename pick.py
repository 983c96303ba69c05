"""
"Which design should I train for my device?": the candidate designs within a parameter budget, the Pareto
front of size and latency among them, and the pick. bench.py times the candidates and calls this file:

    python bench.py --pick --max-params 5M --max-ms 20 --device cpu
    python pick.py --max-params 5M                      # the candidates alone, untimed

    from pick import candidates, pareto_front, choose
    designs = candidates(dit.parse_params("5M"))        # [Candidate(d, w, heads, mlp_ratio, params, rules)]
    front = pareto_front(designs, ms)                   # ms: {design name: ms per image}, measured

The paper's three-way trade-off (section 3.3, Table 6) says: at the rules' design, quality grows with size
(FID 29 -> 14 -> 10 from 0.42M to 5M), and latency decides what a device can afford. Its open question (section 5)
is whether custom heads per layer buy latency: Table 2 shows fewer heads running faster on the Jetson. So the
candidates are
  - the rules' designs (dit.design for every budget up to the given one: widths 2^n and 3*2^n from 32, at
    depth floor(log2 w) or one less), each with three head layouts: the rule's heads in every block, half as
    many in every block, and heads halving toward the output (8,8,4,4,2 for (5,64,8));
  - their neighbours, one block deeper or shallower and one rule width wider or narrower, and the paper's grid
    of Tables 2 and 6 (passed in), each with its own heads, for the table and the front: they show what
    leaving the rules costs, but only a rules' design is picked.
The pick: within both budgets, the rules' design (any head layout) with the most parameters, then the fastest.
"""
import argparse
import math
from collections import namedtuple

import dit
from common import UsageError, check_number, exit_on_usage_error

MIN_WIDTH = 32  # the paper's narrowest design, (21, 32, 4) in Table 2; narrower models are toys of toys

Candidate = namedtuple("Candidate", "depth width heads mlp_ratio params rules")  # heads: int, or a tuple per block


def halving_heads(depth, width, heads):
    """Heads halving toward the output in three even groups of blocks: (5, 64, 8) -> (8, 8, 4, 4, 2); a block keeps
    the previous count where half would not divide the width."""
    group = math.ceil(depth / 3)
    counts, h = [], heads
    for i in range(depth):
        if i and i % group == 0 and h % 2 == 0 and width % (h // 2) == 0:
            h //= 2
        counts.append(h)
    return tuple(counts)


def head_layouts(depth, width):
    """The rule's heads everywhere, half of them everywhere, heads halving toward the output (duplicates once)."""
    h = dit.rule_heads(width)
    layouts = [h] + ([h // 2] if h % 2 == 0 else []) + [halving_heads(depth, width, h)]
    unique = []
    for layout in layouts:
        if dit.heads_per_block(layout, depth) not in [dit.heads_per_block(u, depth) for u in unique]:
            unique.append(layout)
    return unique


def candidates(max_params, grid=(), mlp_ratio=4):
    """Every candidate within max_params parameters, the rules' designs first, each design once; a UsageError
    when even the smallest rules' design is over the budget.
    grid: more (d, w, h) designs to time beside them (bench.py passes Tables 2 and 6's)."""
    rules = [(d, w) for w in dit.RULE_WIDTHS if w >= MIN_WIDTH for d in dit.rule_depths(w)]
    rules = [(d, w) for d, w in rules if dit.param_count(d, w, mlp_ratio) <= max_params]
    if not rules:
        raise UsageError(f"no candidate design has at most {max_params:,} parameters: the smallest rules' design, "
                         f"(4, {MIN_WIDTH}, {dit.rule_heads(MIN_WIDTH)}), has "
                         f"{dit.param_count(4, MIN_WIDTH, mlp_ratio):,}. Raise --max-params.")
    found = {}

    def add(d, w, heads, is_rule):
        key = (d, w, dit.heads_per_block(heads, d))
        if d >= 1 and key not in found and dit.param_count(d, w, mlp_ratio) <= max_params:
            found[key] = Candidate(d, w, heads, mlp_ratio, dit.param_count(d, w, mlp_ratio), is_rule)
    for d, w in rules:
        for heads in head_layouts(d, w):
            add(d, w, heads, True)
    for d, w in rules:
        i = dit.RULE_WIDTHS.index(w)
        for nd, nw in ((d - 1, w), (d + 1, w), (d, dit.RULE_WIDTHS[i - 1]), (d, dit.RULE_WIDTHS[i + 1])):
            if nw >= MIN_WIDTH:
                add(nd, nw, dit.rule_heads(nw), False)
    for d, w, h in grid:
        add(d, w, h, False)
    return list(found.values())


def name(c):
    """The candidate's short name (dit.design_name), which keys its latency: d5w64h8-8-4-4-2."""
    return dit.design_name(c.depth, c.width, list(c.heads) if isinstance(c.heads, tuple) else c.heads, c.mlp_ratio)


def pareto_front(cands, ms):
    """The names of the candidates no other beats on both size and latency: none has at least as many parameters
    and at most the latency, one of the two strictly (more parameters: better quality at the rules' design)."""
    def beaten(c):
        return any(o.params >= c.params and ms[name(o)] <= ms[name(c)] and (o.params, ms[name(o)]) !=
                   (c.params, ms[name(c)]) for o in cands)
    return {name(c) for c in cands if not beaten(c)}


def choose(cands, ms, max_ms):
    """The rules' candidate within max_ms with the most parameters, then the lowest latency; a UsageError naming
    the fastest rules' candidate when none is within."""
    within = [c for c in cands if c.rules and ms[name(c)] <= max_ms]
    if not within:
        fastest = min((c for c in cands if c.rules), key=lambda c: ms[name(c)])
        raise UsageError(f"no rules' design within the parameter budget runs at {max_ms:g} ms per image or faster on "
                         f"this device: the fastest, {name(fastest)} ({fastest.params:,} parameters), takes "
                         f"{ms[name(fastest)]:.3g} ms. Raise --max-ms to at least that, or try a faster mode "
                         f"(--modes) or device (--device).")
    return max(within, key=lambda c: (c.params, -ms[name(c)]))


def report(cands, ms, max_params, max_ms, setting):
    """The Markdown table (every candidate by size: rules' or not, on the front, within the latency budget), then
    the pick line. setting: how the latency was measured, for the header. Returns the pick."""
    best = choose(cands, ms, max_ms)
    front = pareto_front(cands, ms)
    print(f"\ncandidates within {max_params:,} parameters; ms per image: {setting}\n\n"
          f"| design | params | GFLOP/img (CFG) | ms/img | rules' | Pareto front | within {max_ms:g} ms |\n|"
          + " --- |" * 7)
    for c in sorted(cands, key=lambda c: (c.params, ms[name(c)])):
        gflop = dit.flops_per_image(c.depth, c.width, cfg=True, mlp_ratio=c.mlp_ratio) / 1e9
        print(f"| {name(c)}{' **pick**' if c == best else ''} | {c.params:,} | {gflop:.3f} | {ms[name(c)]:.3f} | "
              f"{'yes' if c.rules else ''} | {'yes' if name(c) in front else ''} | "
              f"{'yes' if ms[name(c)] <= max_ms else ''} |")
    heads = ",".join(map(str, best.heads)) if isinstance(best.heads, tuple) else str(best.heads)
    print(f"\npick: (d, w, h) = ({best.depth}, {best.width}, {heads}): {best.params:,} parameters, "
          f"{ms[name(best)]:.3f} ms per image; train it with python distill.py --d {best.depth} --w {best.width} "
          f"--h {heads}" + (f" --mlp-ratio {best.mlp_ratio:g}" if best.mlp_ratio != 4 else ""))
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description="List the candidate designs within a parameter budget, untimed "
                                "(python bench.py --pick times them and picks).")
    p.add_argument("--max-params", default="5M", help="the parameter budget, e.g. 5M, 2.2M, 500k (default 5M)")
    p.add_argument("--mlp-ratio", type=float, default=4, help="every candidate's MLP ratio (default 4)")
    args = p.parse_args(argv)
    with exit_on_usage_error():
        check_number(args.mlp_ratio, "--mlp-ratio", low=0, low_open=True)
        cands = candidates(dit.parse_params(args.max_params), mlp_ratio=args.mlp_ratio)
    for c in sorted(cands, key=lambda c: c.params):
        print(f"{name(c)}: {c.params:,} parameters" + (", a rules' design" if c.rules else ""))
    return cands


if __name__ == "__main__":
    main()
