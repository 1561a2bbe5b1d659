"""The command line's error handling: bad input gets a clear message and a non-zero exit."""

import json
import sys
import time

import pytest
import torch

from ldmkit import checkpoint
from ldmkit.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_missing_checkpoint(capsys, tmp_path):
    code, _, err = run(capsys, "sample", str(tmp_path / "nope.safetensors"))
    assert code == 2 and "does not exist" in err


def test_wrong_kind(capsys, tmp_path):
    path = checkpoint.save(tmp_path / "ae.safetensors", {"w": torch.zeros(1)}, "autoencoder", {})
    code, _, err = run(capsys, "sample", str(path))
    assert code == 2 and "holds a 'autoencoder' checkpoint, but a 'ldm'" in err


def test_unknown_sampler_lists_known(capsys, tiny_ldm):
    code, _, err = run(capsys, "sample", str(tiny_ldm), "--sampler", "plms", "--n", "1")
    assert code == 2 and "plms" in err and "dpmpp_2m" in err and "euler" in err


def test_label_out_of_range_lists_classes(capsys, tiny_ldm):
    code, _, err = run(capsys, "sample", str(tiny_ldm), "--label", "7", "--n", "1", "--steps", "2")
    assert code == 2 and "label 7 is out of range" in err and "1=bottom-right" in err


def test_info_prints_config(capsys, tiny_ldm):
    code, out, _ = run(capsys, "info", str(tiny_ldm))
    meta = json.loads(out)
    assert code == 0 and meta["kind"] == "ldm" and meta["config"]["unet"]["num_classes"] == 2


def test_resolution_not_divisible(capsys, tmp_path, tiny_ae):
    code, _, err = run(
        capsys, "train", "--autoencoder", str(tiny_ae), "--resolution", "31", "--out", str(tmp_path / "r"), "--quiet"
    )
    assert code == 2 and "data.resolution 31 is not a multiple of 8 (the autoencoder downsamples by 2, then" in err
    # 30 px gives 15x15 latents, which the default U-Net (two downsamplings) cannot halve twice; refused before
    # the data set is encoded, so in well under a second.
    start = time.time()
    code, _, err = run(
        capsys, "train", "--autoencoder", str(tiny_ae), "--resolution", "30", "--out", str(tmp_path / "r2"), "--quiet"
    )
    assert code == 2 and "data.resolution 30 is not a multiple of 8" in err and "use 24 or 32" in err
    assert time.time() - start < 20


def test_train_without_autoencoder(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--out", str(tmp_path), "--quiet")
    assert code == 2 and "--autoencoder" in err


def test_sample_writes_png_with_parameters(capsys, tmp_path, tiny_ldm):
    from PIL import Image

    out = tmp_path / "grid.png"
    code, _, _ = run(
        capsys,
        "sample",
        str(tiny_ldm),
        "--n",
        "3",
        "--label",
        "1",
        "--steps",
        "3",
        "--sampler",
        "euler",
        "--seed",
        "5",
        "--out",
        str(out),
    )
    assert code == 0
    params = json.loads(Image.open(out).text["ldmkit"])
    assert params["seed"] == 5 and params["sampler"] == "euler" and params["labels"] == [1]


def _png_params(path):
    from PIL import Image

    return json.loads(Image.open(path).text["ldmkit"])


def test_prompt_negative_prompt_and_guidance_rescale_reach_the_image(capsys, tmp_path, tiny_text_ldm):
    out = tmp_path / "p.png"
    code, _, err = run(
        capsys,
        "sample",
        str(tiny_text_ldm),
        "--prompt",
        "red apple",
        "--negative-prompt",
        "green",
        "--cfg",
        "5",
        "--guidance-rescale",
        "0.7",
        "--n",
        "2",
        "--steps",
        "3",
        "--out",
        str(out),
    )
    assert code == 0, err
    p = _png_params(out)
    assert p["prompts"] == ["red apple", "red apple"] and p["negative_prompt"] == "green" and p["cfg_rescale"] == 0.7


def test_prompt_file_gives_one_image_per_line_in_batches(capsys, tmp_path, tiny_text_ldm):
    from ldmkit.ldm import LatentDiffusion
    from ldmkit.pipelines.generate import generate
    from ldmkit.pipelines.request import SampleRequest

    lines = ["red apple", "", "blue whale", "snowy mountain", "green leaf"]
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    code, out, err = run(
        capsys,
        "sample",
        str(tiny_text_ldm),
        "--prompt-file",
        str(tmp_path / "prompts.txt"),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--separate",
        "--out",
        str(tmp_path / "imgs"),
    )
    assert code == 0, err
    files = sorted((tmp_path / "imgs").glob("*.png"))
    assert [_png_params(f)["caption"] for f in files] == [line for line in lines if line]
    # Batched generation equals one-at-a-time generation: image i depends on its own prompt and seed only.
    ldm = LatentDiffusion.load(tiny_text_ldm)
    a, _ = generate(ldm, SampleRequest(n=2, prompts=["red apple", "blue whale"], steps=2, batch_size=2))
    b, _ = generate(ldm, SampleRequest(n=2, prompts=["red apple", "blue whale"], steps=2, batch_size=1))
    assert torch.allclose(a, b, atol=1e-5)


def test_prompt_to_a_class_model_is_a_clear_error(capsys, tiny_ldm):
    code, _, err = run(capsys, "sample", str(tiny_ldm), "--prompt", "a cat", "--steps", "2")
    assert code == 2 and "not text-conditional" in err


# --- options declared once, --debug anywhere, --overwrite -----------------------------------------------------


def _subparsers():
    from ldmkit.cli import build_parser

    action = next(a for a in build_parser()._actions if a.dest == "command")
    return action.choices


def test_sampling_commands_declare_the_shared_options_identically():
    subs = _subparsers()
    for dest in ("sampler", "steps", "cfg", "seed", "device", "negative_prompt", "label", "guidance_rescale", "eta"):
        declared = {}
        for cmd in ("sample", "generate", "evaluate"):
            acts = [a for a in subs[cmd]._actions if a.dest == dest]
            if acts:
                declared[cmd] = (tuple(acts[0].option_strings), acts[0].type, acts[0].default, acts[0].help)
        assert len(set(declared.values())) == 1, (dest, declared)
    defaults = {
        cmd: subs[cmd].parse_args(["x"] if cmd != "generate" else [])
        for cmd in subs
        if cmd in ("sample", "generate", "evaluate")
    }
    assert [defaults[c].n for c in ("sample", "generate", "evaluate")] == [16, 4, 10000]
    assert [defaults[c].batch_size for c in ("sample", "generate", "evaluate")] == [16, 16, 50]
    assert defaults["generate"].eta is None and defaults["generate"].guidance_rescale == 0.0


def test_readme_commands_parse():
    import shlex
    from pathlib import Path

    from ldmkit.cli import build_parser

    root = Path(__file__).resolve().parents[2]
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]  # the README and the docs it points to
    text = "\n".join(p.read_text() for p in pages).replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith(".venv/bin/ldmkit ")]
    assert len(lines) > 10
    for ln in lines:
        build_parser().parse_args(shlex.split(ln, comments=True)[1:])


def test_every_subcommand_accepts_debug():
    for name, sub in _subparsers().items():
        assert "--debug" in sub._option_string_actions, name


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_in_either_position_raises_user_errors(tmp_path, where):
    from ldmkit.errors import MissingFileError

    argv = ["generate", "--model", str(tmp_path / "nope.safetensors")]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(MissingFileError, match="nope.safetensors does not exist"):
        main(argv)


def test_without_debug_a_user_error_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--model", str(tmp_path / "nope.safetensors"))
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")


@pytest.mark.parametrize("cmd,fn", [("train-autoencoder", "train_autoencoder"), ("train", "train_denoiser")])
def test_overwrite_reaches_the_training_function(capsys, monkeypatch, tmp_path, tiny_ae, cmd, fn):
    import ldmkit.training.runs as runs  # the commands import it when they run

    seen = {}

    def fake(run, out, **kw):
        seen.update(kw, out=out)
        return {"checkpoint": str(tmp_path / "x.safetensors"), "step": 0}

    monkeypatch.setattr(runs, fn, fake)
    extra = ["--autoencoder", str(tiny_ae)] if cmd == "train" else []
    assert main([cmd, *extra, "--out", str(tmp_path / "r"), "--overwrite", "--quiet"]) == 0
    assert seen["overwrite"] is True and seen["out"] == str(tmp_path / "r")
    assert main([cmd, *extra, "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert seen["overwrite"] is False


# --- prompts that are not valid UTF-8, prompt files -------------------------------------------------------------


def test_invalid_utf8_prompt_from_the_shell_is_one_line(tmp_path, tiny_text_ldm):
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "ldmkit"
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run(
        [
            str(exe),
            "generate",
            b"red apple\xff",
            "--model",
            str(tiny_text_ldm),
            "--steps",
            "1",
            "--out",
            str(tmp_path / "x.png"),
        ],
        capture_output=True,
        env=env,
        timeout=120,
    )
    err = r.stderr.decode("utf-8")
    assert r.returncode == 2 and "Traceback" not in err, err
    assert "not valid UTF-8" in err and "red apple\ufffd" in err and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "{m}", "--prompt", "red apple\udcff"],
        ["sample", "{m}", "--prompt", "red apple", "--negative-prompt", "gr\udce9en"],
        ["generate", "red apple\udcff", "--model", "{m}"],
        ["generate", "red apple", "--negative-prompt", "gr\udce9en", "--model", "{m}"],
    ],
)
def test_invalid_utf8_prompts_are_user_errors(capsys, tmp_path, tiny_text_ldm, argv):
    argv = [a.replace("{m}", str(tiny_text_ldm)) for a in argv] + ["--steps", "1", "--out", str(tmp_path / "x.png")]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "not valid UTF-8" in err and "\ufffd" in err
    assert not any("\ud800" <= c <= "\udfff" for c in err)  # the message itself can be printed


def test_prompt_file_mistakes_are_one_line_naming_the_file(capsys, tmp_path, tiny_text_ldm):
    from ldmkit.errors import LdmkitError

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("red apple\ngr\xfcn\n".encode("latin-1"))
    cases = [(tmp_path / "missing.txt", "does not exist"), (tmp_path, "is a folder"), (bad, "not valid UTF-8")]
    for path, words in cases:
        argv = [
            "sample",
            str(tiny_text_ldm),
            "--prompt-file",
            str(path),
            "--steps",
            "1",
            "--out",
            str(tmp_path / "x.png"),
        ]
        code, _, err = run(capsys, *argv)
        assert code == 2 and str(path) in err and words in err and err.count("\n") == 1, err
        with pytest.raises(LdmkitError):
            main(["--debug", *argv])
    code, _, err = run(capsys, "sample", str(tiny_text_ldm), "--prompt-file", str(bad), "--steps", "1")
    assert "line 2" in err and "gr\ufffdn" in err


def test_prompt_file_with_a_byte_order_mark(capsys, tmp_path, tiny_text_ldm):
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffred apple\n".encode("utf-8"))
    code, _, err = run(
        capsys, "sample", str(tiny_text_ldm), "--prompt-file", str(f), "--steps", "1", "--out", str(tmp_path / "p.png")
    )
    assert code == 0, err
    assert _png_params(tmp_path / "p.png")["prompts"] == ["red apple"]


# --- configuration files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content,words", [(b"[train\nsteps = 1\n", "not valid TOML"), (b'[data]\ndataset = "gr\xfcn"\n', "not UTF-8")]
)
def test_broken_config_file_is_one_line(capsys, tmp_path, content, words):
    cfg = tmp_path / "run.toml"
    cfg.write_bytes(content)
    code, _, err = run(capsys, "train-autoencoder", "--config", str(cfg), "--out", str(tmp_path / "r"), "--quiet")
    assert code == 2 and str(cfg) in err and words in err and err.count("\n") == 1, err


def test_run_folder_that_is_a_file_is_one_line(capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    for out in (f, f / "sub"):
        code, _, err = run(capsys, "train-autoencoder", "--out", str(out), "--steps", "1", "--quiet")
        assert code == 2 and str(out) in err and "--out" in err and err.count("\n") == 1, err


def test_evaluate_result_that_cannot_be_written_is_refused_before_evaluating(capsys, monkeypatch, tmp_path, tiny_ldm):
    import ldmkit.evaluation.evaluate as evaluation  # the command imports it when it runs

    calls = []
    monkeypatch.setattr(evaluation, "evaluate", lambda path, **kw: calls.append(str(path)) or {"data": "b", "fid": 1.0})
    monkeypatch.setattr(evaluation, "format_table", lambda result: "fid 1.0")
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path, tmp_path / "afile" / "r.json", "/proc/r.json"):
        code, printed, err = run(capsys, "evaluate", str(tiny_ldm), "--out", str(out), "--quiet")
        assert code == 2 and str(out) in err and err.count("\n") == 1, err
    assert calls == []  # refused before the (long) evaluation ran
    code, printed, _ = run(capsys, "evaluate", str(tiny_ldm), "--out", str(tmp_path / "r.json"), "--quiet")
    assert code == 0 and "fid 1.0" in printed and calls == [str(tiny_ldm)]
    code, _, err = run(capsys, "evaluate", str(tmp_path / "none.safetensors"), "--quiet")
    assert code == 2 and "none.safetensors does not exist" in err and calls == [str(tiny_ldm)]  # before evaluating


def test_quiet_turns_off_the_sampling_progress_bar(capsys, monkeypatch, tmp_path, tiny_ldm):
    import ldmkit.pipelines.generate as generate  # the commands import it when they run

    seen = []
    monkeypatch.setattr(
        generate,
        "generate_to_file",
        lambda ckpt, req, out, grid=True, progress=True, *args, **kwargs: seen.append(progress) or [out],
    )
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # shown on a terminal only
    for quiet in ([], ["--quiet"]):
        assert main(["sample", str(tiny_ldm), *quiet]) == 0
        assert main(["generate", "--model", str(tiny_ldm), "--label", "0", *quiet]) == 0
    assert seen == [True, True, False, False]


def test_prompt_and_prompt_file_together_are_refused(capsys, tmp_path, tiny_text_ldm):
    (tmp_path / "p.txt").write_text("blue whale\n")
    with pytest.raises(SystemExit) as e:  # before: --prompt was silently ignored
        main(["sample", str(tiny_text_ldm), "--prompt", "red apple", "--prompt-file", str(tmp_path / "p.txt")])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_warnings_are_one_line(capsys, tmp_path):
    """A warning reaches the user as `warning: ...`, not with the source line of the code that raised it."""
    meta = tmp_path / "data"
    (meta / "a").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(meta / "a" / "x.png")
    (meta / "metadata.jsonl").write_text('{"file_name": "a/missing.png", "text": "gone"}\n')
    code, _, err = run(
        capsys,
        "train-autoencoder",
        "--data",
        str(meta),
        "--steps",
        "1",
        "--set",
        "data.holdout=0",
        "--set",
        "data.resolution=8",
        "--set",
        "model.channel_mult=1",
        "--set",
        "model.base_channels=8",
        "--set",
        "model.norm_groups=4",
        "--set",
        "loss.perceptual_weight=0",
        "--set",
        "train.batch_size=1",
        "--set",
        "train.warmup_steps=1",
        "--out",
        str(tmp_path / "r"),
        "--quiet",
    )
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "missing.png" in ln]
    assert lines and all(ln.startswith("warning: ") for ln in lines) and ".py:" not in err, err
