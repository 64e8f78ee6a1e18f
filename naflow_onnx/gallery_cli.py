"""``naflow gallery``: the command line of ``naflow_onnx.gallery`` (argparse lives here only)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import NAFlowError
from .gallery import build_gallery


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="naflow gallery",
                                description="Export every registry model to ONNX, analyse one photo "
                                            "with NAFlow, and write index.html + one picture per model.")
    p.add_argument("--out", required=True, help="output folder: new, empty or an earlier naflow "
                   "output (replaced atomically); anything else is refused")
    p.add_argument("--models", help="comma-separated registry names (default: all)")
    p.add_argument("--image", help="photo to analyse (default: skimage's chelsea.png)")
    p.add_argument("--size", type=int, default=None,
                   help="smaller input size for a quick gallery, e.g. 112 (default: each model's "
                        "registry size; AlexNet/VGG16 stay at 224)")
    p.add_argument("--damp", type=float, default=None, help="damping t (default 0.1)")
    p.add_argument("--tol", type=float, default=1e-4, help="solver tolerance (default 1e-4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    try:
        doc = build_gallery(args.out, models=models, image=args.image, size_override=args.size,
                            progress=not args.quiet and sys.stderr.isatty(), damp=args.damp,
                            tol=args.tol)
    except NAFlowError as exc:
        print(f"naflow gallery: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("naflow gallery: interrupted", file=sys.stderr)
        return 130
    failed = [r for r in doc["rows"] if r["status"] != "ok"]
    for r in doc["rows"]:
        if r["status"] == "ok":
            print(f"{r['model']:<20} {r['layers']:>4} layers  {r['analyze_s']:>7.1f} s  "
                  f"residual {r['max_residual']:.1e}  {r['target_text']}")
        else:
            print(f"{r['model']:<20} FAILED  {r['error']}", file=sys.stderr)
    print(f"gallery: {Path(args.out) / 'index.html'} ({len(doc['rows']) - len(failed)} of "
          f"{len(doc['rows'])} models, {doc['total_s']:.0f} s)")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
