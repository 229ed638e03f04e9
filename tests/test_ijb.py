"""IJB-B/C evaluation: template fusion, 1:1 and 1:N metrics against hand-worked cases, and the
whole protocol on a small synthetic IJB-C folder written in the official formats, checked
against an independent computation (the test's own warp, network call, loops and brute force).
"""

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import run_cli
from PIL import Image
from test_eval import curve_pixels, eval_config, write_checkpoint

from facetrain.backbones import MobileFaceNet
from facetrain.checkpoint import load_backbone
from facetrain.cli import user_errors
from facetrain.data.images import DatasetError
from facetrain.data.synthetic import draw_face, sample_traits
from facetrain.embed import preprocessing
from facetrain.eval import evaluate
from facetrain.evaluation.ijb import (
    evaluate_ijb,
    identification_metrics,
    open_ijb,
    template_features,
    template_pair_scores,
    verification_metrics,
)

# The arcface 112x112 template (insightface's arcface_dst), written out here so that the test's
# synthetic landmarks do not come from the code under test.
ARCFACE_POINTS = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                           [41.5493, 92.3655], [70.7299, 92.2041]])
GALLERIES = {"G1": (0, 1, 2), "G2": (3, 4, 5)}  # subjects enrolled in each


# Hand-worked cases.


def test_template_fusion_hand_computed():
    # Template 7: faces 0 and 1 are frames of media 1, face 2 is media 2; template 3: two media.
    embeddings = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0], [1.0, 1.0], [2.0, 0.0]])
    templates = np.array([7, 7, 7, 3, 3])
    medias = np.array([1, 1, 2, 5, 6])
    weights = np.array([1.0, 0.5, 2.0, 1.0, 1.0])
    ids, features = template_features(embeddings, templates, medias, weights)
    # 7: mean(1*[1,0], 0.5*[0,1]) + 2*[3,4] = [0.5, 0.25] + [6, 8] = [6.5, 8.25]; 3: [3, 1].
    expected_7 = np.array([6.5, 8.25]) / np.hypot(6.5, 8.25)
    expected_3 = np.array([3.0, 1.0]) / np.hypot(3.0, 1.0)
    np.testing.assert_array_equal(ids, [3, 7])
    np.testing.assert_allclose(features, [expected_3, expected_7], atol=1e-12)
    # Unweighted: 7 = mean([1,0],[0,1]) + [3,4] = [3.5, 4.5].
    _, unweighted = template_features(embeddings, templates, medias)
    np.testing.assert_allclose(unweighted[1], np.array([3.5, 4.5]) / np.hypot(3.5, 4.5))

    pairs = np.array([[7, 3], [3, 3]])
    np.testing.assert_allclose(template_pair_scores(ids, features, pairs),
                               [expected_7 @ expected_3, 1.0])


@pytest.mark.parametrize("num_pairs", [3, 400])  # few pairs: rows gathered; many: GEMM blocks
def test_template_pair_scores_are_the_dot_products(num_pairs):
    rng = np.random.default_rng(num_pairs)
    features = rng.standard_normal((100, 8))
    ids = np.arange(100) * 3 + 1
    pairs = rng.integers(0, 100, (num_pairs, 2))
    direct = [features[a] @ features[b] for a, b in pairs]
    for block_entries in (100, 2**25):  # a GEMM per template, or one for all
        scores = template_pair_scores(ids, features, ids[pairs], block_entries=block_entries)
        np.testing.assert_allclose(scores, direct, rtol=1e-12)


def test_tar_at_far_on_constructed_scores():
    # 1000 different pairs scoring 0.000..0.999 and 10 same pairs at 0.9905, 0.9805, ... 0.9005:
    # FAR 1e-2 allows the 10 highest different pairs (>= 0.990): one same pair is above them.
    different = np.arange(1000) / 1000
    same_scores = 0.9905 - np.arange(10) / 100
    scores = np.r_[different, same_scores]
    same = np.r_[np.zeros(1000, bool), np.ones(10, bool)]
    result = verification_metrics(scores, same, (1e-4, 1e-3, 1e-2, 1e-1))
    # FAR 1e-3 allows 1 false accept (>= 0.999): none of the same pairs. FAR 1e-1: >= 0.900,
    # all 10. FAR 1e-4 cannot be measured with 1000 different pairs.
    assert result["tar_at_far"] == {"0.0001": None, "0.001": 0.0, "0.01": 0.1, "0.1": 1.0}
    assert result["threshold_at_far"]["0.01"] == 0.99  # the lowest that lets in only 10
    assert (result["num_pairs"], result["num_same"]) == (1010, 10)
    # AUC: same pair k (score 0.9905 - k/100) beats 991 - 10k of the 1000 different pairs.
    assert result["auc"] == pytest.approx(sum(991 - 10 * k for k in range(10)) / 10000)


def test_identification_on_a_constructed_score_matrix():
    # Gallery features = the identity, so probe row i of S is probe i's scores against the 4
    # gallery templates: subjects 10, 11, 12, 12 (12 enrolled twice: its best template counts).
    scores = np.array([
        [0.90, 0.30, 0.20, 0.10],  # subject 10: 0.9 first                      rank 1
        [0.80, 0.50, 0.10, 0.60],  # subject 11: 0.5 after 10 (0.8), 12 (0.6)   rank 3
        [0.20, 0.10, 0.30, 0.70],  # subject 12: best template 0.7 first        rank 1
        [0.40, 0.20, 0.10, 0.30],  # subject 99, not enrolled: best 0.4
        [0.10, 0.75, 0.20, 0.20],  # subject 98, not enrolled: best 0.75
        [0.60, 0.60, 0.10, 0.20],  # subject 10: tied with 11, counted against   rank 2
    ])
    result = identification_metrics(scores, np.array([10, 11, 12, 99, 98, 10]), np.eye(4),
                                    np.array([10, 11, 12, 12]), (0.5, 0.1), (1, 2, 3))
    assert (result["gallery_subjects"], result["mated"], result["non_mated"]) == (3, 4, 2)
    assert result["cmc"] == {"1": 0.5, "2": 0.75, "3": 1.0}
    # FPIR 0.5 allows one of the two non-mated searches: threshold 0.7 (just under 0.75) keeps
    # the rank-1 mates 0.9 and 0.7. FPIR 0.1 needs 10 non-mated searches.
    assert result["tpir_at_fpir"] == {"0.5": 0.5, "0.1": None}


# A synthetic IJB-C folder in the official formats.


@dataclass
class SyntheticIJB:
    root: Path  # IJB_ROOT: the set is root/IJBC
    faces: list[dict] = field(default_factory=list)  # name, template, media, faceness, matrix
    subject_of: dict[int, int] = field(default_factory=dict)  # template -> subject
    pairs: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def meta(self) -> Path:
        return self.root / "IJBC" / "meta"


def write_synthetic_ijb(root: Path, seed: int = 0) -> SyntheticIJB:
    """6 subjects, one gallery template each (G1: 0-2, G2: 3-5) and 4 probe templates each
    (non-contiguous ids), 1-3 faces per template, some of them frames of one media. Each face
    is a drawn 112x112 face placed in a 144x144 photo by a known similarity (rotation, scale,
    shift); its landmarks are the arcface points moved by it."""
    rng = np.random.default_rng(seed)
    traits = [sample_traits(rng) for _ in range(6)]
    ijb = SyntheticIJB(root)
    ijb.subject_of = {100 + s: s for s in range(6)}
    ijb.subject_of.update({200 + 7 * (4 * s + k): s for s in range(6) for k in range(4)})
    photos = root / "IJBC" / "loose_crop"
    photos.mkdir(parents=True)
    media = 5000
    for template, subject in ijb.subject_of.items():
        for k in range(int(rng.integers(1, 4))):
            media += k == 0 or rng.uniform() < 0.5  # else another frame of the same media
            angle, scale = rng.uniform(-0.3, 0.3), rng.uniform(0.9, 1.15)
            rotation = scale * np.array([[np.cos(angle), -np.sin(angle)],
                                         [np.sin(angle), np.cos(angle)]])
            centre = 72 + rng.uniform(-8, 8, size=2)
            matrix = np.c_[rotation, centre - rotation @ [56, 56]]
            photo = cv2.warpAffine(draw_face(traits[subject], rng, 112), matrix, (144, 144))
            name = f"{len(ijb.faces) + 1}.jpg"
            Image.fromarray(photo).save(photos / name, quality=95)
            landmarks = ARCFACE_POINTS @ matrix[:, :2].T + matrix[:, 2]
            faceness = round(float(rng.uniform(0.3, 1.0)), 3)
            ijb.faces.append({"name": name, "template": template, "media": media,
                              "faceness": faceness, "matrix": matrix, "landmarks": landmarks})
    ijb.meta.mkdir()
    (ijb.meta / "ijbc_name_5pts_score.txt").write_text("".join(
        f"{f['name']} {' '.join(f'{v:.3f}' for v in f['landmarks'].ravel())} {f['faceness']}\n"
        for f in ijb.faces))
    (ijb.meta / "ijbc_face_tid_mid.txt").write_text("".join(
        f"{f['name']} {f['template']} {f['media']}\n" for f in ijb.faces))
    templates = list(ijb.subject_of)
    ijb.pairs = [(a, b, int(ijb.subject_of[a] == ijb.subject_of[b]))
                 for i, a in enumerate(templates) for b in templates[i + 1:]]
    (ijb.meta / "ijbc_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {label}\n" for a, b, label in ijb.pairs))
    lists = {f"gallery_{g}": [100 + s for s in subjects] for g, subjects in GALLERIES.items()}
    lists["probe_mixed"] = templates[6:]
    for list_name, members in lists.items():  # one row per face, as the official CSVs
        rows = [f"{f['template']},{3000 + ijb.subject_of[f['template']]},img/{f['name']}\n"
                for f in ijb.faces if f["template"] in members]
        (ijb.meta / f"ijbc_1N_{list_name}.csv").write_text(
            "TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + "".join(rows))
    return ijb


@pytest.fixture(scope="module")
def synthetic_ijb(tmp_path_factory) -> SyntheticIJB:
    return write_synthetic_ijb(tmp_path_factory.mktemp("ijb") / "IJB")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained 32x32 MobileFaceNet: its cosines already spread (about 0.4 to 0.95)."""
    torch.manual_seed(0)
    return write_checkpoint(tmp_path_factory.mktemp("model") / "model.ckpt")


def independent_scores(ijb: SyntheticIJB, checkpoint: Path, faceness: bool = True):
    """The pair scores computed without facetrain's loader, warp or fusion: the inverse of each
    face's known placement, cv2 resize, the network built by hand, flip-test, and the fusion as
    explicit loops."""
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    backbone = MobileFaceNet(embedding_size=128, input_size=(32, 32))
    backbone.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("backbone.")})
    crops = []
    for face in ijb.faces:
        photo = np.asarray(Image.open(ijb.root / "IJBC" / "loose_crop" / face["name"]))
        crop = cv2.warpAffine(photo, cv2.invertAffineTransform(face["matrix"]), (112, 112))
        crops.append(cv2.resize(crop, (32, 32), interpolation=cv2.INTER_LINEAR))
    images = (torch.tensor(np.stack(crops)).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        embeddings = (backbone.eval()(images) + backbone(images.flip(3))).double().numpy()
    media_faces: dict[int, dict[int, list]] = {}
    for face, embedding in zip(ijb.faces, embeddings, strict=True):
        weight = face["faceness"] if faceness else 1.0
        media_faces.setdefault(face["template"], {}).setdefault(face["media"], []).append(
            weight * embedding)
    features = {}
    for template, medias in media_faces.items():
        total = sum(np.mean(frames, axis=0) for frames in medias.values())
        features[template] = total / np.linalg.norm(total)
    return np.array([features[a] @ features[b] for a, b, _ in ijb.pairs])


def load_model(checkpoint: Path):
    """(backbone, transform) as facetrain-eval loads them."""
    backbone, info = load_backbone(checkpoint)
    return backbone, preprocessing(info)


def brute_force_tar(scores, same, target):
    """Best TAR over every threshold (accept score >= t) with FAR <= target; None when the
    set has fewer than 1/target different pairs."""
    if (~same).sum() * target < 1:
        return None
    return max(np.mean(scores[same] >= t) for t in np.r_[scores, np.inf]
               if np.mean(scores[~same] >= t) <= target)


def brute_force_identification(ijb: SyntheticIJB, scores: np.ndarray, gallery: str):
    """CMC rank-1/5 and TPIR at FPIR 0.1, one probe at a time, from the pair scores (the pairs
    are all pairs of templates, so they hold every probe-gallery cosine)."""
    cosine = {}
    for (a, b, _), score in zip(ijb.pairs, scores, strict=True):
        cosine[a, b] = cosine[b, a] = score
    enrolled = {100 + s: s for s in GALLERIES[gallery]}
    ranks, mates, tops = [], [], []
    for probe in list(ijb.subject_of)[6:]:
        by_subject = {s: cosine[probe, t] for t, s in enrolled.items()}
        subject = ijb.subject_of[probe]
        if subject in by_subject:
            mate = by_subject[subject]
            ranks.append(sum(score >= mate for score in by_subject.values()))
            mates.append(mate if ranks[-1] == 1 else -np.inf)
        else:
            tops.append(max(by_subject.values()))
    ranks, mates, tops = np.array(ranks), np.array(mates), np.array(tops)
    tpir = max(np.mean(mates >= t) for t in np.r_[mates, tops, np.inf]
               if np.mean(tops >= t) <= 0.1)
    return {"1": np.mean(ranks <= 1), "5": np.mean(ranks <= 5)}, tpir, len(ranks), len(tops)


def test_protocol_on_a_synthetic_ijbc_folder_matches_an_independent_computation(
    synthetic_ijb, checkpoint
):
    protocol = open_ijb(synthetic_ijb.root, "IJBC")
    assert len(protocol.images) == len(synthetic_ijb.faces) and len(protocol.pairs) == 435
    assert set(protocol.galleries) == {"G1", "G2"}
    for faceness in (True, False):
        result = evaluate_ijb(protocol, *load_model(checkpoint), faceness=faceness,
                              num_workers=0)
        # The landmarks' 3 decimals (as in the official files) move the warp slightly.
        expected = independent_scores(synthetic_ijb, checkpoint, faceness)
        np.testing.assert_allclose(result["scores"], expected, atol=2e-4)
    assert expected.min() < 0.6 < 0.9 < expected.max()  # a spread the metrics can resolve

    # The metrics of those scores, by brute force (on the reported scores: scores 1e-4 apart
    # may swap order, and the metrics count orders).
    scores = result["scores"]
    same = np.array([label for _, _, label in synthetic_ijb.pairs], bool)
    verification = result["verification"]
    assert (verification["num_pairs"], verification["num_same"]) == (435, 60)
    for far in ("1e-06", "0.001", "0.01", "0.1"):
        assert verification["tar_at_far"][far] == brute_force_tar(scores, same, float(far))
    positives, negatives = scores[same], scores[~same]
    auc = np.mean((positives[:, None] > negatives) + 0.5 * (positives[:, None] == negatives))
    assert verification["auc"] == pytest.approx(auc, abs=1e-6)

    identification = result["identification"]
    for gallery in GALLERIES:
        cmc, tpir, mated, non_mated = brute_force_identification(synthetic_ijb, scores, gallery)
        reported = identification[gallery]
        assert (reported["mated"], reported["non_mated"]) == (mated, non_mated) == (12, 12)
        assert reported["cmc"]["1"] == pytest.approx(cmc["1"])
        assert reported["cmc"]["5"] == pytest.approx(cmc["5"])
        assert reported["tpir_at_fpir"]["0.1"] == pytest.approx(tpir)
        assert reported["tpir_at_fpir"]["0.01"] is None  # 12 non-mated searches
    assert identification["mean"]["cmc"]["1"] == pytest.approx(
        (identification["G1"]["cmc"]["1"] + identification["G2"]["cmc"]["1"]) / 2)


def test_eval_cli_prints_and_writes_the_ijb_table_beside_a_verification_set(
    synthetic_ijb, checkpoint, tmp_path
):
    # A small verification set of the same photos, to be evaluated beside IJB-C.
    faces = synthetic_ijb.faces
    subject = [synthetic_ijb.subject_of[f["template"]] for f in faces]
    pairs_file = synthetic_ijb.root / "IJBC" / "loose_crop" / "pairs.txt"
    pairs_file.write_text("".join(
        f"{faces[i]['name']} {faces[j]['name']} {int(subject[i] == subject[j])}\n"
        for i in range(0, 24, 2) for j in (i + 1, i + 30)))
    out = tmp_path / "eval"
    result = run_cli("eval", f"checkpoint={checkpoint}", f"ijb={synthetic_ijb.root}",
                     "ijb.set=IJBC", f"+verification.photos={pairs_file}", "num_workers=0",
                     f"hydra.run.dir={out}", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout + result.stderr
    assert "IJBC (flip-test, faceness-weighted" in printed and "TAR@1e-06" in printed
    assert "TPIR@0.01" in printed and "rank-10" in printed and "photos" in printed

    reported = json.loads((out / "metrics.json").read_text())["checkpoints"]["model"]
    assert set(reported["sets"]) == {"photos"}
    ijb = reported["ijb"]
    assert (ijb["set"], ijb["num_images"], ijb["num_templates"]) == ("IJBC", len(faces), 30)
    library = evaluate_ijb(open_ijb(synthetic_ijb.root), *load_model(checkpoint), num_workers=0)
    # What the CLI ran is the protocol (with channels_last: cosines equal to ~1e-9).
    assert ijb["verification"]["tar_at_far"] == library["verification"]["tar_at_far"]
    assert ijb["verification"]["auc"] == pytest.approx(library["verification"]["auc"])
    assert ijb["identification"] == library["identification"]
    assert set(ijb["identification"]) == {"G1", "G2", "mean"}
    with Image.open(out / "roc.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    assert curve_pixels(pixels, "#1f77b4") > 100 and curve_pixels(pixels, "#ff7f0e") > 100


def test_a_checkpoint_without_verification_sets_evaluates_ijb_alone(
    synthetic_ijb, checkpoint, tmp_path
):
    metrics = evaluate(eval_config(f"checkpoint={checkpoint}", f"ijb.root={synthetic_ijb.root}",
                                   "ijb.identification=false", f"output={tmp_path}"))
    reported = metrics["checkpoints"]["model"]
    assert reported["sets"] == {} and reported["ijb"]["identification"] is None
    assert reported["ijb"]["verification"]["num_pairs"] == 435
    assert json.loads((tmp_path / "metrics.json").read_text())["checkpoints"] == json.loads(
        json.dumps(metrics["checkpoints"]))


# What a broken IJB folder says.


@pytest.fixture
def broken(synthetic_ijb, tmp_path) -> Path:
    """A copy of the synthetic folder's meta/ with its photos linked, to damage."""
    root = tmp_path / "IJB"
    (root / "IJBC").mkdir(parents=True)
    shutil.copytree(synthetic_ijb.meta, root / "IJBC" / "meta")
    (root / "IJBC" / "loose_crop").symlink_to(synthetic_ijb.root / "IJBC" / "loose_crop")
    return root


def edit_line(path: Path, number: int, text: str | None) -> None:
    lines = path.read_text().splitlines(keepends=True)
    if text is None:
        del lines[number - 1]
    else:
        lines[number - 1] = text + "\n"
    path.write_text("".join(lines))


def test_missing_and_malformed_meta_files_name_the_file_and_line(broken):
    meta = broken / "IJBC" / "meta"
    open_ijb(broken, "IJBC")  # the undamaged copy reads
    with pytest.raises(DatasetError, match=r"no IJBB set under .*IJBB/meta/ijbb_face_tid_mid"):
        open_ijb(broken, "IJBB")

    pairs = meta / "ijbc_template_pair_label.txt"
    edit_line(pairs, 3, "100 2x7 0")
    with pytest.raises(DatasetError, match=r"ijbc_template_pair_label\.txt:3: expected '<templ"):
        open_ijb(broken, "IJBC")
    edit_line(pairs, 3, "100 99999 0")
    with pytest.raises(DatasetError, match=r"pair_label\.txt:3: template 99999 has no face in "
                                           r".*ijbc_face_tid_mid\.txt"):
        open_ijb(broken, "IJBC")
    pairs.unlink()
    with pytest.raises(DatasetError, match=r"IJB template pair list .*ijbc_template_pair_label"
                                           r"\.txt does not exist"):
        open_ijb(broken, "IJBC")


def test_malformed_face_lists_and_1n_lists(broken):
    meta = broken / "IJBC" / "meta"
    landmarks = meta / "ijbc_name_5pts_score.txt"
    saved = landmarks.read_text()
    edit_line(landmarks, 2, "2.jpg 1 2 3 4 5 6 7 8 9 0.9")  # 10 numbers, not 11
    with pytest.raises(DatasetError, match=r"ijbc_name_5pts_score\.txt:2: expected '<image> x1"):
        open_ijb(broken, "IJBC")
    landmarks.write_text(saved)
    edit_line(landmarks, 3, "3.jpg 1 2 3 4 nan 6 7 8 9 10 0.9")
    with pytest.raises(DatasetError, match=r"pts_score\.txt:3: expected.* got '3\.jpg 1 2 3 4 nan"):
        open_ijb(broken, "IJBC")
    landmarks.write_text(saved)
    media = meta / "ijbc_face_tid_mid.txt"
    saved = media.read_text()
    edit_line(media, 4, "other.jpg 100 5001")
    with pytest.raises(DatasetError, match=r"tid_mid\.txt:4 names 'other\.jpg' but .*5pts_score"
                                           r"\.txt:4 names '4\.jpg'"):
        open_ijb(broken, "IJBC")
    edit_line(media, 4, None)
    with pytest.raises(DatasetError, match=r"tid_mid\.txt lists \d+ faces but .*5pts_score"):
        open_ijb(broken, "IJBC")
    media.write_text(saved)

    gallery = meta / "ijbc_1N_gallery_G2.csv"
    saved = gallery.read_text()
    edit_line(gallery, 3, "103;3003;img/x.jpg")
    assert open_ijb(broken, "IJBC", identification=False).galleries == {}  # not read
    with pytest.raises(DatasetError, match=r"ijbc_1N_gallery_G2\.csv:3: expected 'TEMPLATE_ID"):
        open_ijb(broken, "IJBC")
    gallery.write_text(saved + "103,3999,img/x.jpg\n")  # 103 is subject 3003 from line 2 on
    last = len(saved.splitlines()) + 1
    with pytest.raises(DatasetError, match=rf"G2\.csv:{last}: template 103 is subject 3999 here "
                                           r"but subject 3003 at line 2"):
        open_ijb(broken, "IJBC")
    gallery.write_text(saved)
    (meta / "ijbc_1N_probe_mixed.csv").unlink()
    assert open_ijb(broken, "IJBC").galleries == {}  # auto: no 1:N without its lists
    with pytest.raises(DatasetError, match=r"1:N list .*ijbc_1N_probe_mixed\.csv does not exist"):
        open_ijb(broken, "IJBC", identification=True)


def test_a_missing_image_is_named_before_anything_is_embedded(broken, synthetic_ijb):
    photos = broken / "IJBC" / "loose_crop"
    photos.unlink()
    shutil.copytree(synthetic_ijb.root / "IJBC" / "loose_crop", photos)
    (photos / "5.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 of the \d+ images listed in .*5pts_score\.txt are "
                                           r"not in .*loose_crop, the first .*5\.jpg \(line 5\)"):
        open_ijb(broken, "IJBC")


def test_a_broken_ijb_folder_is_one_line_from_facetrain_eval(broken, checkpoint, tmp_path):
    edit_line(broken / "IJBC" / "meta" / "ijbc_template_pair_label.txt", 2, "1 2")
    cfg = eval_config(f"checkpoint={checkpoint}", f"ijb.root={broken}", "ijb.set=IJBC",
                      f"output={tmp_path}")
    with pytest.raises(SystemExit) as exited, user_errors("facetrain-eval"):
        evaluate(cfg)
    (line,) = str(exited.value).splitlines()
    assert line.startswith("facetrain-eval: data error: ")
    assert "ijbc_template_pair_label.txt:2: expected" in line and "got '1 2'" in line
    assert not (tmp_path / "metrics.json").exists()
