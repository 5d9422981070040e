"""Evaluate a trained model on parity; writes results/<run>/results.json and accuracy.png.

    python evaluation/evaluate_parity.py --checkpoint runs/<exp>            # defaults: config/evaluation/parity.yaml
    python evaluation/evaluate_parity.py --checkpoint runs/<exp>/step-7936 --lengths 2-20 --samples 10
    python evaluation/evaluate_parity.py --show-trace 0 --out results/<exp>

All flags: --help, or evaluation/cli.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from evaluation.cli import script_main  # noqa: E402

if __name__ == "__main__":
    script_main("parity")
