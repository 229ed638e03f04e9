"""Shared fixtures: a small synthetic face dataset made once per test session."""

import pytest

from facetrain.data import SyntheticFaces


@pytest.fixture(scope="session")
def tiny_faces(tmp_path_factory) -> SyntheticFaces:
    """40 training identities × 10 images, 10 held-out identities, 200 verification pairs."""
    return SyntheticFaces(
        root=str(tmp_path_factory.mktemp("faces") / "synthetic"),
        num_train_identities=40,
        images_per_train_identity=10,
        num_verification_identities=10,
        images_per_verification_identity=6,
        num_pairs=200,
        seed=3,
        workers=1,
    ).generate()
