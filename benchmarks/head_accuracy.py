"""Every loss under the same short training budget on the synthetic faces: verification accuracy
on held-out identities, side by side.

    python -m benchmarks.head_accuracy                          # every configs/loss/ file
    python -m benchmarks.head_accuracy --heads arcface cosface -- trainer.max_epochs=3
    python -m benchmarks.head_accuracy --metric                 # metric losses beside the heads

Each entry runs the real ``python train.py loss=NAME ...`` with the same overrides and seed;
the table is read from each run's ``metrics.json``. ``--metric`` runs the metric losses, the
center loss, focal and their combinations next to ArcFace and softmax (``METRIC_RUNS``).
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
# name -> the overrides that make it: the metric-loss comparison (issue: the loss overview's
# losses and focal, next to the margin heads they are compared with)
METRIC_RUNS = {
    "arcface": ["loss=arcface"],
    "softmax": ["loss=softmax"],
    "focal (softmax, gamma 2)": ["loss=softmax", "classifier.focal_gamma=2"],
    "softmax + center": ["loss=center"],
    "arcface + center": ["loss=arcface", "auxiliary=[center]"],
    "contrastive": ["loss=contrastive"],
    "triplet semi-hard": ["loss=triplet"],
    "triplet batch-hard": ["loss=triplet", "loss.mining=batch_hard"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", nargs="+", default=sorted(
        p.stem for p in (REPO / "configs" / "loss").glob("*.yaml")))
    parser.add_argument("--metric", action="store_true", help="the metric-loss comparison")
    parser.add_argument("--output", default="outputs/head_accuracy")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    overrides = DEFAULT_BUDGET + args.overrides

    print(f"budget: {' '.join(overrides)}")
    runs = METRIC_RUNS if args.metric else {head: [f"loss={head}"] for head in args.heads}
    width = max(map(len, runs)) + 2
    print(f"{'run':<{width}}{'accuracy':>18}{'AUC':>8}{'untrained':>11}{'minutes':>9}")
    for name, choice in runs.items():
        folder = "".join(c if c.isascii() and c.isalnum() else "_" for c in name)  # Hydra-safe
        run_dir = Path(args.output) / folder
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, str(REPO / "train.py"), *choice, f"hydra.run.dir={run_dir}",
             *overrides],
            capture_output=True, text=True,
        )
        minutes = (time.perf_counter() - start) / 60
        if result.returncode != 0:
            print(f"{name:<{width}}failed: {result.stderr.strip().splitlines()[-1]}", flush=True)
            continue
        metrics = json.loads((run_dir / "metrics.json").read_text())
        final = metrics["verification"]["synthetic"]
        untrained = metrics["baselines"]["untrained"]["synthetic"]
        accuracy = f"{final['accuracy']:.4f} ± {final['accuracy_std']:.4f}"
        print(f"{name:<{width}}{accuracy:>18}{final['auc']:>8.4f}{untrained:>11.4f}"
              f"{minutes:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
