"""Generate training and held-out files for one task::

    python data_generation/generate_addition.py                      # all three methods, paper scale
    python data_generation/generate_dp.py --methods retuning --preset small --seed 1
    python data_generation/generate_parity.py --preset paper --out-dir data
    python data_generation/generate.py --task addition --preset small --lengths 1-8

Writes ``<out-dir>/<task>_<method>_<preset>_{train,test,meta}.json`` per method (see
pipeline.py). Bad arguments give one line on stderr and exit status 2, before anything is written.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_generation.pipeline import file_names, generate, problems_within_limits  # noqa: E402
from tasks import get_task, parse_lengths, task_names  # noqa: E402
from tasks.base import METHODS  # noqa: E402


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line (``prog: error: ...``) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(task_name: str | None) -> OneLineParser:
    prog = f"generate_{task_name}.py" if task_name else "generate.py"
    description = __doc__.split("\n\n")[0].rstrip(":") + "."
    parser = OneLineParser(prog=prog, description=description.replace("one task", task_name or "one task"))
    if task_name is None:
        parser.add_argument("--task", required=True, help=", ".join(task_names()))
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma list of baseline, scratchpad, retuning (default: all)")
    presets = get_task(task_name).presets if task_name else ("paper", "small", "limited")
    preset_notes = {"paper": "SPEC sampling", "small": "tiny model on a CPU",
                    "limited": "addition's 150-problem set"}
    parser.add_argument("--preset", default="paper", help=", ".join(
        f"{name} ({preset_notes.get(name, 'see the task module')})" for name in presets) + " (default paper)")
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    parser.add_argument("--out-dir", default="data", help="default data")
    parser.add_argument("--lengths", help="problem lengths drawn for training instead of the "
                                          "preset's, e.g. 1-8 or 1,3,5-7")
    parser.add_argument("--test-per-length", type=int, default=100,
                        help="held-out problems per training length (default 100)")
    parser.add_argument("--max-problems", type=int, default=2_000_000,
                        help="refuse a set of more training problems (default 2,000,000; the "
                             "largest preset draws 304,000)")
    parser.add_argument("--max-gb", type=float, default=20.0,
                        help="refuse a training file estimated larger (default 20 GB)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def check_out_dir(out_dir: str) -> None:
    """Create the folder if needed and prove it writable; OSError otherwise."""
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryFile(dir=out_dir):
        pass


def main(argv: list[str] | None = None, task_name: str | None = None) -> int:
    parser = build_parser(task_name)
    args = parser.parse_args(argv)
    try:
        task = get_task(task_name or args.task)
    except KeyError as error:
        parser.error(str(error.args[0]))
    methods = [method.strip() for method in args.methods.split(",") if method.strip()]
    unknown = [method for method in methods if method not in METHODS]
    if unknown or not methods:
        parser.error(f"--methods: unknown method {', '.join(unknown) or '(none)'}; "
                     f"known: {', '.join(METHODS)}")
    if args.preset not in task.presets:
        parser.error(f"--preset: {task.name} has no preset {args.preset!r}; "
                     f"known: {', '.join(task.presets)}")
    try:
        lengths = parse_lengths(args.lengths) if args.lengths is not None else None
    except ValueError as error:
        parser.error(str(error))
    for flag, value in (("--max-problems", args.max_problems), ("--max-gb", args.max_gb)):
        if not value > 0:
            parser.error(f"{flag}: must be more than 0, got {value}")
    if args.test_per_length < 0:
        parser.error(f"--test-per-length: must be 0 or more, got {args.test_per_length}")
    try:
        check_out_dir(args.out_dir)
    except OSError as error:
        parser.error(f"--out-dir: cannot write to {args.out_dir!r} ({error.strerror or error})")

    # A kill (SIGTERM) unwinds like Ctrl-C, so the half-written temporary files are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    drawn = {}
    for method in methods:  # every method's problems and size first: one refused, none written
        try:
            drawn[method] = problems_within_limits(task, method, args.preset, args.seed, lengths,
                                                   args.max_problems, args.max_gb * 1e9)
        except ValueError as error:
            parser.error(f"{task.name} {method} {args.preset}: {error}")
    for method in methods:
        try:
            meta = generate(task, method, args.preset, args.seed, args.out_dir, lengths,
                            args.test_per_length, progress=not args.quiet, problems=drawn.pop(method))
        except ValueError as error:  # the task cannot sample these settings: nothing was written
            parser.error(f"{task.name} {method} {args.preset}: {error}")
        except OSError as error:
            print(f"{parser.prog}: error: writing {args.out_dir}: {error}", file=sys.stderr)
            return 1
        names = file_names(task, method, args.preset)
        print(f"{os.path.join(args.out_dir, names['train'])}: {meta['n_train']:,} records "
              f"({meta['n_train_problems']:,} problems, lengths {meta['train_lengths'][0]}-"
              f"{meta['train_lengths'][-1]}); test {meta['n_test']:,} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
