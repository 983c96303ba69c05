"""
The design-space study's report (paper section 3.2, Figure 4): a design sweep's latencies (bench.py --sweep
--json) joined with each run's quality (distill.py's or fid.py's results.json) -> the sweep table, Figure 4's
three panels and, for study.sh, one record per run (its results plus its design's latency).

    python bench.py --sweep --n 256 --json sweep.json && python study.py --timings sweep.json   # paper's FIDs
    python study.py --timings sweep.json --results 'runs/*/results.json' --plot tradeoff.png    # the runs'
    bash study.sh                          # the toy study: trains every design, times them, then calls this
    python study.py --results 'runs/methods/*/results.json' --compare-out methods.md   # a row per run setup

Quality: the runs' FID when any has one, else their toy FID (toy.py) at each run's best guidance scale, else
their held-out PSNR against the teacher; without --results, the paper's Table 6 FID beside our latency. The table
has a column per metric the runs report (toy FID at the best and at the run's own scale, the best scale, toy
class accuracy, teacher's mode, PSNR): the mean over a design's runs, +- the spread of seed repeats.
Every run's design must be among the sweep's.
"""
import argparse
import glob
import json
import math
import os
import re
import statistics

import dit
from common import UsageError, atomic_write, exit_on_usage_error, writable_dir, writable_file, write_json


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--timings", help="the JSON list that bench.py --sweep --json wrote (not needed with "
                   "--compare-out)")
    p.add_argument("--results", nargs="+", help="results.json files or quoted globs (distill.py, fid.py)")
    p.add_argument("--sweep-out", default="sweep.md", help="the Markdown table to write")
    p.add_argument("--plot", default="tradeoff.png", help="Figure 4's three panels (.png, .pdf, .svg or .jpg)")
    p.add_argument("--guidance-plot", help="also plot each design's toy FID against the guidance scale (.png), from "
                   "the --results runs' records")
    p.add_argument("--compare-out", help="instead of the sweep: write a Markdown table with a row per run setup "
                   "(a run folder's name without its _s<seed> suffix, as methods.sh names them) to this file")
    p.add_argument("--runs-out", help="write each --results run's record plus its design's latency (none with "
                   "--compare-out) to this folder as RUN.json (the folder name of its results.json)")
    return p


def load_timings(path):
    """bench.py --sweep --json's list of rows -> rows; UsageError if it is not one."""
    try:
        with open(path) as f:
            rows = json.load(f)
        assert isinstance(rows, list) and rows and all("design" in r and "seconds_per_50k" in r for r in rows)
        for r in rows:
            r["key"] = design_key(r)
    except (OSError, ValueError, AssertionError, KeyError, TypeError) as e:
        raise UsageError(f"--timings {path} is not a sweep's timings ({type(e).__name__}: {str(e)[:200]}); write "
                         f"it with python bench.py --sweep --json {path}.")
    for r in rows:
        r.setdefault("name", "")
        r.setdefault("jetson_s", None)
        r.setdefault("paper_fid", None)
    return rows


def load_results(patterns):
    """results.json files (globs allowed) -> [(path, record)]; a record needs 'design': [d, w, h]."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise UsageError(f"--results {pattern} matches no file; pass results.json files or a quoted glob.")
        paths += matches
    records = []
    for path in paths:
        try:
            with open(path) as f:
                record = json.load(f)
            record["key"] = design_key(record)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"cannot read {path} as a results file ({type(e).__name__}: {e}); expected the "
                             f"results.json that distill.py or fid.py write (it has 'design': [d, w, h]).")
        records.append((path, record))
    return records


def design_key(record):
    """A run's or a timing's design as its name (dit.design_name): heads per block and the MLP ratio tell designs
    apart, d5w64h8 from d5w64h8-8-4-4-2 and d5w64h8r2. Raises KeyError, TypeError or ValueError for a bad one."""
    d, w, h = record["design"]
    h = [int(v) for v in h] if isinstance(h, list) else int(h)
    return dit.design_name(int(d), int(w), h, float(record.get("mlp_ratio", 4)))


METRICS = {  # what a run's results.json may hold -> (column label, where it is)
    "fid": ("FID (runs; lower is better)", lambda r: r.get("fid")),
    "toy_fid_best": ("toy FID at its best CFG (runs; lower is better)",
                     lambda r: r.get("ema", {}).get("toy_fid_best")),
    "cfg_best": ("its best CFG (runs)", lambda r: r.get("ema", {}).get("cfg_best")),
    "toy_fid": ("toy FID at CFG 1.5 (runs)", lambda r: r.get("ema", {}).get("toy_fid")),
    "toy_acc": ("toy class accuracy (runs)", lambda r: r.get("ema", {}).get("toy_acc")),
    "toy_mode": ("teacher's mode (runs)", lambda r: r.get("ema", {}).get("toy_mode")),
    "psnr": ("held-out PSNR dB (runs)", lambda r: r.get("ema", {}).get("psnr")),
}

FRACTIONS = ("toy_acc", "toy_mode")  # shown to 3 decimals, the others to 2


def main_setup(records):
    """The runs of the most common loss and method (a tie goes to the first run's, so the order of --results
    decides): a design's point is never blurred by, say, Table 1's L1 run of it."""
    setups = [(r.get("loss"), r.get("method")) for _, r in records]
    common = max(setups, key=setups.count)
    return [record for record, setup in zip(records, setups) if setup == common]


def run_metrics(records):
    """Per design, each metric's runs -> {metric: {design key: [values]}}, over runs of the most common loss and
    method only, so that e.g. an L1 run in Table 1's comparison does not blur its design's L2 point."""
    out = {}
    for _, r in main_setup(records):
        for name, (_, get) in METRICS.items():
            if get(r) is not None:
                out.setdefault(name, {}).setdefault(r["key"], []).append(get(r))
    return out


def quality_of(records, rows):
    """The quality axis -> (label, {design key: value}): the mean over runs of their FID when any has one, else
    of their toy FID (the toy teacher's stand-in for it) at each run's best guidance scale, else at the run's
    own scale, else of their held-out PSNR, else the paper's Table 6 FID."""
    if not records:
        return "FID (paper, Table 6)", {r["key"]: r["paper_fid"] for r in rows if r["paper_fid"]}
    values = run_metrics(records)
    name = next(m for m in ("fid", "toy_fid_best", "toy_fid", "psnr") if m in values)
    return METRICS[name][0], {d: statistics.mean(v) for d, v in values[name].items()}


def training_setup(records):
    """One line saying how the runs were trained (steps, batch, learning rate, warm-up, decay, gradient clip, loss),
    each setting's distinct values joined by ' / ', so a table never hides that its runs differ, and which of
    them the rows average when their losses or methods differ (main_setup's); '' without runs. A setting a
    run's results.json does not record shows as '-'."""
    if not records:
        return ""

    def show(v):
        return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
    settings = [("steps", "step"), ("batch", "batch"), ("lr", "lr"), ("warm-up", "warmup"), ("final decay", "decay"),
                ("gradient clip", "grad_clip"), ("loss", "loss")]
    parts = [f"{label} {' / '.join(dict.fromkeys(show(r.get(key)) for _, r in records))}" for label, key in settings]
    main = main_setup(records)
    rows = "" if len(main) == len(records) else \
        f" Rows: loss {main[0][1].get('loss')}, method {main[0][1].get('method')} ({len(main)} of the runs)."
    return f"Runs ({len(records)}): {', '.join(parts)}.{rows}\n"


def run_name(path, record):
    """A run's name: its record's own (a study record, RESULTS/NAME.json), else its results.json's folder name."""
    return record.get("run") or os.path.basename(os.path.dirname(os.path.abspath(path)))


def write_run_records(records, rows, folder):
    """The study's record of each run: its results.json, the latency this sweep measured for its design (the first
    mode), and its training curve (each evaluation's EMA metrics, from metrics.jsonl beside the results.json when
    there is one; a record passed back in keeps its own), as FOLDER/<run name>.json. rows None: no latency."""
    os.makedirs(folder, exist_ok=True)
    timed_rows = {}
    for row in rows or []:
        timed_rows.setdefault(row["key"], row)
    keys = ("mode", "device", "hardware", "batch", "cfg_scale", "n", "extrapolated", "images_per_s",
            "seconds_per_50k", "gflop_per_image", "torch")
    for path, record in records:
        run = run_name(path, record)
        curve_path = os.path.join(os.path.dirname(path), "metrics.jsonl")
        curve = record.get("curve", [])
        if os.path.basename(path) == "results.json" and os.path.isfile(curve_path):  # a run folder's
            with open(curve_path) as f:
                curve = [{"step": e["step"], **e["ema"]} for e in map(json.loads, f)]
        key, record = record["key"], {k: v for k, v in record.items() if k != "key"}
        if rows is not None:
            row = timed_rows[key]
            record["latency"] = {k: row.get(k) for k in keys} | {"ms_per_image": 1e3 / row["images_per_s"]}
        write_json(os.path.join(folder, f"{run}.json"), {"run": run, **record, "curve": curve})


def spread(metric, values, count=True):
    """A metric's runs as one cell: their mean, +- their standard deviation where there are several (and how many,
    unless count is False: a table with a column of counts); '' for none."""
    digits = 3 if metric in FRACTIONS else 2
    return "" if not values else f"{statistics.mean(values):.{digits}f}" + (
        f" +- {statistics.stdev(values):.{digits}f}" + (f" ({len(values)} runs)" if count else "")
        if len(values) > 1 else "")


def family(depth, width):
    """Figure 4's groups by the depth rule d ~ floor(log2 w) (or one less): deeper is 'deep', shallower 'wide'."""
    rule = int(math.log2(width))
    return "deep" if depth > rule else "wide" if depth < rule - 1 else "rule"


def sweep_table(rows, records):
    """Markdown: a row per design and mode, smallest design first, and a column per metric the --results runs
    have: the mean over the design's runs, +- their standard deviation where it has several (seed repeats)."""
    est = "extrapolated" if rows[0]["extrapolated"] else "measured"
    values = run_metrics(records) if records else {}
    lines = [f"| design | name | params | GFLOP/img (CFG) | mode | img/s | s per 50k ({est}) | "
             f"paper Jetson s | paper FID |" + "".join(f" {METRICS[m][0]} |" for m in values),
             "|" + " --- |" * (9 + len(values))]

    def cell(value):
        return "" if value is None else f"{value:.2f}"

    for r in sorted(rows, key=lambda r: r["params"]):  # stable: a design's modes keep bench.py's order
        d = r["key"]
        lines.append(f"| {d} | {r['name']} | {r['params']:,} | {r['gflop_per_image']:.3f} | "
                     f"{r['mode']} | {r['images_per_s']:,.1f} | {'~' if r['extrapolated'] else ''}"
                     f"{r['seconds_per_50k']:,.1f} | {r['jetson_s'] or ''} | {cell(r['paper_fid'])} |"
                     + "".join(f" {spread(m, values[m].get(d))} |" for m in values))
    return "\n".join(lines)


def compare_table(records):
    """Markdown: a row per run setup (a run's name less its _s<seed> suffix: t3-2-ta for t3-2-ta_s0,
    t3-2-ta_s1, ...) in the order of their names, with its design, method and number of seeds, and a column per
    metric the runs have: the mean over the setup's seeds, +- their standard deviation."""
    setups = {}
    for path, r in records:
        setups.setdefault(re.sub(r"_s\d+$", "", run_name(path, r)), []).append(r)
    metrics = [m for m, (_, get) in METRICS.items() if any(get(r) is not None for _, r in records)]
    lines = ["| run setup | design | method | seeds |" + "".join(f" {METRICS[m][0]} |" for m in metrics),
             "|" + " --- |" * (4 + len(metrics))]
    for setup, runs in sorted(setups.items()):
        first = runs[0]
        cells = [spread(m, [v for v in map(METRICS[m][1], runs) if v is not None], count=False) for m in metrics]
        lines.append(f"| {setup} | {first['key']} | {first.get('method', 'distill')} | {len(runs)} |"
                     + "".join(f" {c} |" for c in cells))
    return "\n".join(lines)


def plot_tradeoff(rows, quality_label, quality, path):
    """Figure 4: (a) params vs quality, (b) params vs latency per 50k (the paper's Jetson latencies hollow),
    (c) latency vs quality with marker area proportional to params: the three-way trade-off. One PNG, Agg."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.8))
    groups = {"wide": ("s", "wide (d < log2 w - 1)"), "rule": ("o", "rule depth (d ~ log2 w)"),
              "deep": ("^", "deep (d > log2 w)")}
    for (group, (marker, label)), colour in zip(groups.items(), ("C0", "C1", "C2")):
        rs = [r for r in rows if family(*r["design"][:2]) == group]
        rq = [r for r in rs if r["key"] in quality]
        a.scatter([r["params"] / 1e6 for r in rq], [quality[r["key"]] for r in rq], marker=marker,
                  color=colour, label=label if rq else None)  # no legend entry for an empty group
        b.scatter([r["params"] / 1e6 for r in rs], [r["seconds_per_50k"] for r in rs], marker=marker, color=colour,
                  label=label if rs else None)
        jetson = [r for r in rs if r["jetson_s"]]
        b.scatter([r["params"] / 1e6 for r in jetson], [r["jetson_s"] for r in jetson], marker=marker,
                  facecolors="none", edgecolors=colour, label=f"{group}, paper's Jetson Orin" if jetson else None)
        c.scatter([r["seconds_per_50k"] for r in rq], [quality[r["key"]] for r in rq], marker=marker,
                  s=[20 + 30 * r["params"] / 1e6 for r in rq], color=colour, label=label if rq else None)
        for r in rq:
            c.annotate(r["key"], (r["seconds_per_50k"], quality[r["key"]]),
                       fontsize=6, xytext=(3, 3), textcoords="offset points")
    latency_label = "s per 50k images" + (" (extrapolated)" if any(r["extrapolated"] for r in rows) else "")
    a.set(xlabel="parameters (M)", ylabel=quality_label, title="(a) size vs quality")
    b.set(xlabel="parameters (M)", ylabel=latency_label, title="(b) size vs latency (hollow: paper, Jetson)")
    c.set(xlabel=latency_label, ylabel=quality_label, title="(c) trade-off (area ~ params)")
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"{rows[0]['hardware']}, {rows[0]['mode']}, batch {rows[0]['batch']}, CFG {rows[0]['cfg_scale']}",
                 fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format=os.path.splitext(path)[1][1:].lower()))
    plt.close(fig)


def plot_guidance(records, path):
    """Each design's toy FID against the guidance scale (the mean over its runs of every scale they recorded), the
    paper's 1.5 marked and each run's best scale (chosen on other noise) as a dot. One PNG, Agg."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by_design = {}
    for _, r in main_setup(records):
        if r.get("ema", {}).get("toy_fid_by_cfg"):
            by_design.setdefault(r["key"], []).append(r)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    def params(r):
        return dit.param_count(r["design"][0], r["design"][1], r.get("mlp_ratio", 4))
    for key, records_of in sorted(by_design.items(), key=lambda kv: params(kv[1][0])):
        runs = [r["ema"] for r in records_of]
        scales = sorted(float(s) for s in runs[0]["toy_fid_by_cfg"])
        mean = [statistics.mean(e["toy_fid_by_cfg"][f"{s:g}"] for e in runs) for s in scales]
        line, = ax.plot(scales, mean, marker=".", label=f"{key} {params(records_of[0]) / 1e6:.2f}M, "
                                                        f"{len(runs)} run{'s' * (len(runs) > 1)}")
        ax.scatter([e["cfg_best"] for e in runs], [e["toy_fid_best"] for e in runs], color=line.get_color(), s=18)
    ax.axvline(1.5, color="grey", lw=0.8, ls="--", label="the paper's scale, 1.5")
    ax.set(xlabel="guidance scale", ylabel="toy FID (held-out; lower is better)", yscale="log",
           title="toy FID against guidance (dots: each run's best scale)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format=os.path.splitext(path)[1][1:].lower()))
    plt.close(fig)


def write_text(path, text):
    """A table file, written atomically (a temp file, then a rename)."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def compare(args):
    """--compare-out: the --results runs' table of run setups (methods.sh's Tables 3 and 4), no latency."""
    if not args.results:
        raise UsageError("--compare-out tabulates runs: give them with --results (e.g. 'runs/methods/*/results.json').")
    writable_file(args.compare_out, "--compare-out")
    if args.runs_out:
        writable_dir(args.runs_out, "--runs-out")
    records = load_results(args.results)
    table = compare_table(records)
    write_text(args.compare_out, f"{training_setup(records)}\n{table}\n")
    print(f"{table}\n\nwrote {args.compare_out}")
    if args.runs_out:
        write_run_records(records, None, args.runs_out)
        print(f"wrote {len(records)} run records to {args.runs_out}/")
    return records


def main(argv=None):
    args = get_parser().parse_args(argv)
    with exit_on_usage_error():
        if args.compare_out:
            return compare(args)
        if not args.timings:
            raise UsageError("--timings is needed: the sweep table joins the runs with bench.py --sweep --json's "
                             "latencies (or pass --compare-out FILE with --results for a table of run setups).")
        if os.path.splitext(args.plot)[1].lower() not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
            raise UsageError(f"--plot {args.plot}: write the figure as .png, .pdf, .svg or .jpg.")
        if args.runs_out and not args.results:
            raise UsageError("--runs-out writes the --results runs with their latency: give --results too.")
        writable_file(args.sweep_out, "--sweep-out")
        writable_file(args.plot, "--plot")
        if args.guidance_plot:
            writable_file(args.guidance_plot, "--guidance-plot")
        if args.runs_out:
            writable_dir(args.runs_out, "--runs-out")
        rows = load_timings(args.timings)
        records = load_results(args.results) if args.results else []
        missing = sorted({r["key"] for _, r in records} - {r["key"] for r in rows})
        if missing:
            raise UsageError(f"--timings {args.timings} has no latency for the runs' designs {', '.join(missing)}; "
                             f"time them with python bench.py --sweep --designs {' '.join(missing)} --json "
                             f"{args.timings}.")
    first = rows[0]
    quality_label, quality = quality_of(records, rows)
    table = sweep_table(rows, records)
    header = (f"{first['hardware']}, torch {first.get('torch', '?')}; {first['n']:,} images per design at batch "
              f"{first['batch']}, CFG {first['cfg_scale']:g}, median of {first['repeats']}; s per 50k = 50,000 / "
              f"measured img/s{' (~: extrapolated)' if first['extrapolated'] else ''}.")
    write_text(args.sweep_out, f"{header}\n{training_setup(records)}\n{table}\n")
    plot_tradeoff([r for r in rows if r["mode"] == first["mode"]], quality_label, quality, args.plot)  # one mode
    print(f"{table}\n\nwrote {args.sweep_out} and {args.plot}")
    if args.guidance_plot:
        plot_guidance(records, args.guidance_plot)
        print(f"wrote {args.guidance_plot}")
    if args.runs_out:
        write_run_records(records, rows, args.runs_out)
        print(f"wrote {len(records)} run records (results + latency) to {args.runs_out}/")
    return rows


if __name__ == "__main__":
    main()
