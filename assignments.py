"""
Course assignments from the paper (ASSIGNMENTS.md is the sheet): the list, a student copy, and the grader.

    python assignments.py                                 # list them: number, title, functions, how graded
    python assignments.py make OUT [--only 1,3]           # a student copy in OUT: those functions emptied
    python assignments.py grade [--repo DIR] [--only 1,3] [--records DIR]   # grade DIR's code (default: here)

`make` copies this repository without .git, caches and runs, and replaces the body of each chosen assignment's
functions (found with ast, by name: no markers in the code) by a NotImplementedError naming the assignment; the
signature and docstring stay. `grade` copies DIR's code into a temporary folder, puts this repository's
test_all.py beside it (so a student cannot change what grades them), runs each chosen assignment's tests and prints
one line per assignment: number, title, pass or fail and, for a fail, the first failing test's message. The two
experiments are graded from the run records in --records DIR (ASSIGNMENTS.md says what to hand in); the write-up
by hand. Exit code 0 only when every graded assignment passes.
"""
import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree

import distill
from common import UsageError, exit_on_usage_error

HERE = os.path.dirname(os.path.abspath(__file__))
SKIP = {".git", "runs", "data", "__pycache__", ".pytest_cache"}  # never copied: history, outputs, compiled answers

# number -> (title, [(file, function or Class.method)], the tests that grade it: test_all.py names, or None for
# an experiment graded from records)
ASSIGNMENTS = {
    1: ("adaLN-Zero: modulation and the zero start",
        [("dit.py", "modulate"), ("dit.py", "Block.forward"), ("dit.py", "DiT.initialize_weights")],
        ["test_a1_modulate_shifts_and_scales_by_one_plus_scale", "test_a1_block_applies_gated_residuals_in_ditS_order",
         "test_a1_zero_init_makes_every_block_the_identity_and_the_output_zero", "test_dit_zero_init_outputs_zero"]),
    2: ("Multi-head self-attention", [("dit.py", "Attention.forward")],
        ["test_a2_attention_matches_per_head_softmax_attention", "test_dit_cpu_head_padding_is_the_same_attention"]),
    3: ("Counting parameters and FLOPs", [("dit.py", "param_count"), ("dit.py", "flops_per_image")],
        ["test_dit_parameter_count_matches_formula", "test_dit_flop_count_matches_torch_counter",
         "test_dit_mlp_ratio_counts_are_exact"]),
    4: ("The design rules: a parameter budget -> depth, width, heads", [("dit.py", "rule_heads"), ("dit.py", "design")],
        ["test_a4_rule_heads_is_the_lower_median_factor", "test_dit_design_rules_give_papers_rows"]),
    5: ("Classifier-free guidance: label dropout and the guided sample",
        [("distill.py", "batch_of_step"), ("dit.py", "guided")],
        ["test_a5_guided_extrapolates_from_the_unconditional_half",
         "test_distill_batches_drop_labels_at_the_rate_asked"]),
    6: ("The EMA and its warm-up; the learning-rate schedule",
        [("distill.py", "ema_decay"), ("distill.py", "ema_update"), ("distill.py", "learning_rate")],
        ["test_distill_ema_after_known_updates", "test_a6_learning_rate_warms_up_holds_and_decays"]),
    7: ("EDM's Heun sampler on the toy teacher's exact denoiser", [("toy.py", "edm_sigmas"), ("toy.py", "heun_solve")],
        ["test_toy_edm_sigmas", "test_toy_teacher_follows_edm_algorithm_1"]),
    8: ("Measuring: PSNR and the Frechet distance",
        [("data.py", "psnr"), ("fid.py", "statistics"), ("fid.py", "frechet_distance")],
        ["test_a8_psnr_of_images_on_minus_one_to_one", "test_fid_statistics_are_float64_mean_and_unbiased_covariance",
         "test_fid_of_a_set_with_itself_is_zero", "test_fid_closed_forms", "test_fid_rejects_a_complex_square_root"]),
    9: ("Multi-In-One's targets: the teacher's trajectory by the forward ODE", [("mi1.py", "trajectory_point")],
        ["test_mi1_trajectory_targets"]),
    10: ("Experiment: Table 1 on the toy teacher (L1, L2, toy LPIPS)", [], None),
    11: ("Experiment: the three-way trade-off on your device, and a write-up", [], None),
}


def parse_only(text):
    """--only '1,3' -> [1, 3] (all when None); a UsageError names an unknown number."""
    if text is None:
        return sorted(ASSIGNMENTS)
    try:
        chosen = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise UsageError(f"--only {text}: expected assignment numbers separated by commas, e.g. --only 1,3.")
    unknown = [n for n in chosen if n not in ASSIGNMENTS]
    if unknown:
        raise UsageError(f"--only {text}: no assignment {unknown[0]}; they are numbered 1..{max(ASSIGNMENTS)} "
                         f"(python assignments.py lists them).")
    return chosen


def how_graded(number):
    return "by its tests in test_all.py" if ASSIGNMENTS[number][2] else "from your run records (--records)" + (
        "; the write-up by hand" if number == 11 else "")


def list_assignments():
    for number, (title, functions, _) in ASSIGNMENTS.items():
        names = ", ".join(f"{file}:{name}" for file, name in functions) or "your runs"
        print(f"{number:2d}. {title}\n    write: {names}\n    graded {how_graded(number)}")


# ----------------------------------------------------------------------------------------------
# make: the student copy

def find_function(tree, qualified):
    """The ast node of `name` or `Class.name` at the top of a module; None when missing."""
    *owner, name = qualified.split(".")
    body = tree.body
    if owner:
        body = next((n.body for n in body if isinstance(n, ast.ClassDef) and n.name == owner[0]), [])
    return next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name), None)


def emptied(source, functions, number):
    """source with each function's body (after its docstring) replaced by a NotImplementedError naming the
    assignment; the signature and docstring stay."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    nodes = []
    for name in functions:
        node = find_function(tree, name)
        if node is None:
            raise UsageError(f"assignment {number}: no function {name} in the code; assignments.py and the code "
                             f"disagree.")
        nodes.append((node, name))
    for node, name in sorted(nodes, key=lambda n: -n[0].lineno):  # from the bottom, so line numbers hold
        first_statement = node.body[0]
        has_doc = isinstance(first_statement, ast.Expr) and isinstance(first_statement.value, ast.Constant) \
            and isinstance(first_statement.value.value, str)
        first = node.body[1] if has_doc and len(node.body) > 1 else None if has_doc else node.body[0]
        if first is None:
            continue
        indent = " " * first.col_offset
        stub = (f'{indent}raise NotImplementedError("assignment {number}: write {name} (ASSIGNMENTS.md, '
                f'assignment {number})")\n')
        lines[first.lineno - 1:node.end_lineno] = [stub]
    return "".join(lines)


def make(out, chosen):
    """A student copy of this repository in `out` (which must not exist) with the chosen assignments' functions
    emptied."""
    if os.path.exists(out):
        raise UsageError(f"{out} exists: make writes a new folder, so that nothing of yours is overwritten; choose "
                         f"another path.")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"cannot create {out}: its folder {parent} does not exist or cannot be written.")
    by_file = {}
    for number in chosen:
        for file, name in ASSIGNMENTS[number][1]:
            by_file.setdefault(file, []).append((name, number))
    shutil.copytree(HERE, out, ignore=lambda folder, names: [n for n in names if n in SKIP or n.endswith(".pyc")])
    for file, entries in by_file.items():
        path = os.path.join(out, file)
        with open(path) as f:
            source = f.read()
        for number in sorted({n for _, n in entries}):
            source = emptied(source, [name for name, n in entries if n == number], number)
        with open(path, "w") as f:
            f.write(source)
    print(f"wrote a student copy to {out}: assignments {', '.join(map(str, chosen))} emptied "
          f"({sum(len(v) for v in by_file.values())} functions); ASSIGNMENTS.md says what to write, "
          f"python assignments.py grade --repo {out} grades it")


# ----------------------------------------------------------------------------------------------
# grade

def run_tests(repo, tests):
    """This repository's test_all.py against repo's code: {test name: None (passed) or its first failure line}."""
    with tempfile.TemporaryDirectory(prefix="dit-nano-grade-") as tmp:
        code = os.path.join(tmp, "code")
        shutil.copytree(repo, code, ignore=lambda folder, names: [n for n in names if n in SKIP or n.endswith(".pyc")])
        shutil.copy(os.path.join(HERE, "test_all.py"), os.path.join(code, "test_all.py"))  # the grader's tests
        report = os.path.join(tmp, "report.xml")
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        *(f"test_all.py::{t}" for t in tests)], cwd=code, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        if not os.path.exists(report):
            return {t: "the tests could not be collected (does the code import?)" for t in tests}
        results = {}
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            name = case.get("name").split("[")[0]  # a parametrised test fails when any of its cases fails
            problem = next((c for c in case if c.tag in ("failure", "error")), None)
            if problem is not None and results.get(name) is None:
                results[name] = " ".join((problem.get("message") or problem.text or "failed").split())[:300]
            else:
                results.setdefault(name, None)
        return {t: results.get(t, "not run (missing from the test file?)") for t in tests}


def quick_start_recipe():
    """What assignment 10's runs must have been trained with: the quick start's design and distill.py's toy
    defaults (ASSIGNMENTS.md)."""
    return {"data": "toy", "design": [5, 64, 8], "toy_seed": 0, "step": distill.TOY["steps"],
            **{k: distill.TOY[k] for k in ("batch", "lr", "warmup", "decay", "grad_clip")}}


def read_record(folder):
    path = os.path.join(folder, "results.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def grade_table1(records):
    """Assignment 10: records/table1/{l1,l2,toy-lpips}/results.json, the quick start's recipe with each loss."""
    runs = {loss: read_record(os.path.join(records, "table1", loss)) for loss in ("l1", "l2", "toy-lpips")}
    if not any(runs.values()):
        return None
    missing = [loss for loss, r in runs.items() if r is None]
    if missing:
        return f"no results.json for {', '.join(missing)} in {records}/table1/"
    recipe = quick_start_recipe()
    for loss, r in runs.items():
        wrong = ", ".join(f"{k} {r.get(k)} (asked: {v})" for k, v in recipe.items() if r.get(k) != v)
        if r.get("loss") != loss or wrong:
            return (f"table1/{loss} was not trained as asked (the quick start's command with --loss {loss}, to the "
                    f"end): loss {r.get('loss')}{', ' + wrong if wrong else ''}")
    class_mean = runs["toy-lpips"]["class_mean"]["toy_fid"]
    for loss, r in runs.items():
        fid = r["ema"]["toy_fid_best"]
        if fid >= TABLE1_MAX_RATIO * class_mean:
            return (f"{loss} scores toy FID {fid:.1f}, {fid / class_mean:.2f} of the class means' {class_mean:.1f}; "
                    f"every loss's student should score below them (three seeds of each scored at most 0.78 of "
                    f"them): was it trained to the end with the quick start's recipe?")
    if not os.path.isfile(os.path.join(records, "table1", "WRITEUP.md")):
        return f"no {records}/table1/WRITEUP.md (the table and the paragraph ASSIGNMENTS.md asks for)"
    return ""


def grade_tradeoff(records):
    """Assignment 11: records/tradeoff/sweep.json (bench.py --sweep --json on your device) and at least three
    runs' results.json in records/tradeoff/RUN/, each design timed in the sweep; WRITEUP.md beside them."""
    folder = os.path.join(records, "tradeoff")
    if not os.path.isdir(folder):
        return None
    try:
        with open(os.path.join(folder, "sweep.json")) as f:
            timed = {tuple(r["design"]) for r in json.load(f)}
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {folder}/sweep.json (python bench.py --sweep --designs ... --json {folder}/sweep.json)"
    runs = [r for r in (read_record(os.path.join(folder, d)) for d in sorted(os.listdir(folder))) if r]
    if len(runs) < 3:
        return f"{len(runs)} runs in {folder}/; hand in three designs or more"
    untimed = [r["design"] for r in runs if tuple(r["design"]) not in timed]
    if untimed:
        return f"designs {untimed} were trained but not timed in sweep.json"
    runs.sort(key=lambda r: r["param_count"])  # quick start's recipe, seeds 0-2: 0.1M 216 +- 18, 1M 135 +- 12
    if not runs[-1]["ema"]["toy_fid_best"] < runs[0]["ema"]["toy_fid_best"]:
        return "your largest design should score a lower toy FID than your smallest; train them longer"
    if not os.path.isfile(os.path.join(folder, "WRITEUP.md")):
        return f"no {folder}/WRITEUP.md"
    return ""


# Assignment 10's bar: each loss's toy FID below the class means' (predicting each label's mean image). Measured
# at the quick start's recipe, seeds 0-2, as a fraction of the class means' (mean +- sd, worst): L1 0.69 +- 0.14,
# 0.78; L2 0.42 +- 0.03, 0.45; toy LPIPS 0.66 +- 0.04. L1, the most spread, has its mean 2.3 sd below the bar.
TABLE1_MAX_RATIO = 1.0


def grade(repo, chosen, records):
    tests = sorted({t for n in chosen if ASSIGNMENTS[n][2] for t in ASSIGNMENTS[n][2]})
    results = run_tests(repo, tests) if tests else {}
    all_passed = True
    for number in chosen:
        title, _, number_tests = ASSIGNMENTS[number]
        if number_tests:
            failed = [(t, results[t]) for t in number_tests if results[t]]
            verdict = "pass" if not failed else f"FAIL  {failed[0][0]}: {failed[0][1]}"
        else:
            problem = None if records is None else (grade_table1 if number == 10 else grade_tradeoff)(records)
            if problem is None:
                print(f"{number:2d}. {title}: not handed in")
                continue
            verdict = ("pass" if not problem else f"FAIL  {problem}") + "; the write-up is graded by hand"
        all_passed &= verdict.startswith("pass")
        print(f"{number:2d}. {title}: {verdict}")
    return all_passed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="command")
    m = sub.add_parser("make", help="write a student copy")
    m.add_argument("out", help="the new folder (must not exist)")
    m.add_argument("--only", help="assignment numbers, e.g. 1,3 (default: all)")
    g = sub.add_parser("grade", help="grade a copy's code with this repository's tests")
    g.add_argument("--repo", default=HERE, help="the code to grade (default: this repository)")
    g.add_argument("--only", help="assignment numbers, e.g. 1,3 (default: all)")
    g.add_argument("--records", help="the folder of handed-in run records for the experiments (10, 11)")
    args = p.parse_args(argv)
    with exit_on_usage_error():
        if args.command is None:
            return list_assignments()
        chosen = parse_only(args.only)
        if args.command == "make":
            return make(args.out, chosen)
        if not os.path.isfile(os.path.join(args.repo, "dit.py")):
            raise UsageError(f"--repo {args.repo}: no dit.py there; point it at a copy that make wrote.")
        if args.records is not None and not os.path.isdir(args.records):
            raise UsageError(f"--records {args.records}: no such folder.")
    sys.exit(0 if grade(args.repo, chosen, args.records) else 1)


if __name__ == "__main__":
    main()
