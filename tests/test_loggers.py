"""``logger=`` is a list, as ``auxiliary=`` is: Lightning's own loggers (tensorboard, csv,
wandb, mlflow), several at once, tensorboard alone by default, none with ``logger=none``; a
logger whose package (an optional extra) is missing stops the run in one line that names it.
W&B and MLflow are not in the dev extra: their own tests run only where they are installed."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest
from helpers import hydra_main_config, run_cli
from lightning_utilities.core.imports import RequirementCache
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from facetrain.train import LoggerError, build_loggers


def loggers_of(tmp_path, *overrides: str) -> list:
    with hydra_main_config("train", f"hydra.run.dir={tmp_path / 'run'}", *overrides) as cfg:
        return build_loggers(cfg)


@pytest.mark.parametrize(("overrides", "expected"), [
    ((), [TensorBoardLogger]),  # the default
    (("logger=tensorboard",), [TensorBoardLogger]),
    (("logger=none",), []),
    (("logger=[]",), []),
    (("logger=csv",), [CSVLogger]),
    (("logger=[tensorboard,csv]",), [TensorBoardLogger, CSVLogger]),
    (("logger=[csv,tensorboard]",), [CSVLogger, TensorBoardLogger]),
])
def test_logger_choices(tmp_path, overrides, expected):
    built = loggers_of(tmp_path, *overrides)
    assert [type(logger) for logger in built] == expected
    for logger in built:  # each in its own folder of the run
        assert Path(logger.log_dir) == tmp_path / "run" / logger.name


@pytest.mark.slow  # the session's sweep, run with logger=[tensorboard,csv]
def test_tensorboard_and_csv_at_once_log_the_same_validation(swept_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for job in ("0", "1"):
        run = swept_runs / job
        final = json.loads((run / "metrics.json").read_text())["verification"]["synthetic"]
        with (run / "csv" / "metrics.csv").open() as stream:
            logged = [float(r["val/synthetic/accuracy"]) for r in csv.DictReader(stream)
                      if r.get("val/synthetic/accuracy")]
        events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
        events.Reload()
        in_tensorboard = [e.value for e in events.Scalars("val/synthetic/accuracy")]
        # Baseline, epoch 0, epoch 1 in both; the last is what metrics.json reports.
        assert len(logged) == 3 and logged == pytest.approx(in_tensorboard, abs=1e-7)
        assert logged[-1] == pytest.approx(final["accuracy"], abs=1e-6)


def test_missing_wandb_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    import pytorch_lightning.loggers.wandb as lightning_wandb

    # What Lightning finds when wandb is not installed (here even if it is).
    monkeypatch.setattr(lightning_wandb, "_WANDB_AVAILABLE",
                        RequirementCache("facetrain-no-such-package>=1"))
    with pytest.raises(LoggerError) as error:
        loggers_of(tmp_path, "logger=[tensorboard,wandb]")
    assert str(error.value) == (
        'logger=wandb (pytorch_lightning.loggers.WandbLogger) needs the wandb package, which is '
        'not installed: pip install -e ".[wandb]" in a checkout (from a wheel: pip install '
        '"facetrain[wandb]"), or choose another logger (logger=[tensorboard,csv])'
    )


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_train_without_wandb_stops_before_reading_data(tmp_path):
    result = run_cli("train.py", "logger=wandb", f"hydra.run.dir={tmp_path / 'run'}",
                     f"data.synthetic.root={tmp_path / 'never_made'}", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        'facetrain: logger error: logger=wandb (pytorch_lightning.loggers.WandbLogger) needs the '
        'wandb package, which is not installed: pip install -e ".[wandb]" in a checkout (from a '
        'wheel: pip install "facetrain[wandb]"), or choose another logger '
        '(logger=[tensorboard,csv])'
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "never_made").exists()  # no data generated for a run that cannot log


def test_wandb_logs_offline_into_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (logger,) = loggers_of(tmp_path, "logger=wandb")
    logger.log_metrics({"val/accuracy": 0.5}, step=1)
    logger.experiment.finish()
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert list(offline.glob("run-*.wandb"))  # nothing sent; wandb sync uploads it later


def test_mlflow_logs_to_a_local_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)  # the store is outputs/mlruns under the launch folder
    (logger,) = loggers_of(tmp_path, "logger=mlflow")
    logger.log_metrics({"val/accuracy": 0.5}, step=1)
    logger.finalize("success")
    (metric,) = (tmp_path / "outputs" / "mlruns").glob("*/*/metrics/val/accuracy")
    assert metric.read_text().split()[1:] == ["0.5", "1"]  # time, value, step
