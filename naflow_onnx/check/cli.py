"""``naflow check`` and ``naflow baseline`` on the command line; the work is ``check.run``.

``main_check(argv)`` / ``main_baseline(argv)`` take the arguments after the subcommand and return
the exit code: 0 every check passed (baseline: recorded), 1 a check failed, 2 the run itself
failed (bad configuration, model, baseline or image: one line on stderr), 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..methods import METHODS
from .run import DEFAULT_OUT, CheckOptions, record_baseline, run


def build_check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="naflow check",
        description="Gate a model on attention checks over a set of images (docs/check.md). "
                    "Exit 0: all checks pass; 1: a check failed; 2: the run itself failed.")
    p.add_argument("model", help="the .onnx file")
    p.add_argument("--config", required=True, help="the check configuration (TOML)")
    p.add_argument("--baseline", help="a baseline .npz from `naflow baseline` (overrides "
                   "[baseline] path)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"report folder: new, empty or an earlier "
                   f"naflow output (replaced atomically; anything else is refused) "
                   f"(default: {DEFAULT_OUT}/): report.json, junit.xml, report.html")
    _common(p, resume=True)
    p.add_argument("--html-all", action="store_true", help="draw the flows of passing images too")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    return p


def _common(p: argparse.ArgumentParser, resume: bool = False) -> None:
    from ..cli import add_backend_options
    add_backend_options(p, resume_help="reuse the flows of images already analysed in --out by a "
                        "finished, failed or interrupted run (same model, image and settings; "
                        "docs/ray.md)" if resume else None)
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--method", choices=METHODS, help="map method (default: [analysis] method, "
                   "else naflow)")
    p.add_argument("--threads", type=int, help="torch/onnxruntime threads per process")
    p.add_argument("--provider", default="auto", help="onnxruntime provider: auto, cpu, cuda")
    p.add_argument("--device", help="torch device of the rebuild (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the model cache")
    p.add_argument("--debug", action="store_true", help="tracebacks")


def _guard(fn, args) -> int:
    from ..errors import run_command
    return run_command(fn, args, "no report written")


def options_from(args) -> CheckOptions:
    """The library options of the command's arguments (checked: one line, exit 2)."""
    opts = CheckOptions(method=args.method, jobs=args.jobs, threads=args.threads,
                        provider=args.provider, device=args.device, backend=args.backend,
                        address=args.address, workers=args.workers, quiet=args.quiet,
                        batch=args.batch, cache=not args.no_cache)
    opts.validate()
    return opts


def _cmd_check(args) -> int:
    from ..resume import RunState
    opts = options_from(args)
    state = RunState(args.out, resume=args.resume, command="check")
    state.open()            # --out refused (or in use by another run) before any analysis
    try:
        result = run(args.model, args.config, baseline=args.baseline, options=opts, state=state)
        out = result.write(args.out, html_all=args.html_all, state=state)
    except BaseException:
        state.abandon()       # finished flows stay in .OUT.partial/ for --resume
        raise
    code, report = result.code, result.report
    if args.json:
        from .report import json_text
        print(json_text(report))
        _print_summary(report, out, stream=sys.stderr)
    else:
        _print_summary(report, out)
    for e in report["images"]:
        if e["status"] == "error":
            print(f"naflow: error: {e['key']}: {e['error']}", file=sys.stderr)
            if args.debug and e.get("traceback"):
                print(e["traceback"], file=sys.stderr)
    for r in report["model_checks"]:
        if r["status"] == "error":
            print(f"naflow: error: sanity gate: {r['message']}", file=sys.stderr)
    return code


def main_check(argv=None) -> int:
    """``naflow check MODEL --config FILE [--baseline B] [--out DIR] [--jobs N] [--method M]``."""
    args = build_check_parser().parse_args(argv)
    return _guard(_cmd_check, args)


def _print_summary(report: dict, out: Path, stream=None) -> None:
    stream = stream or sys.stdout
    for e in report["images"]:
        if e["status"] == "error":
            print(f"ERROR {e['key']}: {e['error']}", file=stream)
            continue
        bad = [r for r in e["checks"] if r["status"] == "fail"]
        word = "FAIL " if bad else "pass "
        detail = "; ".join(f"{r['check']}: {r['message']}" for r in bad) if bad else \
            ", ".join(f"{r['check']} {_short(r)}" for r in e["checks"])
        print(f"{word}{e['key']}: {detail}", file=stream)
    for r in report["model_checks"]:
        word = {"pass": "pass ", "fail": "FAIL ", "error": "ERROR"}.get(r["status"], r["status"])
        print(f"{word} model {r['check']}: {r['message']}", file=stream)
    s = report["summary"]
    print(f"naflow check: {s['images']} images, {s['checks']} checks: {s['passed']} passed, "
          f"{s['failed']} failed, {s['skipped']} skipped, {s['errors']} errors -> "
          f"{out / 'report.html'}", file=stream)


def _short(r: dict) -> str:
    v = r.get("value")
    if r["status"] == "skip":
        return "skipped"
    if isinstance(v, float):
        return f"{v:.3f}"
    return "ok" if r["status"] == "pass" else str(v)


# ------------------------------------------------------------------------------------------------
# naflow baseline


def build_baseline_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="naflow baseline",
        description="Record the maps of a trusted model version for `naflow check --baseline`.")
    p.add_argument("model", help="the .onnx file of the trusted model")
    p.add_argument("--config", required=True, help="the check configuration (TOML): its inputs "
                   "and [analysis] settings are used")
    p.add_argument("-o", "--output", dest="o", required=True, help="the baseline file (.npz), "
                   "written atomically; an existing file is replaced only if it is a baseline")
    _common(p)
    return p


def _cmd_baseline(args) -> int:
    from ..io import check_output_file
    from .checks import is_baseline_file
    check_output_file(args.o, "baseline file", is_baseline_file)     # before any work
    meta = record_baseline(args.model, args.config, args.o, options_from(args))
    print(f"naflow baseline: {len(meta['images'])} images x {len(meta['model']['layers'])} layers "
          f"of model sha256 {meta['model']['sha256'][:12]} ({meta['analysis']['method']}) -> {args.o}")
    return 0


def main_baseline(argv=None) -> int:
    """``naflow baseline MODEL --config FILE -o baseline.npz [--jobs N] [--method M]``."""
    args = build_baseline_parser().parse_args(argv)
    return _guard(_cmd_baseline, args)
