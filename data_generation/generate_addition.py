"""Addition datasets: ``python data_generation/generate_addition.py --preset small --methods retuning``.
Flags and files: data_generation/generate.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_generation.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(task_name="addition"))
