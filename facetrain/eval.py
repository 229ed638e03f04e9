"""Verification metrics of trained backbones on one or more verification sets, from a composed
``eval`` config; the command line (``facetrain-eval checkpoint=RUN_OR_CKPT [key=value ...]``)
is ``facetrain.cli.eval``.

Per (checkpoint, set): LFW-protocol 10-fold accuracy ± std and the mean chosen threshold, TAR at
each FAR target, ROC AUC and EER (see ``facetrain.evaluation.verification``). Prints a table,
writes ``metrics.json`` and ``roc.png`` (one curve per checkpoint and set) to the run folder.
With ``ijb.root`` also IJB-B/C 1:1 TAR@FAR and 1:N TPIR/CMC (``facetrain.evaluation.ijb``): a
second table, ``ijb`` in metrics.json and the 1:1 curve in roc.png.
"""

import json
import logging
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from facetrain.align.inputs import aligning_transform, template_for
from facetrain.checkpoint import CheckpointError, load_backbone
from facetrain.data.images import DatasetError
from facetrain.data.pairs import open_verification_set
from facetrain.embed import preprocessing, resolve_device
from facetrain.evaluation import embed_dataset, kfold_verification, pair_scores, roc_curve
from facetrain.evaluation.ijb import IJBProtocol, evaluate_ijb, ijb_report, open_ijb
from facetrain.evaluation.plots import plot_roc

log = logging.getLogger(__name__)


def checkpoint_label(path: str | Path) -> str:
    """``<run>/<file stem>`` for a checkpoint inside a run's checkpoints/ folder, else the stem."""
    path = Path(path)
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}/{path.stem}"
    return path.stem


def select_sets(cfg: DictConfig, info: dict, optional: bool = False) -> dict:
    """The verification sets to evaluate: ``verification`` if given, else those stored with the
    checkpoint; narrowed to ``sets`` if given. None at all is an error unless ``optional`` (an
    IJB evaluation is asked for)."""
    if cfg.verification:
        available, source = OmegaConf.to_container(cfg.verification), "verification"
    else:
        available, source = info["data"].get("verification") or {}, f"{info['path']} (training)"
    if not available and optional and not cfg.sets:
        return {}
    if not available:
        raise DatasetError(
            f"{info['path']} stores no verification sets; name one with "
            f"+verification.NAME=path/to/pairs.txt (or a .bin / LFW pairs.txt)"
        )
    unknown = [name for name in cfg.sets if name not in available]
    if unknown:
        raise DatasetError(
            f"unknown verification set(s) {unknown} in sets=...; the sets of {source} are: "
            f"{', '.join(available)}"
        )
    return {name: available[name] for name in (cfg.sets or available)}


def evaluate_checkpoint(
    cfg: DictConfig, path: str, device: torch.device, ijb: IJBProtocol | None = None
) -> dict:
    """Metrics and ROC curves of one checkpoint on its verification sets (and ``ijb``)."""
    # backbone=NAME / loss=NAME (or +backbone.KEY=...) assert what the checkpoint must hold;
    # configs/backbone/*.yaml's ${data.image_size} resolves against the checkpoint's data.
    expected = {part: OmegaConf.to_container(cfg[part]) if cfg.get(part) is not None else None
                for part in ("backbone", "loss")}
    backbone, info = load_backbone(path, expected["backbone"], expected["loss"])
    backbone.to(device)
    if cfg.channels_last:
        backbone.to(memory_format=torch.channels_last)
    transform = preprocessing(info)
    results = {}
    for name, spec in select_sets(cfg, info, optional=ijb is not None).items():
        # align=true: the sets' images are photos, detected and aligned first (IJB ships
        # its own landmarks and aligns with them).
        pairs_transform = aligning_transform(cfg.get("align", False), info["image_size"],
                                             transform)
        dataset = open_verification_set(name, spec, pairs_transform)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                            pin_memory=device.type == "cuda")
        start = time.perf_counter()
        embeddings = embed_dataset(backbone, loader, cfg.flip_test, device, cfg.channels_last)
        embedded = time.perf_counter()
        scores = pair_scores(embeddings, dataset.pairs)
        result = kfold_verification(scores, dataset.same, cfg.num_folds, tuple(cfg.far_targets))
        far, tar, _ = roc_curve(scores, dataset.same)
        seconds = time.perf_counter() - start
        results[name] = {
            **result.as_dict(),
            "num_images": len(dataset),
            "seconds": seconds,
            "pairs_per_second": len(scores) / seconds,
            "images_per_second": len(dataset) / (embedded - start),
            "roc": (far, tar),
        }
        log.info("%s on %s: %d images, %d pairs in %.1f s (%.0f pairs/s)", info["path"], name,
                 len(dataset), len(scores), seconds, len(scores) / seconds)
    ijb_result = None
    if ijb is not None:
        ijb_result = evaluate_ijb(
            ijb, backbone, transform, flip=cfg.flip_test, faceness=cfg.ijb.faceness,
            batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=device,
            channels_last=cfg.channels_last, far_targets=tuple(cfg.ijb.far_targets),
            fpir_targets=tuple(cfg.ijb.fpir_targets), ranks=tuple(cfg.ijb.ranks),
            # 112x112 (the published protocol); a 112x96 SphereFace model gets its own template
            template=template_for(True, info["image_size"]),
        )
    return {"info": info, "sets": results, "ijb": ijb_result}


def report(evaluated: dict[str, dict], far_targets) -> str:
    """The printed table: one row per (checkpoint, set)."""
    fars = [f"{far:g}" for far in far_targets]
    header = (f"{'checkpoint':<28}{'set':<14}{'pairs':>7}{'accuracy':>18}{'threshold':>11}"
              + "".join(f"{'TAR@' + far:>13}" for far in fars) + f"{'AUC':>8}{'EER':>8}")
    lines = [header]
    for label, evaluation in evaluated.items():
        for name, r in evaluation["sets"].items():
            tars = "".join(
                f"{r['tar_at_far'][far]:>13.4f}" if r["tar_at_far"].get(far) is not None
                else f"{'-':>13}" for far in fars
            )
            accuracy = f"{r['accuracy']:.4f} ± {r['accuracy_std']:.4f}"
            lines.append(f"{label[:27]:<28}{name[:13]:<14}{r['num_pairs']:>7}{accuracy:>18}"
                         f"{r['threshold']:>11.4f}{tars}{r['auc']:>8.4f}{r['eer']:>8.4f}")
    return "\n".join(lines)


def evaluate(cfg: DictConfig) -> dict:
    """Run the evaluation of a composed ``eval`` config; return what metrics.json holds."""
    paths = ([cfg.checkpoint] if cfg.checkpoint else []) + list(cfg.checkpoints)
    if not paths:
        raise CheckpointError(
            "no checkpoint given: facetrain-eval checkpoint=outputs/train/<run> (a run folder or "
            "a .ckpt file), or checkpoints=[a,b] to compare several"
        )
    device = resolve_device(cfg.device)
    output_dir = Path(cfg.output or HydraConfig.get().runtime.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("ijb") is not None and not isinstance(cfg.ijb, DictConfig):
        raise DatasetError(f"ijb={cfg.ijb}: in a composed config the IJB folder is ijb.root=PATH")
    # The IJB metadata is read and checked once, before any model or image is loaded.
    ijb = (open_ijb(cfg.ijb.root, cfg.ijb.set, cfg.ijb.identification)
           if cfg.get("ijb") is not None and cfg.ijb.root else None)

    evaluated: dict[str, dict] = {}
    for path in paths:
        evaluation = evaluate_checkpoint(cfg, path, device, ijb)
        label = checkpoint_label(evaluation["info"]["path"])
        while label in evaluated:  # the same file twice, or equal names in different folders
            label += "'"
        evaluated[label] = evaluation

    curves = {
        f"{label}: {name}" if len(evaluated) > 1 else name: result.pop("roc")
        for label, evaluation in evaluated.items() for name, result in evaluation["sets"].items()
    }
    for label, evaluation in evaluated.items():
        if evaluation["ijb"] is not None:
            result = evaluation["ijb"]
            result.pop("scores")
            name = f"{result['set']} 1:1"
            curves[f"{label}: {name}" if len(evaluated) > 1 else name] = result.pop("roc")
    plot_roc(curves, f"ROC ({'flip-test' if cfg.flip_test else 'no flip'})").savefig(
        output_dir / "roc.png"
    )
    metrics = {
        "flip_test": cfg.flip_test,
        "far_targets": list(cfg.far_targets),
        "checkpoints": {
            label: {
                "path": e["info"]["path"],
                "epoch": e["info"]["epoch"],
                "global_step": e["info"]["global_step"],
                "backbone": e["info"]["backbone"],
                "loss": e["info"]["loss"],
                "sets": e["sets"],
                **({"ijb": e["ijb"]} if e["ijb"] is not None else {}),
            }
            for label, e in evaluated.items()
        },
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if any(e["sets"] for e in evaluated.values()):
        log.info("verification (%s, %d-fold accuracy; TAR at FAR over all pairs):\n%s",
                 "flip-test" if cfg.flip_test else "no flip", cfg.num_folds,
                 report(evaluated, cfg.far_targets))
    if ijb is not None:
        log.info("%s (%s, %s; 1:1 TAR at FAR over template pairs, 1:N open set per gallery):\n%s",
                 ijb.name, "flip-test" if cfg.flip_test else "no flip",
                 "faceness-weighted" if cfg.ijb.faceness else "unweighted",
                 ijb_report({label: e["ijb"] for label, e in evaluated.items()}))
    log.info("wrote %s and %s", output_dir / "metrics.json", output_dir / "roc.png")
    return metrics
