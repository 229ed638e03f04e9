"""The progress bar of the tools that go through images (facetrain-embed, facetrain-align): on
stderr, so that stdout stays clean for what the tool prints."""

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def image_progress(enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("images"), TimeRemainingColumn(), console=Console(stderr=True),
        disable=not enabled,
    )
