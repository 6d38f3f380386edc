"""The ``meddiff-fm`` command line: help texts, geometry kept, errors, train then synthesize."""

import argparse

import numpy as np
import pytest

from MedDiffFMLib import cli, io
from MedDiffFMLib.geometry import make_ijk_to_ras
from MedDiffFMLib.volume import Volume

# Sub-commands whose options must all be documented.
DOCUMENTED = ("train", "finetune", "synthesize", "denoise", "anomaly", "superres", "lesion", "inpaint", "export",
              "demo", "benchmark", "phantom")


def _subparsers():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def _options(p):
    return [a for a in p._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("command", DOCUMENTED)
def test_every_option_has_help(command):
    parsers = _subparsers()
    assert command in parsers, f"no {command} command"
    actions = _options(parsers[command])
    assert actions
    undocumented = [a.option_strings or a.dest for a in actions if not (a.help or "").strip()]
    assert not undocumented, undocumented


def test_every_command_has_help():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert set(helps) == set(sub.choices)
    assert all((h or "").strip() for h in helps.values()), helps


@pytest.mark.parametrize("command", ["train", "synthesize"])
def test_help_mentions_every_option(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for action in _options(_subparsers()[command]):
        for flag in action.option_strings:
            assert flag in text, flag
        assert action.help.split("(default")[0].split()[0] in text


def test_train_help_lists_the_key_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--preset", "--data", "--phantoms", "--out", "--resume", "--steps", "--batch-size", "--lr",
                 "--ema-decay", "--checkpoint-every", "--device", "--precision", "torchrun"):
        assert flag in text


def test_synthesize_help_lists_the_sampling_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["synthesize", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--reference", "--anatomy", "--region", "--steps", "--seed", "--method", "--window",
                 "--overlap", "--guidance-scale", "--multilevel", "--no-multilevel", "--device"):
        assert flag in text


# ------------------------------------------------------------------------------- synthesize keeps the grid
def _run(argv, capsys):
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_synthesize_keeps_an_oblique_reference_grid(tmp_path, tiny_model_dir, oblique_ijk_to_ras, capsys):
    shape = (10, 28, 30)  # 25 x 22.4 x 21 mm: larger than one 16 mm window along k and j
    ref = tmp_path / "reference.nii.gz"
    io.write_volume(ref, Volume(np.full(shape, -50.0, np.float32), oblique_ijk_to_ras))
    out = tmp_path / "synthetic.nii.gz"
    rc, stdout, _ = _run(["synthesize", "--model", str(tiny_model_dir), "--reference", str(ref), "--region", "chest",
                          "--steps", "2", "--device", "cpu", "--quiet", "-o", str(out)], capsys)
    assert rc == 0
    assert "synthesize:" in stdout and str(out) in stdout
    vol = io.read_volume(out)
    assert vol.shape == shape
    np.testing.assert_allclose(vol.ijk_to_ras, oblique_ijk_to_ras, atol=1e-4)
    assert np.isfinite(vol.array).all()
    assert vol.array.min() >= -1400.0 - 1e-3 and vol.array.max() <= 400.0 + 1e-3  # the chest window
    assert vol.array.std() > 1.0


def test_synthesize_on_an_anatomy_label_map_grid(tmp_path, tiny_model_dir, capsys):
    direction = np.array([[0.0, 0.0, -1.0], [0.6, 0.8, 0.0], [0.8, -0.6, 0.0]])  # oblique, with a flip
    m = make_ijk_to_ras((2.0, 1.1, 0.9), (40.0, -12.0, 300.5), direction)
    shape = (9, 14, 17)
    labels = np.zeros(shape, np.uint8)
    labels[1:8, 2:12, 3:15] = 255  # body
    labels[3:6, 4:9, 5:10] = 5  # liver
    labels[6:8, 9:12, 10:14] = 200  # a class the model does not know
    lab = tmp_path / "anatomy.nii.gz"
    io.write_volume(lab, Volume(labels, m), label_names={5: "liver", 200: "mystery_organ", 255: "body"})
    out = tmp_path / "out.nrrd"
    rc, stdout, _ = _run(["synthesize", "--model", str(tiny_model_dir), "--anatomy", str(lab), "--region",
                          "abdomen", "--steps", "2", "--no-multilevel", "--device", "cpu", "--quiet", "-o", str(out)],
                         capsys)
    assert rc == 0
    assert "mystery_organ" in stdout
    vol = io.read_volume(out)
    assert vol.shape == shape
    np.testing.assert_allclose(vol.ijk_to_ras, m, atol=1e-4)
    assert np.isfinite(vol.array).all()


def test_synthesize_default_output_name(tmp_path, tiny_model_dir, oblique_ijk_to_ras, capsys):
    ref = tmp_path / "case.nii"
    io.write_volume(ref, Volume(np.zeros((4, 6, 5), np.float32), oblique_ijk_to_ras))
    rc, _, _ = _run(["synthesize", "--model", str(tiny_model_dir), "--reference", str(ref), "--region", "hn",
                     "--steps", "1", "--device", "cpu", "--quiet"], capsys)
    assert rc == 0
    vol = io.read_volume(tmp_path / "case_synthesize.nii.gz")
    assert vol.shape == (4, 6, 5)
    np.testing.assert_allclose(vol.ijk_to_ras, oblique_ijk_to_ras, atol=1e-4)


# ------------------------------------------------------------------------------- errors
def _assert_one_line_error(rc, stderr, *words):
    assert rc == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    for w in words:
        assert w in lines[0]


def test_missing_input_file(tmp_path, tiny_model_dir, capsys):
    missing = tmp_path / "nope.nii.gz"
    rc, _, err = _run(["denoise", str(missing), "--model", str(tiny_model_dir), "--device", "cpu", "--quiet"],
                      capsys)
    _assert_one_line_error(rc, err, "nope.nii.gz")
    rc, _, err = _run(["synthesize", "--reference", str(missing), "--region", "chest", "--model", str(tiny_model_dir),
                       "--quiet"], capsys)
    _assert_one_line_error(rc, err, "nope.nii.gz")
    assert not list(tmp_path.iterdir())  # nothing written


def test_unknown_region(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "x.nii.gz"
    rc, _, err = _run(["synthesize", "--region", "mars", "--model", str(tiny_model_dir), "--device", "cpu", "--quiet",
                       "--steps", "1", "-o", str(out)], capsys)
    _assert_one_line_error(rc, err, "mars", "chest")
    assert not out.exists()


def test_missing_model_directory(tmp_path, capsys):
    rc, _, err = _run(["synthesize", "--region", "chest", "--model", str(tmp_path / "no_model"), "--device", "cpu",
                       "--quiet", "-o", str(tmp_path / "x.nii.gz")], capsys)
    _assert_one_line_error(rc, err, "no_model")


def _exit_code(argv) -> int:
    """The exit code of a command line, whether argparse exits or main returns."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


def test_bad_arguments_exit_2(capsys):
    assert _exit_code(["synthesize", "--steps", "many"]) == 2
    _assert_one_line_error(2, capsys.readouterr().err, "--steps", "many")
    assert _exit_code(["frobnicate"]) == 2
    _assert_one_line_error(2, capsys.readouterr().err, "frobnicate")


# ------------------------------------------------------------------------------- train, then use
def test_train_then_synthesize(tmp_path, capsys):
    pytest.importorskip("MedDiffFMLib.phantoms")
    run = tmp_path / "run"
    rc, stdout, _ = _run(["train", "--preset", "tiny", "--spacing-range", "4", "8", "--phantoms", "2",
                          "--phantom-family", "miniature", "--phantom-fov", "64", "80", "80", "--steps", "2",
                          "--batch-size", "1", "--out", str(run), "--device", "cpu",
                          "--no-progress"], capsys)
    assert rc == 0
    assert "2 steps" in stdout
    assert (run / "model" / "config.json").is_file() and (run / "model" / "model.safetensors").is_file()
    out = tmp_path / "synthetic.nii.gz"
    rc, stdout, _ = _run(["synthesize", "--model", str(run / "model"), "--region", "abdomen", "--steps", "2",
                          "--spacing", "6", "7", "8", "--device", "cpu", "--quiet", "-o", str(out)], capsys)
    assert rc == 0
    vol = io.read_volume(out)
    assert vol.shape == (16, 16, 16)  # one window of the model by default, at the spacing given
    np.testing.assert_allclose(vol.spacing_kji, [6.0, 7.0, 8.0])
    assert np.isfinite(vol.array).all()

    # and training continues from where it stopped
    rc, stdout, _ = _run(["train", "--preset", "tiny", "--spacing-range", "4", "8", "--phantoms", "2",
                          "--phantom-family", "miniature", "--phantom-fov", "64", "80", "80", "--steps", "3",
                          "--batch-size", "1", "--out", str(run), "--device", "cpu",
                          "--no-progress", "--resume"], capsys)
    assert rc == 0 and "3 steps" in stdout


def test_train_without_data_is_an_error(tmp_path, capsys):
    rc = cli.main(["train", "--preset", "tiny", "--out", str(tmp_path / "x"), "--device", "cpu"])
    _assert_one_line_error(rc, capsys.readouterr().err, "no training data")
    assert not list(tmp_path.iterdir())


def test_task_options_come_from_the_registry():
    """Every task parameter is an option with the registry's help, default and bounds."""
    from MedDiffFMLib.tasks.registry import TASKS

    parsers = _subparsers()
    for name, spec in TASKS.items():
        actions = {a.dest: a for a in _options(parsers[name])}
        for param, ps in spec.params.items():
            action = actions[param]
            assert action.option_strings[0] == "--" + param.replace("_", "-")
            assert action.help.startswith(ps.help), (name, param)
            if ps.maximum is not None and ps.type in (int, float):
                assert f"{ps.maximum:g}" in action.help, (name, param, action.help)
            if ps.length:
                assert action.nargs == ps.length


def test_a_stop_signal_that_native_code_turns_into_another_error_is_reported_as_the_stop(capsys):
    """A weights reader interrupted by SIGHUP raised its own ValueError ("corrupt or
    unreadable"): the run must still say it was interrupted and exit 129, not blame the file."""
    import os
    import signal
    import time

    from MedDiffFMLib.cli import errors

    def reader():
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(5)  # the handler raises at the next bytecode, long before this ends
        except KeyboardInterrupt as e:
            raise ValueError("could not determine the shape of object type 'UntypedStorage'") from e

    with errors.stop_signals():
        with pytest.raises(ValueError) as caught:
            reader()
        code = errors.report(caught.value)
    assert code == 128 + int(signal.SIGHUP)
    assert "interrupted: nothing written" in capsys.readouterr().err
    with errors.stop_signals():  # a fresh run starts without the old signal
        assert errors.report(ValueError("bad spacing")) == errors.EXIT_BAD_INPUT
