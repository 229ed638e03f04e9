"""``python train.py loss=arcface backbone=mobilefacenet ...``: the same main as ``facetrain-train``
and ``python -m facetrain.cli.train`` (see facetrain/cli/train.py)."""

from facetrain.cli.train import main

if __name__ == "__main__":
    main()
