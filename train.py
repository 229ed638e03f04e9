"""``python train.py loss=arcface backbone=mobilefacenet ...`` — see facetrain/train.py."""

from facetrain.train import main

if __name__ == "__main__":
    main()
