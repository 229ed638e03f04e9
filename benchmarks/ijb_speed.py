"""facetrain-eval IJB throughput: time per 100k faces, flip-test off and on, against the bare
forward pass (as ``benchmarks.eval_speed``).

    python -m benchmarks.ijb_speed                        # 3,000 faces, MobileFaceNet, CPU
    python -m benchmarks.ijb_speed --faces 20000 --device cuda

A synthetic IJB-C folder in the official layout is written once (cached under
``$FACETRAIN_DATA_DIR`` or ``data/``): drawn faces placed in ``--photo-size`` loose-crop JPEGs by
a random similarity, with their five landmarks and a faceness score; about 3 faces per template,
IJB-C's ratio of template pairs to faces (15.7M / 469k, 1 in 800 a same pair) and 1:N galleries
and probes. It is evaluated through ``facetrain.eval.evaluate`` exactly as ``facetrain-eval
checkpoint=... ijb=...`` runs it (metadata read and checked, JPEG decode, alignment, resize,
network, fusion, 1:1 and 1:N metrics, table, plot), from an untrained MobileFaceNet checkpoint.
The baseline is ``eval_speed``'s: the bare forward pass over as many random tensors in the same
batches, measured before and after and averaged. Flip-test doubles the forward passes.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from benchmarks.eval_speed import bare_forward_seconds, write_checkpoint
from benchmarks.figures import Figure
from facetrain.align import TEMPLATES
from facetrain.data.synthetic import draw_face, sample_traits
from facetrain.eval import evaluate
from facetrain.resources import config_dir

FACES_PER_TEMPLATE = 3
TEMPLATES_PER_SUBJECT = 5
PAIRS_PER_FACE = 15_658_489 / 469_375  # IJB-C
SAME_FRACTION = 19_557 / 15_658_489


def write_ijb(root: Path, faces: int, photo_size: int, seed: int = 0) -> Path:
    """A synthetic ``root/IJBC`` in the official layout, written once (``root/COMPLETE``)."""
    if (root / "COMPLETE").is_file():
        return root
    rng = np.random.default_rng(seed)
    photos, meta = root / "IJBC" / "loose_crop", root / "IJBC" / "meta"
    photos.mkdir(parents=True, exist_ok=True)
    meta.mkdir(exist_ok=True)
    points = TEMPLATES["arcface_112x112"][0].astype(np.float64)
    templates = np.arange(faces) // FACES_PER_TEMPLATE + 1
    subjects = (templates - 1) // TEMPLATES_PER_SUBJECT
    traits = [sample_traits(rng) for _ in range(subjects.max() + 1)]
    landmark_lines, media_lines = [], []
    for i in range(faces):
        angle, scale = rng.uniform(-0.3, 0.3), photo_size / 112 * rng.uniform(0.5, 0.7)
        rotation = scale * np.array([[np.cos(angle), -np.sin(angle)],
                                     [np.sin(angle), np.cos(angle)]])
        centre = photo_size / 2 + rng.uniform(-0.05, 0.05, size=2) * photo_size
        matrix = np.c_[rotation, centre - rotation @ [56, 56]]
        face = draw_face(traits[subjects[i]], rng, 112)
        photo = cv2.warpAffine(face, matrix, (photo_size, photo_size))
        Image.fromarray(photo).save(photos / f"{i + 1}.jpg", quality=90)
        landmarks = points @ matrix[:, :2].T + matrix[:, 2]
        landmark_lines.append(f"{i + 1}.jpg {' '.join(f'{v:.3f}' for v in landmarks.ravel())} "
                              f"{rng.uniform(0.5, 1.0):.3f}\n")
        media_lines.append(f"{i + 1}.jpg {templates[i]} {i // 2 + 1}\n")  # 2 frames a media
    (meta / "ijbc_name_5pts_score.txt").write_text("".join(landmark_lines))
    (meta / "ijbc_face_tid_mid.txt").write_text("".join(media_lines))

    ids = np.unique(templates)
    subject_of = (ids - 1) // TEMPLATES_PER_SUBJECT
    num_pairs = int(faces * PAIRS_PER_FACE)
    num_same = max(1, int(num_pairs * SAME_FRACTION))
    first = rng.choice(ids, num_pairs)
    second = rng.choice(ids, num_pairs)
    # Same pairs: a template and the next one of its subject; the rest random (labelled by
    # subject, so a few of them are same pairs too).
    same_first = rng.choice(ids[(ids - 1) % TEMPLATES_PER_SUBJECT < TEMPLATES_PER_SUBJECT - 1],
                            num_same)
    first[:num_same], second[:num_same] = same_first, same_first + 1
    label = (subject_of[first - 1] == subject_of[second - 1]).astype(int)
    np.savetxt(meta / "ijbc_template_pair_label.txt", np.c_[first, second, label], fmt="%d")

    # 1:N: each subject's first template in G1 (even subjects) or G2 (odd), the rest probes.
    enrolled = (ids - 1) % TEMPLATES_PER_SUBJECT == 0
    for name, members in (("gallery_G1", enrolled & (subject_of % 2 == 0)),
                          ("gallery_G2", enrolled & (subject_of % 2 == 1)),
                          ("probe_mixed", ~enrolled)):
        rows = [f"{t},{s},img/{t}.jpg\n" for t, s in zip(ids[members], subject_of[members],
                                                          strict=True)]
        (meta / f"ijbc_1N_{name}.csv").write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
                                                 + "".join(rows))
    (root / "COMPLETE").touch()
    return root


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=3000)
    parser.add_argument("--photo-size", type=int, default=250)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    data_dir = Path(os.environ.get("FACETRAIN_DATA_DIR", "data"))
    root = write_ijb(data_dir / f"bench_ijb_{args.faces}_{args.photo_size}", args.faces,
                     args.photo_size)
    bare = [bare_forward_seconds(args.faces, args.image_size, args.batch_size, args.device)]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "model.ckpt"
        write_checkpoint(checkpoint, None, args.image_size)
        for flip in (False, True):
            with initialize_config_dir(config_dir(), version_base="1.3"):
                cfg = compose("eval", overrides=[
                    f"checkpoint={checkpoint}", f"ijb.root={root}", f"flip_test={flip}",
                    f"output={folder}", f"batch_size={args.batch_size}",
                    f"num_workers={args.num_workers}", f"device={args.device}",
                ])
            start = time.perf_counter()
            result = evaluate(cfg)["checkpoints"]["model"]["ijb"]
            rows.append((f"facetrain-eval IJB, flip {'on' if flip else 'off'}",
                         time.perf_counter() - start))
    bare.append(bare_forward_seconds(args.faces, args.image_size, args.batch_size, args.device))
    baseline = statistics.mean(bare)  # before and after: both see the machine's load drift
    rows.insert(0, ("bare forward (baseline)", baseline))

    print(f"\n{args.faces} faces ({args.photo_size}x{args.photo_size} JPEG loose crops), "
          f"{result['num_templates']} templates, {result['verification']['num_pairs']} pairs, "
          f"MobileFaceNet {args.image_size}x{args.image_size}, batch {args.batch_size}, "
          f"{args.num_workers} loader workers, {args.device} ({torch.get_num_threads()} threads)")
    print(f"{'':<30}{'seconds':>9}{'faces/s':>10}{'÷ baseline':>12}{'min / 100k faces':>18}")
    for name, seconds in rows:
        print(f"{name:<30}{seconds:>9.2f}{args.faces / seconds:>10.1f}{seconds / baseline:>12.2f}"
              f"{seconds / args.faces * 100_000 / 60:>18.1f}")
    return [
        Figure("ijb_speed", f"{name}, {args.faces:,} faces, {result['num_templates']:,} templates: "
               "seconds", seconds / baseline, "bare MobileFaceNet forward over as many random "
               "tensors", f"{seconds:.2f} s vs {baseline:.2f} s; "
               f"{seconds / args.faces * 100_000 / 60:.1f} min per 100k faces, {args.device}")
        for name, seconds in rows[1:]
    ]


def quick() -> list[Figure]:
    return main(["--faces", "300"])


def full() -> list[Figure]:
    return main([])


if __name__ == "__main__":
    main()
