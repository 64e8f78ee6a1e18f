"""Errors a user can act on. Each carries one line saying what is wrong and where.

The CLI prints ``str(error)`` and exits non-zero (no traceback unless ``--debug``); anything else
that escapes is a bug in this project.
"""


class NAFlowError(Exception):
    """Base class: bad input or a model this tool cannot analyse."""

    exit_code = 2


class ModelError(NAFlowError):
    """The .onnx file is missing, not ONNX, truncated, invalid or too large."""


class UnsupportedOpError(NAFlowError):
    """An op (or an attribute of one) that has no torch rebuild or no inverse rule."""


class ImageError(NAFlowError):
    """An image that cannot be read or does not fit the model input."""


class PreprocessError(NAFlowError):
    """A preprocessing that does not fit the model's input."""


class TargetError(NAFlowError):
    """A target class that does not exist."""


class ParityError(NAFlowError):
    """The torch rebuild disagrees with onnxruntime beyond tolerance."""


class OutputError(NAFlowError):
    """The output folder cannot be written."""


def run_command(fn, args, nothing: str = "no output written") -> int:
    """Run one CLI command ``fn(args)``: a NAFlowError becomes one line on stderr and its exit
    code (the traceback with ``args.debug``), Ctrl-C exits 130 and running out of memory 2;
    ``nothing`` says what was not written."""
    import sys

    try:
        return fn(args)
    except KeyboardInterrupt:
        print(f"naflow: interrupted; {nothing}", file=sys.stderr)
        return 130
    except NAFlowError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"naflow: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except MemoryError:
        print("naflow: error: out of memory", file=sys.stderr)
        return 2
