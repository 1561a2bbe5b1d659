"""Run-folder rules: a used folder is never silently replaced, one run at a time, a resume keeps its architecture."""

import json
import os
import signal
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

from ldmkit.config import DataConfig, DenoiserRun
from ldmkit.errors import ConfigError, InputError, MissingFileError, RunFolderError
from ldmkit.training import runs
from ldmkit.training.loop import STATE_FILE
from ldmkit.training.runlock import LOCK_FILE, RunLock
from tests.factory import tiny_autoencoder_run, tiny_denoiser_run

ROOT = Path(__file__).resolve().parents[2]


def ae_run(steps=2, **train_kw):
    kw = dict(steps=steps, batch_size=8, lr=1e-3, warmup_steps=1, ema_decay=0.0, log_every=1, ckpt_every=100)
    return tiny_autoencoder_run(
        model=dict(mid_attention=False), loss=dict(disc_start=100), data=dict(holdout=0), train=kw | train_kw
    )


@pytest.fixture
def data(monkeypatch, blobs):
    """Training reads the blobs; `data.calls` counts the loads (the expensive step the folder checks must precede)."""
    calls = []

    def datasets(cfg, holdout):
        calls.append(cfg)
        return blobs, None

    monkeypatch.setattr(runs, "_datasets", datasets)
    return calls


def no_data(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the run loaded data before checking its folder")

    monkeypatch.setattr(runs, "_datasets", fail)
    monkeypatch.setattr(runs, "load_autoencoder", fail)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --- a folder that holds a run ----------------------------------------------------------------------------------


def test_new_run_in_a_used_folder_is_refused_before_loading_data(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (out / STATE_FILE).write_bytes(b"state")
    before = snapshot(out)
    no_data(monkeypatch)
    with pytest.raises(RunFolderError, match=r"run.*--resume.*--overwrite.*--out"):
        runs.train_autoencoder(ae_run(), out, progress=False)
    with pytest.raises(RunFolderError, match="--resume"):
        runs.train_denoiser(DenoiserRun(autoencoder="ae.safetensors"), out, progress=False)
    assert snapshot(out) == before  # nothing written, no lock file left


def test_overwrite_replaces_the_previous_run_and_keeps_other_files(tmp_path, data):
    out = tmp_path / "run"
    runs.train_autoencoder(ae_run(steps=2), out, progress=False)
    for name in ("recon-0000003.png", "eval-x-test-n10.json", ".train-state.safetensors.abcd1234.tmp", "notes.txt"):
        (out / name).write_text("old")
    runs.train_autoencoder(ae_run(steps=1), out, progress=False, overwrite=True)
    names = {p.name for p in out.iterdir()}
    assert names == {"autoencoder.safetensors", "config.json", "log.jsonl", "metrics.json", STATE_FILE, "notes.txt"}
    assert [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()] == [1]
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 1


def test_overwrite_keeps_the_autoencoder_the_new_run_reads(tmp_path, tiny_ae, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    ae = out / "autoencoder.safetensors"
    ae.write_bytes(Path(tiny_ae).read_bytes())
    (out / "log.jsonl").write_text("")

    def stop(*a, **k):
        raise KeyboardInterrupt("stop after the folder rules")

    monkeypatch.setattr(runs, "_datasets", stop)
    with pytest.raises(KeyboardInterrupt):
        runs.train_denoiser(
            DenoiserRun(autoencoder=str(ae), data=DataConfig(resolution=16, channels=1)),
            out,
            progress=False,
            overwrite=True,
        )
    assert ae.is_file() and not (out / "log.jsonl").exists()


def test_resume_and_overwrite_together_or_resume_without_state(tmp_path, monkeypatch):
    no_data(monkeypatch)
    with pytest.raises(InputError, match="--resume and --overwrite"):
        runs.train_autoencoder(ae_run(), tmp_path, progress=False, resume=True, overwrite=True)
    with pytest.raises(MissingFileError, match=f"no {STATE_FILE}"):
        runs.train_autoencoder(ae_run(), tmp_path / "empty", progress=False, resume=True)


# --- resume with another configuration --------------------------------------------------------------------------


def test_resume_with_another_architecture_is_refused_in_one_line_before_writing(tmp_path, data):
    out = tmp_path / "run"
    runs.train_autoencoder(ae_run(steps=1), out, progress=False)
    before = snapshot(out)
    run = ae_run(steps=1)
    changed = replace(run, model=replace(run.model, base_channels=16), data=replace(run.data, resolution=32))
    with pytest.raises(ConfigError) as err:
        runs.train_autoencoder(changed, out, progress=False, resume=True)
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400
    assert "model.base_channels: 8 -> 16" in msg and "data.resolution: 16 -> 32" in msg
    assert snapshot(out) == before and len(data) == 1  # config.json untouched; no data loaded for the refusal


def test_resume_with_new_hyperparameters_warns_and_records_them(tmp_path, data):
    out = tmp_path / "run"
    runs.train_autoencoder(ae_run(steps=1), out, progress=False)
    with pytest.warns(UserWarning, match=r"train\.lr: 0\.001 -> 0\.0005") as record:
        res = runs.train_autoencoder(ae_run(steps=2, lr=5e-4), out, progress=False, resume=True)
    changed = [str(w.message) for w in record if "train.lr" in str(w.message)]
    assert len(changed) == 1 and "train.steps: 1 -> 2" in changed[0]  # one warning lists every change
    assert res["step"] == 2
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 5e-4


def test_resume_with_the_same_configuration_is_silent(tmp_path, data):
    out = tmp_path / "run"
    runs.train_autoencoder(ae_run(steps=2), out, progress=False, stop_after=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runs.train_autoencoder(ae_run(steps=2), out, progress=False, resume=True)["step"] == 2


def test_denoiser_resume_with_another_unet_is_refused_before_encoding(tmp_path, tiny_ae, data, monkeypatch):
    out = tmp_path / "run"
    run = tiny_denoiser_run(
        tiny_ae, data=dict(holdout=0), train=dict(steps=2, batch_size=8, warmup_steps=1, ema_decay=0.0, log_every=1)
    )
    runs.train_denoiser(run, out, progress=False)
    saved = json.loads((out / "config.json").read_text())
    assert saved["unet"]["in_channels"] == 2 and saved["unet"]["num_classes"] == 2  # resolved values are stored
    before = snapshot(out)
    no_data(monkeypatch)
    with pytest.raises(ConfigError, match=r"unet\.model_channels: 8 -> 16") as err:
        runs.train_denoiser(replace(run, unet=replace(run.unet, model_channels=16)), out, progress=False, resume=True)
    assert "unet.in_channels" not in str(err.value)  # filled in from the autoencoder, not a change
    assert snapshot(out) == before


# --- one run per folder -----------------------------------------------------------------------------------------

HOLD = (
    "import sys, time\nfrom ldmkit.training.runlock import RunLock\nwith RunLock(sys.argv[1]):\n"
    "    print('locked', flush=True)\n    time.sleep(60)\n"
)


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that takes the folder's lock and keeps it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_naming_the_first(tmp_path, monkeypatch):
    proc = hold_lock(tmp_path)
    try:
        with pytest.raises(RunFolderError, match=rf"in use by .*PID {proc.pid} on host \S+"):
            RunLock(tmp_path).acquire()
        no_data(monkeypatch)
        with pytest.raises(RunFolderError, match=f"PID {proc.pid}"):
            runs.train_autoencoder(ae_run(), tmp_path, progress=False)
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == proc.pid  # the holder's record is kept
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_warning(tmp_path):
    proc = hold_lock(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / LOCK_FILE).exists()  # kill -9 leaves the file behind
    with pytest.warns(UserWarning, match=rf"stale lock .*PID {proc.pid}.*no longer running"):
        with RunLock(tmp_path):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_lock_is_released_on_an_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with RunLock(tmp_path):
            with pytest.raises(RunFolderError, match=f"PID {os.getpid()}"):
                RunLock(tmp_path).acquire()  # a second open file description conflicts even in one process
            raise RuntimeError("crash inside the run")
    assert not (tmp_path / LOCK_FILE).exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with RunLock(tmp_path):
            pass
