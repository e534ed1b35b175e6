"""Embedded demo: train a small CNN on scikit-learn's digits once, then compress it with slimmer.

    python examples/demo.py            # train (first run only), compress, print the table
    python examples/demo.py --retrain  # train again even if a saved model exists

The trained model is saved to examples/.cache/digits_cnn.pt and reused; the output goes to out/digits-demo/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

from examples.digits import train_digits_cnn  # noqa: E402
from slimmer.cli import main as slimmer_main  # noqa: E402

CACHE = REPOSITORY / "examples" / ".cache" / "digits_cnn.pt"
RECIPE = REPOSITORY / "recipes" / "digits-demo.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retrain", action="store_true", help="train the digits CNN again")
    parser.add_argument("-o", "--output", type=Path, default=REPOSITORY / "out" / "digits-demo")
    arguments = parser.parse_args()

    if arguments.retrain or not CACHE.exists():
        started = time.perf_counter()
        print("Training the digits CNN (first run only) ...", flush=True)
        model = train_digits_cnn()
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        partial = CACHE.with_suffix(".partial")
        torch.save({"state_dict": model.state_dict()}, partial)
        partial.replace(CACHE)
        print(f"Saved {CACHE} ({time.perf_counter() - started:.1f} s)", flush=True)
    else:
        print(f"Reusing {CACHE}", flush=True)

    command = ["apply", str(RECIPE), str(CACHE), "-o", str(arguments.output), "--force"]
    print("slimmer " + " ".join(command), flush=True)
    return slimmer_main(command)


if __name__ == "__main__":
    sys.exit(main())
