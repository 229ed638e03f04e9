"""Every margin head under the same short training budget on the synthetic faces: verification
accuracy on held-out identities, side by side.

    python -m benchmarks.head_accuracy                          # all heads, default budget
    python -m benchmarks.head_accuracy --heads arcface cosface -- trainer.max_epochs=3

Each head runs the real ``python train.py loss=NAME`` with the same overrides and seed; the
table is read from each run's ``metrics.json``.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET = [
    "data.synthetic.root=${data_dir}/synthetic_faces_200x20",  # keeps the default dataset cached
    "data.synthetic.num_train_identities=200",
    "data.synthetic.images_per_train_identity=20",
    "trainer.max_epochs=2",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", nargs="+", default=sorted(
        p.stem for p in (REPO / "configs" / "loss").glob("*.yaml")))
    parser.add_argument("--output", default="outputs/head_accuracy")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    overrides = DEFAULT_BUDGET + args.overrides

    print(f"budget: {' '.join(overrides)}")
    print(f"{'loss=':<12}{'accuracy':>18}{'AUC':>8}{'untrained':>11}{'minutes':>9}")
    for head in args.heads:
        run_dir = Path(args.output) / head
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, str(REPO / "train.py"), f"loss={head}", f"hydra.run.dir={run_dir}",
             *overrides],
            capture_output=True, text=True,
        )
        minutes = (time.perf_counter() - start) / 60
        if result.returncode != 0:
            print(f"{head:<12}{'failed: ' + result.stderr.strip().splitlines()[-1]}", flush=True)
            continue
        metrics = json.loads((run_dir / "metrics.json").read_text())
        final = metrics["verification"]["synthetic"]
        untrained = metrics["baselines"]["untrained"]["synthetic"]
        accuracy = f"{final['accuracy']:.4f} ± {final['accuracy_std']:.4f}"
        print(f"{head:<12}{accuracy:>18}{final['auc']:>8.4f}{untrained:>11.4f}{minutes:>9.1f}",
              flush=True)


if __name__ == "__main__":
    main()
