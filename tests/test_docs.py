"""The documentation cannot rot.

- The examples of docs/adding_a_head.md and docs/adding_a_backbone.md run as a reader runs
  them: each code block whose first line names a file (``# facetrain/heads/x.py``,
  ``# configs/loss/x.yaml``) is written there — into a temporary folder that extends the package
  and Hydra's search path, never into the checkout — the other Python blocks are executed, and
  the pages' ``python train.py ...`` commands train one step through the training library.
- Every relative link of README.md and docs/ points at a file (and a heading, for ``#anchor``).
- Every configs/loss/*.yaml is linked from a page of docs/heads/ or docs/losses.md, and
  docs/heads.md links every page of docs/heads/.
- README.md keeps the lines tools and CI read: the test command and the generated sections'
  marker lines.
"""

import importlib
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, hydra_main_config, tiny_overrides
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import facetrain.backbones
import facetrain.heads
from facetrain.data import SyntheticFaces
from facetrain.train import train

DOCS = REPO / "docs"
HEAD_PAGE, BACKBONE_PAGE = DOCS / "adding_a_head.md", DOCS / "adding_a_backbone.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# A first line naming where the block goes: "# facetrain/heads/x.py", "# configs/loss/x.yaml".
TARGET = re.compile(r"#\s*((?:facetrain|configs)/[\w/]+\.(?:py|yaml))\s*$")


def code_blocks(page: Path) -> list[tuple[str, str]]:
    """(language, text) of every fenced block of ``page``, in order."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(page.read_text())]


def written_files(page: Path) -> dict[str, str]:
    """The blocks whose first line names a file: {relative path: text}."""
    files = {}
    for _, text in code_blocks(page):
        match = TARGET.fullmatch(text.splitlines()[0])
        if match:
            files[match.group(1)] = text
    return files


def python_checks(page: Path) -> list[str]:
    """The Python blocks that are run, not written to a file."""
    return [text for language, text in code_blocks(page)
            if language == "python" and not TARGET.fullmatch(text.splitlines()[0])]


def train_overrides(page: Path) -> list[str]:
    """The overrides of the page's ``python train.py ...`` command (one per page)."""
    commands = [line for language, text in code_blocks(page) if language == "bash"
                for line in text.splitlines() if line.startswith("python train.py")]
    assert len(commands) == 1, f"{page.name}: expected one python train.py command, {commands}"
    return shlex.split(commands[0])[2:]


@pytest.fixture
def examples(tmp_path, monkeypatch) -> Path:
    """Both pages' files written under ``tmp_path``: the modules importable as
    ``facetrain.heads.<name>`` / ``facetrain.backbones.<name>`` (the packages' ``__path__``
    extended), the YAML files in ``tmp_path/configs`` for Hydra's search path. Returns that
    configs folder."""
    files = {**written_files(HEAD_PAGE), **written_files(BACKBONE_PAGE)}
    assert {Path(p).parts[:2] for p in files} == {
        ("facetrain", "heads"), ("configs", "loss"), ("facetrain", "backbones"),
        ("configs", "backbone")}, f"the pages should write a head, a backbone, their YAML: {files}"
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in (facetrain.heads, facetrain.backbones):
        extension = tmp_path / Path(*package.__name__.split("."))
        monkeypatch.setattr(package, "__path__", [*package.__path__, str(extension)])
    importlib.invalidate_caches()
    modules = [".".join(Path(p).with_suffix("").parts) for p in files if p.endswith(".py")]
    yield tmp_path / "configs"
    for module in modules:
        sys.modules.pop(module, None)


def test_the_head_example_runs_and_computes_what_the_page_says(examples, capsys):
    (check,) = python_checks(HEAD_PAGE)
    scope: dict = {}
    exec(compile(check, str(HEAD_PAGE), "exec"), scope)  # noqa: S102  the page's own code
    printed = capsys.readouterr().out

    # Independently: CosFace at s=64 with half the warm-up's margin (0.175), in float64.
    x = scope["embeddings"].detach().double().numpy()
    w = scope["centers"].weight.detach().double().numpy()
    labels = scope["labels"].numpy()
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (
        w / np.linalg.norm(w, axis=1, keepdims=True)).T
    rows = np.arange(len(x))
    cos[rows, labels] -= 0.35 * 50 / 100
    logits = 64.0 * cos
    shifted = logits - logits.max(axis=1, keepdims=True)
    loss = np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[rows, labels])
    assert scope["output"].loss.item() == pytest.approx(loss, rel=1e-5)
    assert f"margin {0.175:.3f}" in printed
    assert scope["embeddings"].grad is not None and torch.isfinite(scope["embeddings"].grad).all()
    assert "step" in dict(scope["margin"].named_buffers())  # checkpointed state, as the page says


def test_the_backbone_example_runs_and_has_the_size_it_is_built_with(examples, capsys):
    (check,) = python_checks(BACKBONE_PAGE)
    scope: dict = {}
    exec(compile(check, str(BACKBONE_PAGE), "exec"), scope)  # noqa: S102  the page's own code
    assert tuple(scope["embeddings"].shape) == (4, 128)
    assert "(4, 128)" in capsys.readouterr().out
    # Independently: four 3x3 conv stages (no bias) with BatchNorm and PReLU, then FC + BN on
    # the flattened 4x4 map of a 64x64 input.
    widths, parameters = [3, 32, 64, 128, 256], 0
    for before, after in zip(widths, widths[1:], strict=False):
        parameters += before * after * 9 + 2 * after + after
    parameters += 256 * 4 * 4 * 128 + 128 + 2 * 128
    assert facetrain.backbones.count_parameters(scope["model"]) == parameters
    with pytest.raises(ValueError, match="TinyNet needs an input size divisible by 16"):
        scope["TinyNet"](input_size=(100, 100))


def test_the_pages_commands_train_a_step_with_both_examples(examples, tmp_path):
    faces = SyntheticFaces(root=str(tmp_path / "faces"), num_train_identities=6,
                           images_per_train_identity=3, num_verification_identities=4,
                           images_per_verification_identity=3, num_pairs=20, workers=1).generate()
    run = tmp_path / "run"
    with hydra_main_config(
        "train", *train_overrides(HEAD_PAGE), *train_overrides(BACKBONE_PAGE),
        *tiny_overrides(faces, run), f"hydra.searchpath=[file://{examples}]",
        "trainer.max_epochs=1", "trainer.log_every_n_steps=1", "measure_baselines=false",
        "~callbacks.projector",
    ) as cfg:
        written = {Path(*p.split("/")).stem for p in written_files(HEAD_PAGE)} | {
            Path(*p.split("/")).stem for p in written_files(BACKBONE_PAGE)}
        # the commands pick the pages' own files (found through the search path)
        assert {cfg.loss._target_.split(".")[2], cfg.backbone._target_.split(".")[2]} <= written
        metrics = train(cfg)
    assert metrics["steps"] == 1 and metrics["status"] == "finished"
    assert json.loads((run / "metrics.json").read_text())["num_classes"] == 6
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    # The page's "logged as train/head_margin": step 0 of a 500-step warm-up, margin 0.
    (margin,) = events.Scalars("train/head_margin")
    assert margin.value == 0.0


# --- links and coverage ------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]


def prose(page: Path) -> str:
    """The page without fenced blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))


def slugs(page: Path) -> set[str]:
    """GitHub's anchors of the page's headings: lower case, punctuation dropped, spaces to
    hyphens, a -N suffix for repeats."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def links(page: Path) -> list[str]:
    return [target for target in LINK.findall(prose(page))
            if not re.match(r"[a-z]+:", target)]  # http:, https:, mailto: are not checked


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_at_an_existing_file_and_heading(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in set(slugs(file)):
            broken.append(f"{target} (no heading #{anchor} in {file.name})")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {broken}"


def linked_files(page: Path) -> set[Path]:
    return {(page.parent / t.partition("#")[0]).resolve() for t in links(page)
            if t.partition("#")[0]}


def test_every_loss_config_has_a_docs_page():
    documented = set()
    for page in [*sorted((DOCS / "heads").glob("*.md")), DOCS / "losses.md"]:
        documented |= linked_files(page)
    configs = sorted((REPO / "configs" / "loss").glob("*.yaml"))
    missing = [p.name for p in configs if p.resolve() not in documented]
    assert not missing, f"configs/loss files that no page of docs/heads/ or docs/losses.md " \
                        f"links: {missing}"


def test_the_one_form_links_every_head_page():
    head_pages = {p.resolve() for p in (DOCS / "heads").glob("*.md")}
    assert head_pages, "docs/heads/ has no pages"
    unlinked = sorted(p.name for p in head_pages - linked_files(DOCS / "heads.md"))
    assert not unlinked, f"docs/heads.md does not link {unlinked}"


def test_readme_keeps_the_test_command_and_the_generated_sections_markers():
    lines = (REPO / "README.md").read_text().splitlines()
    assert any(line.strip().startswith('pip install -e ".[dev]" && pytest') for line in lines)
    for name in ("benchmarks", "recipes", "compare", "compare_heads_cpu"):
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        assert lines.count(begin) == 1 and lines.count(end) == 1, f"marker lines of {name}"
        assert lines.index(begin) < lines.index(end), name


def table_cells(row: str) -> int:
    """Cells of a markdown table row: its pipes minus the outer two, ``\\|`` not counted."""
    return len(re.findall(r"(?<!\\)\|", row)) - 1


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_table_row_has_its_header_s_cells(page):
    """An unescaped pipe inside a cell (``|x|``) splits it and shifts the rest of the row."""
    lines, bad = FENCE.sub("", page.read_text()).splitlines(), []
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and re.fullmatch(r"\|[-:| ]+\|", lines[i + 1]):
            header, row = table_cells(line), i + 2
            while row < len(lines) and lines[row].startswith("|"):
                if table_cells(lines[row]) != header:
                    bad.append(lines[row][:80])
                row += 1
    assert not bad, f"{page.relative_to(REPO)}: rows whose cell count differs from the header " \
                    f"(escape a pipe inside a cell as \\|): {bad}"
