"""facetrain's training step ÷ insightface arcface_torch's own, in one process, interleaved.

    python -m benchmarks.peer_arcface_torch                     # IResNet-18 and -50, batch 64
    python -m benchmarks.peer_arcface_torch --depths 18 --steps 5 --threads 2
    python -m benchmarks.peer_arcface_torch --device cuda --batch 128 --steps 20
    python -m benchmarks.peer_arcface_torch --breakdown --depths 18   # where the time goes

The peer is arcface_torch at the commit in ``benchmarks/peers/arcface_torch/README.md``, its
files vendored byte-identical there (checked against ``SHA256SUMS`` before anything runs):
``backbones/iresnet.py`` (``iresnet18``/``iresnet50`` as ``get_model("r18")`` builds them),
``PartialFC_V2`` (sample rate 1) with ``CombinedMarginLoss(64, 1.0, 0.5, 0.0)`` (ArcFace), SGD
(lr 0.1, momentum 0.9, weight decay 5e-4 on both groups, as ``train_v2.py`` builds it),
``PolynomialLRWarmup``. Its step is the body of ``train_v2.py``'s training loop, compiled from
the vendored file and run as written (fp32 branch): backbone → ``module_partial_fc`` →
``loss.backward()`` → ``clip_grad_norm_(backbone.parameters(), 5)`` → ``opt.step()`` →
``opt.zero_grad()`` → ``lr_scheduler.step()`` → ``loss_am.update(loss.item(), 1)``. Deviations,
each forced by running it here: no DDP wrapper (one process: facetrain runs no DDP either); a
one-process gloo group, because PartialFC_V2 all-gathers even alone; on CPU, ``Tensor.cuda()``
leaves a tensor where it is while the peer steps (PartialFC_V2 makes its gather buffers with
``.cuda()``); ``PolynomialLRWarmup.__init__`` passes ``verbose=`` to the torch base class, which
torch 2.14 no longer takes, so its attributes are set and the base initialised here, its
``get_lr`` unchanged; ``callback_logging`` (one log line every 10 steps) and
``callback_verification`` (every 2000 steps) do nothing: their module needs mxnet.

facetrain's step is ``python train.py backbone=iresnet18 loss=arcface classifier=full
optimizer=sgd``: backbone, head and class centers built from ``configs/`` by Hydra, the
``FaceRecognitionModule`` with ``cfg.model``'s options (weight decay 5e-4 on both groups, the
non-finite guard), SGD with ``optimizer.lr`` and ``optimizer.momentum``, the default schedule,
a real ``pl.Trainer`` from ``configs/trainer/default.yaml`` (32-true, backbone gradient
clipped to norm 5) without logger, checkpoints or the display callbacks. Its step is timed from
Lightning's ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, the guard,
clipping, optimizer step, zero_grad), plus Lightning's own time between batches (fetching the
batch, the schedule), measured apart and added.

Both models start from the same weights (arcface_torch's, loaded into facetrain with
``model.init_from``'s loader) and take the same batch, so the first loss of each must agree: it
is printed, a check that both compute the same thing. Each layout trains one pair in one
``Trainer.fit``, the peer stepping right after each facetrain step (same machine load); the
first step of each is a warm-up. ``channels_last on``: facetrain's ``model.channels_last=true``
(its default) against arcface_torch's modules and input converted to channels_last (what one
line does to it); ``off``: both NCHW (arcface_torch as shipped). ``as shipped`` divides
facetrain's default (on) by arcface_torch as shipped (off). Ratios below 1.0x: facetrain faster.

``--breakdown`` times the parts apart, on the same weights: each backbone's forward + backward,
each margin head's forward + backward on one set of embeddings, and facetrain's non-finite
guard (``model.nonfinite``), which arcface_torch does not have.
"""

import argparse
import ast
import hashlib
import importlib.util
import logging
import statistics
import tempfile
import time
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import distributed, nn
from torch.optim.lr_scheduler import LRScheduler

import facetrain.cluster  # noqa: F401  the config resolvers, registered as the train main does
from benchmarks.figures import Figure
from benchmarks.precision_speed import guard_ms
from facetrain.cli import silence_library_noise
from facetrain.finetune import FineTuning
from facetrain.module import FaceRecognitionModule
from facetrain.pretrained import load_backbone_weights
from facetrain.resources import config_dir

PEER = Path(__file__).resolve().parent / "peers" / "arcface_torch"
BASELINE = "arcface_torch train_v2.py step (pinned, vendored)"
EMBEDDING_SIZE = 512
WEIGHT_DECAY = 5e-4  # arcface_torch configs/base.py


class VendoredFileError(RuntimeError):
    """A vendored arcface_torch file differs from the pinned upstream one."""


def check_vendored(folder: Path = PEER) -> list[str]:
    """The vendored files, each checked against ``SHA256SUMS``; raises ``VendoredFileError``
    (one line) when one is missing or changed: the peer must run as published."""
    names = []
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = folder / name
        if not path.is_file():
            raise VendoredFileError(f"{path}: missing; restore it from the commit in "
                                    f"{folder / 'README.md'}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise VendoredFileError(f"{path}: not the pinned upstream file (sha256 differs from "
                                    f"SHA256SUMS); restore it from the commit in "
                                    f"{folder / 'README.md'}")
        names.append(name)
    return names


def load_peer(name: str) -> types.ModuleType:
    """The vendored file ``name`` (e.g. ``"partial_fc_v2.py"``) as a module, by path: the
    upstream files import each other as top-level modules, which none of the ones used here
    does, and nothing is put on ``sys.path``."""
    path = PEER / name
    spec = importlib.util.spec_from_file_location(f"arcface_torch_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():  # torch.cuda.amp.autocast is deprecated, still works
        warnings.simplefilter("ignore", FutureWarning)
        spec.loader.exec_module(module)
    return module


def train_v2_step() -> types.CodeType:
    """The body of ``train_v2.py``'s loop ``for _, (img, local_labels) in
    enumerate(train_loader):``, compiled from the vendored file (tracebacks name its lines)."""
    path = PEER / "train_v2.py"
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if (isinstance(node, ast.For) and ast.unparse(node.target) == "(_, (img, local_labels))"
                and ast.unparse(node.iter) == "enumerate(train_loader)"):
            return compile(ast.Module(body=node.body, type_ignores=[]), str(path), "exec")
    raise VendoredFileError(f"{path}: no training loop 'for _, (img, local_labels) in "
                            f"enumerate(train_loader)'")


@contextmanager
def cuda_calls_stay(device: torch.device) -> Iterator[None]:
    """On CPU, ``Tensor.cuda()`` returns the tensor itself inside the block: arcface_torch
    trains on GPUs only and PartialFC_V2 makes its all-gather buffers with ``.cuda()``."""
    if device.type == "cuda":
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def one_process_group() -> None:
    """The one-process gloo group PartialFC_V2 needs (it all-gathers even alone); an in-memory
    store: no port or file shared with anything else on the machine."""
    if not distributed.is_initialized():
        distributed.init_process_group("gloo", store=distributed.HashStore(), rank=0,
                                       world_size=1)


def poly_scheduler(module: types.ModuleType, optimizer, warmup_iters: int, total_iters: int):
    """arcface_torch's ``PolynomialLRWarmup(optimizer=opt, warmup_iters=, total_iters=)``. Its
    ``__init__`` passes ``verbose=`` to torch's base class, which torch 2.14 no longer takes:
    the same attributes are set and the base initialised here; its ``get_lr`` runs as written."""
    scheduler = module.PolynomialLRWarmup.__new__(module.PolynomialLRWarmup)
    scheduler.total_iters, scheduler.power, scheduler.warmup_iters = total_iters, 1.0, warmup_iters
    LRScheduler.__init__(scheduler, optimizer)
    return scheduler


class PeerStep:
    """arcface_torch's training step: ``train_v2.py``'s loop body run on its own modules, with
    the names it reads (``cfg``: the fp32 branch of configs/base.py, one step per update)."""

    def __init__(self, depth: int, classes: int, device: torch.device, channels_last: bool,
                 total_steps: int):
        one_process_group()
        iresnet, losses = load_peer("backbones/iresnet.py"), load_peer("losses.py")
        partial_fc, schedulers = load_peer("partial_fc_v2.py"), load_peer("lr_scheduler.py")
        self.device, self.channels_last = device, channels_last
        torch.manual_seed(0)
        # get_model("r18") = iresnet18(False, dropout=0.0, fp16=cfg.fp16, num_features=512)
        backbone = getattr(iresnet, f"iresnet{depth}")(
            False, dropout=0.0, fp16=False, num_features=EMBEDDING_SIZE).to(device)
        if channels_last:
            backbone.to(memory_format=torch.channels_last)
        backbone.train()
        margin_loss = losses.CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0)
        with cuda_calls_stay(device):
            module_partial_fc = partial_fc.PartialFC_V2(
                margin_loss, EMBEDDING_SIZE, classes, 1.0, False)
        module_partial_fc.train().to(device)
        opt = torch.optim.SGD(
            params=[{"params": backbone.parameters()}, {"params": module_partial_fc.parameters()}],
            lr=0.1, momentum=0.9, weight_decay=WEIGHT_DECAY)
        self.backbone, self.module_partial_fc = backbone, module_partial_fc
        self.code = train_v2_step()
        self.names = {
            "torch": torch, "backbone": backbone, "module_partial_fc": module_partial_fc,
            "opt": opt, "lr_scheduler": poly_scheduler(schedulers, opt, 0, total_steps),
            "cfg": types.SimpleNamespace(fp16=False, gradient_acc=1, verbose=2000),
            "amp": None, "wandb_logger": None, "epoch": 0, "global_step": 0,
            "loss_am": load_peer("utils/utils_logging.py").AverageMeter(),
            "callback_logging": lambda *args: None, "callback_verification": lambda *args: None,
        }

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One step on ``(images, labels)``; its loss."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self.names.update(img=images, local_labels=labels)
        with cuda_calls_stay(self.device):
            exec(self.code, self.names)
        return self.names["loss_am"].val


def facetrain_module(depth: int, classes: int, channels_last: bool, peer: PeerStep
                     ) -> tuple[FaceRecognitionModule, dict]:
    """The module ``python train.py backbone=iresnet{depth} loss=arcface classifier=full
    optimizer=sgd`` trains, on ``peer``'s initial weights; and the trainer's config."""
    overrides = [f"backbone=iresnet{depth}", "loss=arcface", "classifier=full",
                 "optimizer=sgd", f"model.channels_last={str(channels_last).lower()}",
                 "data.image_size=[112,112]", "trainer.default_root_dir=."]
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    backbone = instantiate(cfg.backbone)
    with tempfile.TemporaryDirectory() as folder:  # model.init_from=<arcface_torch backbone.pth>
        weights = Path(folder) / "backbone.pth"
        torch.save(peer.backbone.state_dict(), weights)
        load_backbone_weights(backbone, weights)
    head = instantiate(cfg.loss)
    classifier = instantiate(cfg.classifier, embedding_size=backbone.embedding_size,
                             num_classes=classes, margin=head)
    with torch.no_grad():
        classifier.weight.copy_(peer.module_partial_fc.weight)
    options = FineTuning.module_options(cfg)
    options.pop("init_from")  # loaded above, as train() loads it
    module = FaceRecognitionModule(
        backbone, head, classifier,
        optimizer=partial(torch.optim.SGD, lr=cfg.optimizer.lr, momentum=cfg.optimizer.momentum),
        scheduler=instantiate(cfg.scheduler), **options,
    )
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    return module, trainer


@dataclass
class Interleaved(pl.Callback):
    """Times each facetrain step (batch start → batch end) and Lightning's time between
    batches, and runs the peer's step, timed, right after each facetrain step."""

    peer: PeerStep
    images: torch.Tensor
    labels: torch.Tensor
    facetrain: list[float] = field(default_factory=list)
    between: list[float] = field(default_factory=list)
    arcface_torch: list[float] = field(default_factory=list)
    losses: list[tuple[float, float]] = field(default_factory=list)
    _start: float = 0.0
    _peer_end: float | None = None

    def _sync(self) -> None:
        if self.images.is_cuda:
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync()
        self._start = time.perf_counter()
        if self._peer_end is not None:
            self.between.append(self._start - self._peer_end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync()
        self.facetrain.append(time.perf_counter() - self._start)
        start = time.perf_counter()
        peer_loss = self.peer(self.images, self.labels)
        self._sync()
        self.arcface_torch.append(time.perf_counter() - start)
        self.losses.append((float(outputs["loss"]), peer_loss))
        self._peer_end = time.perf_counter()


class SameBatch(torch.utils.data.Dataset):
    """``steps`` times the same (images, labels) batch (a DataLoader with batch_size=None)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, steps: int):
        self.batch, self.steps = (images, labels), steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int):
        return self.batch


@dataclass(frozen=True)
class Result:
    depth: int
    channels_last: bool
    facetrain: float  # median seconds: Lightning hook to hook, plus its time between batches
    between: float  # of which between batches
    arcface_torch: float
    first_losses: tuple[float, float]
    skipped: int  # facetrain steps its non-finite guard skipped (0 expected)
    steps: tuple[int, int]  # optimizer steps taken: facetrain, arcface_torch

    @property
    def ratio(self) -> float:
        return self.facetrain / self.arcface_torch


def compare(depth: int, channels_last: bool, batch: int, classes: int, steps: int,
            device: torch.device) -> Result:
    """``steps`` timed steps of each side (after one warm-up), interleaved in one fit."""
    generator = torch.Generator().manual_seed(depth)
    images = torch.randn(batch, 3, 112, 112, generator=generator).to(device)
    labels = torch.randint(0, classes, (batch,), generator=generator).to(device)
    peer = PeerStep(depth, classes, device, channels_last, total_steps=steps + 1)
    module, trainer_config = facetrain_module(depth, classes, channels_last, peer)
    timer = Interleaved(peer, images, labels)
    trainer_config.pop("_target_")
    with tempfile.TemporaryDirectory() as folder:
        trainer_config.update(
            accelerator="gpu" if device.type == "cuda" else "cpu", max_steps=steps + 1,
            default_root_dir=folder, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
        )
        trainer = pl.Trainer(**trainer_config)
        loader = torch.utils.data.DataLoader(SameBatch(images, labels, steps + 1),
                                             batch_size=None)
        trainer.fit(module, loader)
    between = statistics.median(timer.between[1:]) if timer.between[1:] else 0.0
    return Result(depth, channels_last, statistics.median(timer.facetrain[1:]) + between,
                  between, statistics.median(timer.arcface_torch[1:]), timer.losses[0],
                  module.nonfinite_skipped, (trainer.global_step, peer.names["global_step"]))


def run(depths, batch: int, classes: int, steps: int, device: torch.device,
        layouts=(True, False)) -> list[Result]:
    """Each depth in each layout (``channels_last``: True, False), in that order."""
    check_vendored()
    silence_library_noise()
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)  # a Trainer per pair
    warnings.filterwarnings("ignore", message=r".*(val_dataloader|GPU available|does not have "
                                              r"many workers|LeafSpec)")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.cuda\.amp")
    return [compare(depth, channels_last, batch, classes, steps, device)
            for depth in depths for channels_last in layouts]


def breakdown(depth: int, channels_last: bool, batch: int, classes: int, repeats: int,
              device: torch.device) -> dict[str, tuple[float, float | None]]:
    """Median seconds of the parts of a step, (facetrain, arcface_torch), each pair
    interleaved after a warm-up, on the same weights: the backbone's forward + backward (loss:
    the mean squared embedding) on the batch, the margin head's forward + backward on one set
    of embeddings (facetrain's FullClassCenters + ArcFace, arcface_torch's PartialFC_V2 +
    CombinedMarginLoss), and facetrain's non-finite guard, which has no counterpart (None)."""
    generator = torch.Generator().manual_seed(depth)
    images = torch.randn(batch, 3, 112, 112, generator=generator).to(device)
    labels = torch.randint(0, classes, (batch,), generator=generator).to(device)
    embeddings = torch.randn(batch, EMBEDDING_SIZE, generator=generator).to(device)
    peer = PeerStep(depth, classes, device, channels_last, total_steps=1)
    module, _ = facetrain_module(depth, classes, channels_last, peer)
    module.to(device)
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def backbone(model: nn.Module) -> None:
        model(images.contiguous(memory_format=layout)).square().mean().backward()

    def head(loss) -> None:
        loss(embeddings.clone().requires_grad_()).backward()

    def peer_head(features):
        with cuda_calls_stay(device):
            return peer.module_partial_fc(features, labels.clone())

    parts = {
        "backbone fwd+bwd": (partial(backbone, module.backbone), partial(backbone, peer.backbone)),
        "head fwd+bwd": (partial(head, lambda e: module.classifier(e, labels, module.head).loss),
                         partial(head, peer_head)),
    }
    models = (module, nn.ModuleList([peer.backbone, peer.module_partial_fc]))
    times = {}
    for name, steps in parts.items():
        measured = ([], [])
        for repeat in range(repeats + 1):
            for model, step, out in zip(models, steps, measured, strict=True):
                model.zero_grad(set_to_none=True)  # as every training step starts
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if repeat:  # repeat 0 is the warm-up
                    out.append(time.perf_counter() - start)
        times[name] = tuple(statistics.median(m) for m in measured)
    times["non-finite guard"] = (guard_ms(module, device.type, repeats) / 1e3, None)
    return times


def figures(results: list[Result], batch: int, classes: int, steps: int) -> list[Figure]:
    threads = torch.get_num_threads()
    out = []
    for result in results:
        layout = "on" if result.channels_last else "off"
        out.append(Figure(
            "peer_arcface_torch",
            f"IResNet-{result.depth} + ArcFace train step, batch {batch}, {classes} classes, "
            f"SGD, channels_last {layout} (both)",
            result.ratio, BASELINE,
            f"facetrain {result.facetrain:.2f} s (Lightning between batches "
            f"{1e3 * result.between:.1f} ms), arcface_torch {result.arcface_torch:.2f} s; "
            f"{threads} threads, median of {steps}", "< 1.0x"))
    by_layout = {(r.depth, r.channels_last): r for r in results}
    for depth in dict.fromkeys(r.depth for r in results):
        on, off = by_layout.get((depth, True)), by_layout.get((depth, False))
        if on and off:
            out.append(Figure(
                "peer_arcface_torch",
                f"IResNet-{depth} + ArcFace train step, batch {batch}, {classes} classes, SGD, "
                f"as shipped (facetrain channels_last, arcface_torch NCHW)",
                on.facetrain / off.arcface_torch, BASELINE,
                f"facetrain {on.facetrain:.2f} s, arcface_torch {off.arcface_torch:.2f} s; "
                f"{threads} threads", "< 1.0x"))
    return out


def quick() -> list[Figure]:
    """IResNet-18 at batch 16 (a quarter of the command line's 64, to fit the quick budget),
    two timed steps per side and layout after a warm-up: twelve steps in all."""
    batch, classes, steps = 16, 1000, 2
    return figures(run([18], batch, classes, steps, torch.device("cpu")), batch, classes, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[18, 50], choices=[18, 50])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--breakdown", action="store_true",
                        help="instead: time the parts of a step (backbone, head, guard) apart")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # as train_v2.py's __main__ sets it, for both sides
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    if args.breakdown:
        check_vendored()
        print(f"parts of the step, batch {args.batch}, {args.classes} classes, {where}, "
              f"{torch.get_num_threads()} threads; median of {args.steps} after a warm-up")
        print(f"{'model':<12}{'channels_last':>14}  {'part':<18}{'facetrain s':>12}"
              f"{'arcface_torch s':>17}")
        for depth in args.depths:
            for channels_last in (True, False):
                parts = breakdown(depth, channels_last, args.batch, args.classes, args.steps,
                                  device)
                for name, (ours, theirs) in parts.items():
                    theirs = "-" if theirs is None else f"{theirs:.4f}"
                    print(f"{f'IResNet-{depth}':<12}{'on' if channels_last else 'off':>14}  "
                          f"{name:<18}{ours:>12.4f}{theirs:>17}", flush=True)
        return
    print(f"IResNet + ArcFace training step, batch {args.batch}, {args.classes} classes, SGD, "
          f"112x112, {where}, {torch.get_num_threads()} threads; median of {args.steps} steps "
          f"after a warm-up, facetrain and arcface_torch interleaved", flush=True)
    print(f"{'model':<12}{'channels_last':>14}{'facetrain s':>13}{'arcface_torch s':>17}"
          f"{'ratio':>8}{'first loss ft / at':>24}{'skipped':>9}", flush=True)
    results = []
    for depth in args.depths:
        for result in run([depth], args.batch, args.classes, args.steps, device):
            results.append(result)
            ft_loss, at_loss = result.first_losses
            print(f"{f'IResNet-{depth}':<12}{'on' if result.channels_last else 'off':>14}"
                  f"{result.facetrain:>13.3f}{result.arcface_torch:>17.3f}{result.ratio:>7.2f}x"
                  f"{f'{ft_loss:.4f} / {at_loss:.4f}':>24}{result.skipped:>9}", flush=True)
    for figure in figures(results, args.batch, args.classes, args.steps)[len(results):]:
        print(f"{figure.name}: {figure.ratio:.2f}x ({figure.detail})")


if __name__ == "__main__":
    main()
