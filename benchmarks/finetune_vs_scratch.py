"""Fine-tuning a trained backbone vs training from scratch, at the same budget, on a small
synthetic set of new identities: verification accuracy on held-out identities.

    python -m benchmarks.finetune_vs_scratch
    python -m benchmarks.finetune_vs_scratch --init-from outputs/train/<run>   # skip pretraining
    python -m benchmarks.finetune_vs_scratch -- trainer.max_epochs=10          # another budget

1. "A model trained elsewhere": the default recipe on 200 synthetic identities × 20 images for
   2 epochs (``benchmarks.head_accuracy``'s cached set), unless ``--init-from`` names one.
2. The small task: 100 other identities (another seed) × 3 images with stronger variation
   (``variation=1.5``: pose, light, clutter, noise), verified on 50 further unseen identities
   (1,000 pairs).
3. On it, with the same epochs, batch size, image size and seed: ``experiment=finetune_small``
   from the model of step 1, and the same at the base learning rate with nothing frozen;
   ``experiment=small_data`` from scratch; the default recipe from scratch. Each is the real
   ``python train.py ...``; the numbers are read from each run's ``metrics.json``, beside its
   baselines: raw-pixel cosine similarity, the untrained network, and the pretrained network
   before fine-tuning.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = [
    "data.synthetic.root=${data_dir}/synthetic_faces_200x20",  # head_accuracy's, cached
    "data.synthetic.num_train_identities=200",
    "data.synthetic.images_per_train_identity=20",
    "trainer.max_epochs=2",
]
SMALL_TASK = [
    "data.synthetic.root=${data_dir}/synthetic_faces_small_100x3",
    "data.synthetic.num_train_identities=100",
    "data.synthetic.images_per_train_identity=3",
    "data.synthetic.num_verification_identities=50",
    "data.synthetic.images_per_verification_identity=6",
    "data.synthetic.num_pairs=1000",
    "data.synthetic.seed=7",  # identities the pretraining (seed 0) never drew
    "data.synthetic.variation=1.5",
]
BUDGET = ["trainer.max_epochs=20", "data.batch_size=16"]
RUNS = {  # name -> (run folder, overrides); {init_from} is the pretrained run
    "fine-tuned (experiment=finetune_small)": (
        "finetune_small", ["experiment=finetune_small", "model.init_from={init_from}"]),
    # the same without freeze, backbone learning-rate scale and frozen BatchNorm statistics
    "fine-tuned at the base rate": (
        "finetune_base_rate", ["experiment=finetune_small", "model.init_from={init_from}",
                               "model.freeze_backbone_epochs=0", "model.backbone_lr_scale=1.0",
                               "model.freeze_batchnorm=false"]),
    "from scratch (experiment=small_data)": ("small_data", ["experiment=small_data"]),
    "from scratch (default recipe)": ("default", []),
}
QUIET = ["logger=none", "~callbacks.projector"]  # nothing shown: the table is the output


def train(run_dir: Path, overrides: list[str]) -> tuple[dict, float]:
    """One ``python train.py`` run: its metrics.json and minutes; exits with its last line
    when it fails."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), f"hydra.run.dir={run_dir}", *overrides],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["(no output)"]
        raise SystemExit(f"{run_dir.name}: training failed: {lines[-1]}")
    return json.loads((run_dir / "metrics.json").read_text()), (time.perf_counter() - start) / 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-from", help="a trained run folder or checkpoint (skips step 1)")
    parser.add_argument("--output", default="outputs/finetune_vs_scratch")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the small task")
    args = parser.parse_args()
    output = Path(args.output).absolute()

    init_from = args.init_from
    if init_from is None:
        metrics, minutes = train(output / "pretrained", PRETRAIN + QUIET)
        init_from = str(output / "pretrained")
        print(f"pretrained: {' '.join(PRETRAIN)}: accuracy on its own held-out identities "
              f"{metrics['verification']['synthetic']['accuracy']:.4f} ({minutes:.1f} min)")
    small = SMALL_TASK + BUDGET + args.overrides
    print(f"small task, same budget for every run: {' '.join(small)}")
    width = max(map(len, RUNS)) + 2
    print(f"{'run':<{width}}{'accuracy':>18}{'AUC':>8}{'minutes':>9}", flush=True)
    results = {}
    for name, (folder, choice) in RUNS.items():
        overrides = [o.format(init_from=init_from) for o in choice] + small + QUIET
        metrics, minutes = train(output / folder, overrides)
        results[name] = metrics
        final = metrics["verification"]["synthetic"]
        accuracy = f"{final['accuracy']:.4f} ± {final['accuracy_std']:.4f}"
        print(f"{name:<{width}}{accuracy:>18}{final['auc']:>8.4f}{minutes:>9.1f}", flush=True)

    fine, _, scratch, default = (results[name] for name in RUNS)
    baselines = scratch["baselines"]
    print(f"{'raw pixels':<{width}}{baselines['raw_pixels']['synthetic']:>18.4f}")
    print(f"{'untrained network':<{width}}{baselines['untrained']['synthetic']:>18.4f}")
    print(f"{'pretrained, not fine-tuned':<{width}}"
          f"{fine['baselines']['untrained']['synthetic']:>18.4f}")  # measured before training
    a, b = (m["verification"]["synthetic"]["accuracy"] for m in (fine, scratch))
    c = default["verification"]["synthetic"]["accuracy"]
    print(f"fine-tuned - from scratch (small_data): {a - b:+.4f} accuracy; errors: "
          f"{(1 - b) / max(1 - a, 1e-9):.2f}x fewer when fine-tuned "
          f"({(1 - c) / max(1 - a, 1e-9):.2f}x against the default recipe)")


if __name__ == "__main__":
    main()
