"""``facetrain-align SRC DST [key=value ...]`` = ``python -m facetrain.cli.align``: photos in,
aligned face crops out (``facetrain.align.pipeline.align_images``; settings in
configs/align.yaml). SRC and DST may also be given as ``src=`` / ``dst=``."""

import logging
import sys

import hydra
from omegaconf import DictConfig

from facetrain.align.pipeline import AlignConfigError, AlignOptions, align_images
from facetrain.cli import silence_library_noise, user_errors
from facetrain.resources import config_dir

log = logging.getLogger(__name__)
USAGE = "facetrain-align SRC DST [template=arcface_112x112|sphereface_112x96] [key=value ...]"


def align_from_config(cfg: DictConfig):
    if not cfg.src or not cfg.dst:
        raise AlignConfigError(f"give the photos and where the crops go: {USAGE}")
    options = AlignOptions(
        template=cfg.template, face=cfg.face, format=cfg.format,
        jpeg_quality=int(cfg.jpeg_quality), min_face=float(cfg.min_face),
        thresholds=tuple(float(t) for t in cfg.thresholds),
    )
    result = align_images(
        cfg.src, cfg.dst, options, landmarks=cfg.landmarks, workers=cfg.workers,
        overwrite=cfg.overwrite, progress=cfg.progress,
    )
    done = result.images - len(result.skipped)
    log.info(
        "aligned %d of %d image(s) onto %s (%d crop(s) written now, %d already done) in "
        "%.1f s (%.1f images/s)", done, result.images, options.template, result.crops,
        result.resumed, result.seconds, (result.images - result.resumed) / result.seconds,
    )
    if result.skipped:
        shown = "; ".join(f"{file} ({why})" for file, why in result.skipped[:5])
        log.warning("skipped %d image(s), listed in %s: %s%s", len(result.skipped),
                    result.report, shown, " ..." if len(result.skipped) > 5 else "")
    log.info("report: %s; train on the crops: python train.py data=folder data.train_root=%s",
             result.report, cfg.dst)
    return result


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="align")
def _main(cfg: DictConfig) -> None:
    silence_library_noise()
    try:
        with user_errors("facetrain-align", config=AlignConfigError):
            align_from_config(cfg)
    except KeyboardInterrupt:  # what is done is in the report: the same command resumes
        print("facetrain-align: interrupted; run the same command again to resume",
              file=sys.stderr)
        raise SystemExit(130) from None


def positional_overrides(argv: list[str]) -> list[str]:
    """``SRC DST key=value ...`` as Hydra overrides: the first two arguments that are neither
    ``key=value`` nor ``-flags`` become ``src=`` and ``dst=``."""
    out, names = [], ["src", "dst"]
    for arg in argv:
        if names and "=" not in arg and not arg.startswith("-"):
            # Quoted, so that a path with commas, spaces or brackets stays one string.
            quoted = arg.replace("\\", "\\\\").replace("'", "\\'")
            arg = f"{names.pop(0)}='{quoted}'"
        out.append(arg)
    return out


def main() -> None:
    sys.argv[1:] = positional_overrides(sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
