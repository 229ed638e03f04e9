"""Sub-center ArcFace (Deng et al., ECCV 2020): K centers per class; a sample's cosine to a
class is its cosine to the nearest of the K, so noisy images gather at non-dominant centers."""

from facetrain.heads.arcface import ArcFace


class SubCenterArcFace(ArcFace):
    """ArcFace on ``max_k cos(x, W_{j,k})``; paper: K=3, s=64, m=0.5.

    The store holds (num_classes · K, embedding_size) centers, class-major: the rows of class j
    are ``j·K … j·K + K − 1``, as in insightface (``weight.view(C, K, D)`` recovers them), and
    hands the margin the max over each class's K. Runs on the full class-center store only.
    """

    stores = ("full",)

    def __init__(self, scale: float = 64.0, margin: float = 0.5, subcenters: int = 3):
        super().__init__(scale, margin)
        self.subcenters = subcenters
        self.centers_per_class = subcenters
