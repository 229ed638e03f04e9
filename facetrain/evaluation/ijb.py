"""IJB-B / IJB-C: template-based 1:1 verification and open-set 1:N identification, read from
the folder layout of insightface's IJB release (the one arcface_torch's ``eval_ijbc.py``,
AdaFace's ``validate_IJB_BC.py`` and CVLface read)::

    IJB_ROOT/IJBC/loose_crop/<image>                  the loosely cropped face photos
    IJB_ROOT/IJBC/meta/ijbc_name_5pts_score.txt       <image> x1 y1 ... x5 y5 <faceness score>
    IJB_ROOT/IJBC/meta/ijbc_face_tid_mid.txt          <image> <template id> <media id>
    IJB_ROOT/IJBC/meta/ijbc_template_pair_label.txt   <template id> <template id> <1 same, 0 not>
    IJB_ROOT/IJBC/meta/ijbc_1N_gallery_G1.csv, _G2    TEMPLATE_ID,SUBJECT_ID,... after a header
    IJB_ROOT/IJBC/meta/ijbc_1N_probe_mixed.csv        the same columns, the probe templates

IJB-B is ``IJBB/`` with ``ijbb_`` files and galleries S1 and S2. Line i of ``name_5pts_score``
and of ``face_tid_mid`` are the same face (insightface pairs them by position; here their image
names must also agree). The landmarks are in photo pixels, in insightface's order (left eye,
right eye, nose tip, left and right mouth corner).

1:1, as ``eval_ijbc.py`` computes it: every face is warped by its five landmarks onto the
112x112 arcface template (``facetrain.align``), embedded (with flip-test, the embeddings of the
crop and its mirror summed), multiplied by its faceness score (``faceness=True``, eval_ijbc's
default), the faces of one media of a template (frames of one video) averaged, the media of a
template summed, and the sum L2-normalised; a pair's score is the cosine of its two templates.
TAR at each FAR is over all pairs, at the lowest threshold whose FAR <= the target
(``facetrain.evaluation.verification.tar_at_far``); eval_ijbc takes the ROC point whose FAR is
nearest the target instead, which may lie above it. Both agree to the resolution of the ROC.

1:N follows the open-set protocol of the IJB-C paper (Maze et al., ICB 2018, "test 4"), with
NIST FRVT's definitions: each gallery (G1, G2) is searched on its own by every probe template
of ``probe_mixed``; a probe whose subject is enrolled in that gallery is a mated search, any
other a non-mated one. A subject's score is its best gallery template's cosine. CMC rank-k: the
fraction of mated searches whose subject is among the k best (a tie with another subject counts
against it). TPIR at FPIR: the fraction of mated searches whose subject is ranked first with a
score >= t, at the lowest threshold t where the fraction of non-mated searches whose best score
is >= t is at most the FPIR. Reported per gallery and as the mean of the two. (insightface's
``ijb_1n.py``, which AdaFace reuses, joins G1 and G2 into one closed-set gallery instead: every
search is mated, its "FPIR" counts non-mate gallery scores of those searches and its TPIR does
not ask for rank 1, so its TPIR numbers are not comparable with these; its CMC is over the
joined gallery.)
"""

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from facetrain.align import align_face
from facetrain.data.images import DECODE_ERRORS, DatasetError, read_rgb
from facetrain.evaluation.embeddings import embed_dataset
from facetrain.evaluation.verification import equal_error_rate, roc_auc, roc_curve, tar_at_far

log = logging.getLogger(__name__)

# set name -> (file prefix, the two 1:N galleries)
SETS = {"IJBB": ("ijbb", ("S1", "S2")), "IJBC": ("ijbc", ("G1", "G2"))}
FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIR_TARGETS = (1e-2, 1e-1)
RANKS = (1, 5, 10)
TEMPLATE = "arcface_112x112"  # the crops IJB numbers are published on


@dataclass(frozen=True)
class IJBProtocol:
    """An IJB set's faces, templates, pairs and 1:N lists, as read by ``open_ijb``. Row i of
    ``images``, ``landmarks``, ``faceness``, ``templates`` and ``medias`` is one face."""

    name: str  # IJBB or IJBC
    folder: Path  # IJB_ROOT/IJBC
    images: list[str]  # relative to folder/loose_crop
    landmarks: np.ndarray  # (N, 5, 2) float32, photo pixels
    faceness: np.ndarray  # (N,) float32 detector scores
    templates: np.ndarray  # (N,) int64
    medias: np.ndarray  # (N,) int64
    pairs: np.ndarray  # (P, 2) int64 template ids
    same: np.ndarray  # (P,) bool
    face_list: Path  # the name_5pts_score file, named in image errors
    face_lines: np.ndarray  # (N,) its line numbers
    # gallery name -> (template ids, subject ids), one entry per template; empty without 1:N
    galleries: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    probes: tuple[np.ndarray, np.ndarray] | None = None

    def faces(self, transform=None, template: str = TEMPLATE) -> "AlignedFaces":
        return AlignedFaces(self.folder / "loose_crop", self.images, self.landmarks,
                            self.face_list, self.face_lines, transform, template)


class AlignedFaces(Dataset):
    """Faces warped by their landmarks onto ``template`` (the arcface one the published IJB
    numbers use, or the one of a checkpoint's input size), as (image, row index). Holds only
    what a loader worker needs (not IJB-C's 15.7M pairs)."""

    def __init__(self, root: Path, images: list[str], landmarks: np.ndarray, face_list: Path,
                 face_lines: np.ndarray, transform=None, template: str = TEMPLATE):
        self.root, self.images, self.landmarks = root, images, landmarks
        self.face_list, self.face_lines = face_list, face_lines
        self.transform, self.template = transform, template

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        path = self.root / self.images[index]
        try:
            image = read_rgb(path)
        except (FileNotFoundError, *DECODE_ERRORS) as error:
            raise DatasetError(
                f"cannot read IJB image {path} ({type(error).__name__}: {error}), listed at "
                f"{self.face_list}:{self.face_lines[index]}"
            ) from None
        face = align_face(image, self.landmarks[index], self.template)
        if self.transform is not None:
            face = self.transform(image=face)["image"]
        return face, index


def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetError(
            f"IJB {what} {path} does not exist; the official layout is "
            f"IJB_ROOT/<IJBB|IJBC>/meta/ (insightface's IJB release)"
        )
    return path


def _numbered_lines(path: Path):
    """(line number, fields, line) of each non-blank line."""
    with open(path, errors="replace") as file:
        for number, line in enumerate(file, start=1):
            fields = line.split()
            if fields:
                yield number, fields, line.rstrip("\n")


def read_face_list(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """``name_5pts_score``: (image names, landmarks (N, 5, 2), faceness (N,), line numbers)."""
    names, values, lines = [], [], []
    for number, fields, line in _numbered_lines(_existing(path, "face list")):
        try:
            if len(fields) != 12:
                raise ValueError
            values.append([float(value) for value in fields[1:]])
        except ValueError:
            raise _face_line_error(path, number, line) from None
        names.append(fields[0])
        lines.append(number)
    if not names:
        raise DatasetError(f"IJB face list {path} lists no faces")
    values = np.array(values, dtype=np.float32)
    infinite = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if len(infinite):
        number = lines[infinite[0]]
        raise _face_line_error(path, number, next(t for n, _, t in _numbered_lines(path)
                                                  if n == number))
    return names, values[:, :10].reshape(-1, 5, 2), values[:, 10], np.array(lines)


def _face_line_error(path: Path, number: int, line: str) -> DatasetError:
    return DatasetError(
        f"{path}:{number}: expected '<image> x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 <faceness>' (a name "
        f"and 11 finite numbers), got {line!r}"
    )


def read_template_media(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """``face_tid_mid``: (image names, template ids, media ids, line numbers)."""
    names, ids, lines = [], [], []
    for number, fields, line in _numbered_lines(_existing(path, "template/media list")):
        try:
            if len(fields) != 3:
                raise ValueError
            ids.append((int(fields[1]), int(fields[2])))
        except ValueError:
            raise DatasetError(
                f"{path}:{number}: expected '<image> <template id> <media id>' (two integers "
                f"after the name), got {line!r}"
            ) from None
        names.append(fields[0])
        lines.append(number)
    ids = np.array(ids, dtype=np.int64).reshape(-1, 2)
    return names, ids[:, 0], ids[:, 1], np.array(lines)


def read_template_pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``template_pair_label``: (pairs (P, 2) template ids, same (P,)). IJB-C has 15.7 million
    lines: numpy parses them, and only a file it rejects is read line by line to name the
    first bad line."""
    _existing(path, "template pair list")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "input contained no data"
        try:
            table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
        except ValueError:
            table = None
    if table is None or table.shape[1:] != (3,) or not np.isin(table[:, 2], (0, 1)).all():
        for number, fields, line in _numbered_lines(path):
            if len(fields) != 3 or fields[2] not in ("0", "1") or not all(
                _is_int(value) for value in fields[:2]
            ):
                raise DatasetError(
                    f"{path}:{number}: expected '<template id> <template id> <label>' with label "
                    f"1 (same subject) or 0, got {line!r}"
                )
        if table is None or table.size:  # every line looked right, numpy still refused it
            raise DatasetError(f"{path}: cannot read '<template id> <template id> <label>' lines")
    if not table.size:
        raise DatasetError(f"IJB template pair list {path} lists no pairs")
    same = table[:, 2] == 1
    if same.all() or not same.any():
        raise DatasetError(
            f"IJB template pair list {path} needs both same (1) and different (0) pairs"
        )
    return table[:, :2], same


def _is_int(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


def _line_numbers(path: Path) -> np.ndarray:
    """The line number of each non-blank line (what np.loadtxt counts as rows)."""
    with open(path, "rb") as file:
        blank = np.array([not line.strip() for line in file], dtype=bool)
    return np.flatnonzero(~blank) + 1


def read_subject_list(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 1:N gallery or probe CSV (a header, then ``TEMPLATE_ID,SUBJECT_ID,...`` per image):
    (template ids, subject ids, line of each template's first row), one entry per template in
    first-appearance order."""
    subjects: dict[int, int] = {}
    first_line: dict[int, int] = {}
    rows = _numbered_lines(_existing(path, "1:N list"))
    header = next(rows, None)  # (number, fields, line)
    if header is None or _is_int(header[2].split(",")[0]):
        raise DatasetError(
            f"{path}:1: expected the header 'TEMPLATE_ID,SUBJECT_ID,...' of an IJB 1:N list"
        )
    for number, _, line in rows:
        columns = line.split(",")
        try:
            template, subject = int(columns[0]), int(columns[1])
        except (ValueError, IndexError):
            raise DatasetError(
                f"{path}:{number}: expected 'TEMPLATE_ID,SUBJECT_ID,...' (two integers), "
                f"got {line!r}"
            ) from None
        if subjects.setdefault(template, subject) != subject:
            raise DatasetError(
                f"{path}:{number}: template {template} is subject {subject} here but subject "
                f"{subjects[template]} at line {first_line[template]}"
            )
        first_line.setdefault(template, number)
    if not subjects:
        raise DatasetError(f"IJB 1:N list {path} lists no templates")
    templates = np.fromiter(subjects, dtype=np.int64)
    return templates, np.fromiter(subjects.values(), dtype=np.int64), np.array(
        [first_line[t] for t in subjects]
    )


def _require_known(ids: np.ndarray, known: np.ndarray, path: Path, media_list: Path,
                   lines: np.ndarray | None = None) -> None:
    """Every template id in ``ids`` (a row per non-blank line of ``path``, at ``lines``; found
    only when needed) has faces, or name the first line with one that has none."""
    ids = ids.reshape(len(ids), -1)
    unknown = ~np.isin(ids, known)
    if unknown.any():
        row = int(np.flatnonzero(unknown.any(axis=1))[0])
        lines = _line_numbers(path) if lines is None else lines
        raise DatasetError(
            f"{path}:{lines[row]}: template {int(ids[row][unknown[row]][0])} has no face in "
            f"{media_list}"
        )


def find_set_folder(root: str | Path, name: str) -> Path:
    """``root/<name>`` (root is IJB_ROOT), or ``root`` itself when it is the set's folder."""
    root = Path(root).expanduser()
    prefix = SETS[name][0]
    for folder in (root / name, root):
        if (folder / "meta" / f"{prefix}_face_tid_mid.txt").is_file():
            return folder
    if not root.is_dir():
        raise DatasetError(f"IJB folder {root} does not exist (ijb.root)")
    expected = root / name / "meta" / f"{prefix}_face_tid_mid.txt"
    raise DatasetError(
        f"no {name} set under {root}: expected {expected} (the official layout "
        f"IJB_ROOT/{name}/meta/ and IJB_ROOT/{name}/loose_crop/)"
    )


def open_ijb(root: str | Path, name: str = "IJBC", identification: bool | str = "auto"
             ) -> IJBProtocol:
    """Read and check an IJB set's metadata (no image is opened; missing images are reported
    here, before any is embedded). ``identification``: read the 1:N lists too — ``"auto"`` when
    all three are in meta/, True requires them, False skips them."""
    if name not in SETS:
        raise DatasetError(f"ijb.set={name!r}: must be one of {', '.join(SETS)}")
    if identification not in (True, False, "auto"):
        raise DatasetError(f"ijb.identification={identification!r}: must be auto, true or false")
    folder = find_set_folder(root, name)
    prefix, gallery_names = SETS[name]
    meta = folder / "meta"
    face_list = meta / f"{prefix}_name_5pts_score.txt"
    media_list = meta / f"{prefix}_face_tid_mid.txt"
    pair_list = meta / f"{prefix}_template_pair_label.txt"

    names, landmarks, faceness, face_lines = read_face_list(face_list)
    media_names, templates, medias, media_lines = read_template_media(media_list)
    if len(media_names) != len(names):
        raise DatasetError(
            f"{media_list} lists {len(media_names)} faces but {face_list} {len(names)}; line i "
            f"of the two files must be the same face"
        )
    differ = np.flatnonzero(np.array(media_names) != np.array(names))
    if len(differ):
        i = int(differ[0])
        raise DatasetError(
            f"{media_list}:{media_lines[i]} names {media_names[i]!r} but {face_list}:"
            f"{face_lines[i]} names {names[i]!r}; line i of the two files must be the same face"
        )
    pairs, same = read_template_pairs(pair_list)
    known = np.unique(templates)
    _require_known(pairs, known, pair_list, media_list)

    images = folder / "loose_crop"
    missing = [i for i, image in enumerate(names) if not (images / image).is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} of the {len(names)} images listed in {face_list} are not in "
            f"{images}, the first {images / names[missing[0]]} (line {face_lines[missing[0]]})"
        )

    lists = [meta / f"{prefix}_1N_gallery_{g}.csv" for g in gallery_names]
    lists.append(meta / f"{prefix}_1N_probe_mixed.csv")
    galleries, probes = {}, None
    if identification is True or (identification == "auto" and all(p.is_file() for p in lists)):
        read = []
        for path in lists:
            ids, subjects, lines = read_subject_list(path)
            _require_known(ids, known, path, media_list, lines)
            read.append((ids, subjects))
        galleries = dict(zip(gallery_names, read[:2], strict=True))
        probes = read[2]
    elif identification == "auto":
        log.info("%s: no 1:N identification (%s not all in %s)", name,
                 ", ".join(p.name for p in lists), meta)
    return IJBProtocol(
        name=name, folder=folder, images=names, landmarks=landmarks, faceness=faceness,
        templates=templates, medias=medias, pairs=pairs, same=same, face_list=face_list,
        face_lines=face_lines, galleries=galleries, probes=probes,
    )


def template_features(
    embeddings: np.ndarray | torch.Tensor, templates: np.ndarray, medias: np.ndarray,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted template ids (T,), L2-normalised template embeddings (T, D) float64).

    Each face's embedding (times its weight, the faceness score) is averaged with the other
    faces of its (template, media), and a template is the sum of its media, normalised; a
    template whose sum is zero stays zero (cosine 0 with everything), as sklearn's normalize
    leaves it in eval_ijbc.py. The sums run in torch on the embeddings' device (IJB-C's 469k
    faces: ~1 s on 2 CPU cores, where numpy's reduceat takes ~15).
    """
    features = torch.as_tensor(embeddings).to(torch.float64, copy=True)  # IJB-C: 2 GB
    if weights is not None:
        features *= torch.as_tensor(weights, device=features.device).double()[:, None]
    keys, media_of = np.unique(np.stack([templates, medias], axis=1), axis=0,
                               return_inverse=True)
    media_of = media_of.reshape(-1)
    sizes = torch.as_tensor(np.bincount(media_of), device=features.device).double()
    media_sum = features.new_zeros(len(keys), features.shape[1]).index_add_(
        0, torch.as_tensor(media_of, device=features.device), features)
    ids, template_of = np.unique(keys[:, 0], return_inverse=True)
    summed = features.new_zeros(len(ids), features.shape[1]).index_add_(
        0, torch.as_tensor(template_of.reshape(-1), device=features.device),
        media_sum / sizes[:, None])
    norms = summed.norm(dim=1, keepdim=True)
    return ids, (summed / torch.where(norms > 0, norms, 1.0)).cpu().numpy()


def template_pair_scores(
    template_ids: np.ndarray, features: np.ndarray, pairs: np.ndarray,
    block_entries: int = 2**25,
) -> np.ndarray:
    """The cosine of each template pair (P, 2) of ids, from ``template_features``' output.

    IJB's pairs join few templates on one side (IJB-C: ~3.5k gallery templates) to all on the
    other, so the scores come from blocks of one side's templates times all templates, one GEMM
    each (~``block_entries`` scores), from which the pairs' entries are picked: ~11 s for
    IJB-C's 15.7M pairs on 2 cores, where gathering both rows of every pair takes ~70. When
    that side is large and the pairs few, the rows are gathered instead.
    """
    rows = np.searchsorted(template_ids, pairs)
    if len(np.unique(rows[:, 1])) < len(np.unique(rows[:, 0])):
        rows = rows[:, ::-1]  # cosine is symmetric: block the side with fewer templates
    scores = np.empty(len(rows))
    firsts = np.unique(rows[:, 0])
    if len(firsts) * len(features) > 32 * len(rows):  # a GEMM would score mostly unused entries
        chunk = max(1, block_entries // (8 * features.shape[1]))
        for start in range(0, len(rows), chunk):
            a, b = rows[start:start + chunk, 0], rows[start:start + chunk, 1]
            scores[start:start + chunk] = np.einsum("ij,ij->i", features[a], features[b])
        return scores
    order = np.argsort(rows[:, 0], kind="stable")
    starts = np.r_[np.searchsorted(rows[order, 0], firsts), len(rows)]
    per_block = max(1, block_entries // len(features))
    for block in range(0, len(firsts), per_block):
        members = firsts[block:block + per_block]
        similarities = features[members] @ features.T
        chosen = order[starts[block]:starts[min(block + per_block, len(firsts))]]
        scores[chosen] = similarities[np.searchsorted(members, rows[chosen, 0]), rows[chosen, 1]]
    return scores


def verification_metrics(scores: np.ndarray, same: np.ndarray, far_targets=FAR_TARGETS) -> dict:
    """TAR (and its threshold) at each FAR target over all pairs, None where the set has fewer
    than 1/FAR different pairs; ROC AUC and EER."""
    tars, thresholds = {}, {}
    for far in far_targets:
        found = tar_at_far(scores, same, far)
        tars[f"{far:g}"], thresholds[f"{far:g}"] = found if found else (None, None)
    return {
        "num_pairs": len(scores), "num_same": int(np.sum(same)), "tar_at_far": tars,
        "threshold_at_far": thresholds, "auc": roc_auc(scores, same),
        "eer": equal_error_rate(scores, same),
    }


def identification_metrics(
    probe_features: np.ndarray, probe_subjects: np.ndarray,
    gallery_features: np.ndarray, gallery_subjects: np.ndarray,
    fpir_targets=FPIR_TARGETS, ranks=RANKS,
) -> dict:
    """Open-set 1:N of L2-normalised probe templates against one gallery (the module's
    docstring gives the definitions): CMC at ``ranks`` and TPIR at ``fpir_targets``; None
    where there are no mated searches, or too few non-mated ones for the FPIR."""
    scores = np.asarray(probe_features) @ np.asarray(gallery_features).T
    subjects, column = np.unique(gallery_subjects, return_inverse=True)
    order = np.argsort(column, kind="stable")
    starts = np.flatnonzero(np.r_[True, column[order][1:] != column[order][:-1]])
    per_subject = np.maximum.reduceat(scores[:, order], starts, axis=1)  # best template each

    position = np.minimum(np.searchsorted(subjects, probe_subjects), len(subjects) - 1)
    mated = subjects[position] == probe_subjects
    mate_score = per_subject[mated, position[mated]]
    rank = (per_subject[mated] >= mate_score[:, None]).sum(axis=1)  # 1 = alone at the top
    # Detection: a mated search counts at threshold t when its subject is first and >= t; a
    # non-mated one raises a false alarm when its best score is >= t.
    detected = np.where(rank == 1, mate_score, -np.inf)
    top = per_subject[~mated].max(axis=1)
    found = bool(mated.any())
    is_mated = np.r_[np.ones(len(detected), bool), np.zeros(len(top), bool)]
    tpir = {}
    for fpir in fpir_targets:
        at = tar_at_far(np.r_[detected, top], is_mated, fpir) if found else None
        tpir[f"{fpir:g}"] = at[0] if at else None
    return {
        "gallery_subjects": len(subjects), "mated": int(mated.sum()),
        "non_mated": int((~mated).sum()), "tpir_at_fpir": tpir,
        "cmc": {str(k): float(np.mean(rank <= k)) if found else None for k in ranks},
    }


def _mean_over_galleries(results: list[dict]) -> dict:
    def mean(values):
        return None if any(v is None for v in values) else float(np.mean(values))

    return {
        key: {k: mean([r[key][k] for r in results]) for k in results[0][key]}
        for key in ("tpir_at_fpir", "cmc")
    }


def thin_roc(far: np.ndarray, tar: np.ndarray, points: int = 2000):
    """At most ~``points`` points of an ROC curve for a plot: for FARs spaced evenly on a log
    axis, the last (highest-TAR) point at or below each; IJB-C's exact curve has millions."""
    if len(far) <= points:
        return far, tar
    smallest = far[far > 0].min() if (far > 0).any() else 1.0
    grid = np.geomspace(smallest, 1.0, points)
    keep = np.unique(np.r_[0, np.searchsorted(far, grid, side="right") - 1, len(far) - 1])
    return far[keep], tar[keep]


def evaluate_ijb(
    protocol: IJBProtocol, backbone: nn.Module, transform, *, flip: bool = True,
    faceness: bool = True, batch_size: int = 128, num_workers: int = 2,
    device: str | torch.device = "cpu", channels_last: bool = False,
    far_targets=FAR_TARGETS, fpir_targets=FPIR_TARGETS, ranks=RANKS, template: str = TEMPLATE,
) -> dict:
    """1:1 verification (and 1:N when the protocol has its lists) of ``backbone`` on an IJB
    set; ``transform`` takes the RGB crop aligned onto ``template`` to the backbone's input (the
    checkpoint's resize and normalisation). Returns the metrics plus ``scores`` (P,) and
    ``roc`` (far, tar), which are not JSON."""
    device = torch.device(device)
    loader = DataLoader(protocol.faces(transform, template), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    log.info("%s: embedding %d faces of %d templates", protocol.name, len(protocol.images),
             len(np.unique(protocol.templates)))
    start = time.perf_counter()
    embeddings = embed_dataset(backbone, loader, flip, device, channels_last)
    embedded = time.perf_counter()
    ids, features = template_features(embeddings, protocol.templates, protocol.medias,
                                      protocol.faceness if faceness else None)
    scores = template_pair_scores(ids, features, protocol.pairs)
    result = {
        "set": protocol.name, "flip_test": flip, "faceness": faceness,
        "num_images": len(protocol.images), "num_templates": len(ids),
        "verification": verification_metrics(scores, protocol.same, far_targets),
        "identification": None,
    }
    if protocol.galleries:
        probe_ids, probe_subjects = protocol.probes
        probe_features = features[np.searchsorted(ids, probe_ids)]
        per_gallery = {
            gallery: identification_metrics(
                probe_features, probe_subjects, features[np.searchsorted(ids, gallery_ids)],
                subjects, fpir_targets, ranks)
            for gallery, (gallery_ids, subjects) in protocol.galleries.items()
        }
        result["identification"] = {**per_gallery,
                                    "mean": _mean_over_galleries(list(per_gallery.values()))}
    seconds = time.perf_counter() - start
    far, tar, _ = roc_curve(scores, protocol.same)
    result.update(seconds=seconds, images_per_second=len(protocol.images) / (embedded - start),
                  scores=scores, roc=thin_roc(far, tar))
    log.info("%s: %d faces in %.1f s (%.1f faces/s), %d pairs", protocol.name,
             len(protocol.images), seconds, result["images_per_second"], len(scores))
    return result


def ijb_report(evaluated: dict[str, dict]) -> str:
    """The printed IJB tables for ``{checkpoint label: evaluate_ijb result}``: 1:1 TAR at each
    FAR, then (when evaluated) 1:N TPIR at each FPIR and CMC per gallery and their mean."""
    first = next(iter(evaluated.values()))
    fars = list(first["verification"]["tar_at_far"])
    lines = [f"{'checkpoint':<28}{'set':<6}{'images':>9}{'templates':>10}{'pairs':>11}"
             + "".join(f"{'TAR@' + far:>11}" for far in fars) + f"{'AUC':>8}"]
    for label, r in evaluated.items():
        v = r["verification"]
        lines.append(f"{label[:27]:<28}{r['set']:<6}{r['num_images']:>9}{r['num_templates']:>10}"
                     f"{v['num_pairs']:>11}" + "".join(_cell(v["tar_at_far"][far], 11)
                                                       for far in fars) + f"{v['auc']:>8.4f}")
    identified = {label: r["identification"] for label, r in evaluated.items()
                  if r["identification"]}
    if identified:
        some = next(iter(identified.values()))["mean"]
        fpirs, ranks = list(some["tpir_at_fpir"]), list(some["cmc"])
        lines.append(f"{'checkpoint':<28}{'set':<6}{'gallery':<9}{'mated':>7}{'non-mated':>10}"
                     + "".join(f"{'TPIR@' + f:>12}" for f in fpirs)
                     + "".join(f"{'rank-' + k:>9}" for k in ranks))
        for label, per_gallery in identified.items():
            for gallery, g in per_gallery.items():
                counts = (f"{g['mated']:>7}{g['non_mated']:>10}" if gallery != "mean"
                          else f"{'':>17}")
                lines.append(f"{label[:27]:<28}{evaluated[label]['set']:<6}{gallery:<9}{counts}"
                             + "".join(_cell(g["tpir_at_fpir"][f], 12) for f in fpirs)
                             + "".join(_cell(g["cmc"][k], 9) for k in ranks))
    return "\n".join(lines)


def _cell(value: float | None, width: int) -> str:
    return f"{value:>{width}.4f}" if value is not None else f"{'-':>{width}}"
