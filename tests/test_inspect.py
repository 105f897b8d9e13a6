"""`ntkcl inspect` and `ntkcl reduce` on good, live, broken and diverged archives."""

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import xarray as xr
from test_archive import _dump, _make
from test_train import tiny_run

from ntkcl import archive, cli, data, train

REPO = Path(__file__).resolve().parents[1]


def inspect(capsys, *args):
    """Run `ntkcl inspect`; its exit status, stdout and stderr."""
    status = cli.main(["inspect", *map(str, args)])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_inspect_summarises_checks_and_gives_a_spectrum(tmp_path, capsys):
    path = _make(tmp_path / "a.h5", "full")
    archive.finish(path)
    status, out, err = inspect(capsys, path, "--step", 10)
    assert status == 0, err
    assert "run: w8-fl-s0 (experiment x)" in out
    assert "status: complete" in out
    assert "dumps: 3, iterations 0 to 20" in out
    assert "switches: 20" in out
    assert "kernel: full float64 (3, 4, 4, 3, 3)" in out
    assert "problems: none" in out
    assert "spectrum at: iteration 10 (dump 1), 12 x 12" in out

    status, out, _ = inspect(capsys, path, "--json", "--step", 20)
    info = json.loads(out)
    assert info["complete"] and info["dumps"] == 3 and info["iterations"] == [0, 20]
    assert info["kernel"]["shape"] == [3, 4, 4, 3, 3]
    assert info["tasks"][1]["start"] == 20 and info["switches"] == [20]
    assert info["size_bytes"] == path.stat().st_size
    # the kernel of dump 2 is 2 everywhere: rank 1, eigenvalue 2 * 12
    assert info["spectrum"]["top_eigenvalues"][0] == pytest.approx(24.0)
    assert info["spectrum"]["trace"] == pytest.approx(24.0)
    assert info["spectrum"]["condition_number"] is None

    status, out, err = inspect(capsys, path, "--step", 15)
    assert status == 2 and "no dump at iteration 15; nearest: [0, 10, 20]" in err


def test_validate_names_each_problem(tmp_path, capsys):
    path = _make(tmp_path / "a.h5", "trace")
    status, out, _ = inspect(capsys, path, "--validate")
    assert status == 0 and out.strip() == f"{path}: valid (3 dumps checked)"
    with h5py.File(path, "r+") as f:
        f["step"][2] = 5  # iterations 0, 10, 5
        f["ntk"][1, 0, 1] = 7.0  # asymmetric
        f["ntk"][2, 0, 0] = np.nan
        f["accuracy"][0, 0] = 1.5
        f.attrs["config_json"] = "{not json"
    status, out, err = inspect(capsys, path, "--validate")
    assert status == 1
    lines = out.splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines)
    text = "\n".join(lines)
    assert "iterations are not increasing: dump 2 is iteration 5 after 10" in text
    assert "dump 1 (iteration 10): ntk is not symmetric" in text
    assert "dump 2 (iteration 5): ntk has 1 non-finite values" in text
    assert "accuracy has values outside [0, 1]" in text
    assert "the config_json attribute (the run's configuration) is not a JSON" in text
    assert f"5 problem(s) in {path}" in err


def _flip_a_byte(path, name, index):
    """Damage chunk ``index`` of variable ``name`` in place."""
    with h5py.File(path, "r") as f:
        assert f[name].fletcher32
        chunk = f[name].id.get_chunk_info(index)
    with open(path, "r+b") as f:
        f.seek(chunk.byte_offset + chunk.size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_every_variable_has_checksums(tmp_path):
    path = _make(tmp_path / "a.h5", "trace")
    with h5py.File(path, "r") as f:
        unchecked = [n for n, v in f.items() if not getattr(v, "fletcher32", True)]
    assert not unchecked


@pytest.mark.parametrize(
    "name, chunk, expected",
    [
        ("logits", 2, "logits cannot be read at dump(s) [2]"),
        ("probe_label", 0, "probe_label cannot be read"),
        ("active_task", 0, "active_task cannot be read at dump(s)"),
    ],
)
def test_a_damaged_chunk_of_any_variable_is_named(
    tmp_path, capsys, name, chunk, expected
):
    path = _make(tmp_path / "a.h5", "trace")
    archive.finish(path)
    _flip_a_byte(path, name, chunk)
    for args in (["--validate"], []):  # the summary gives way to the problems
        status, out, err = inspect(capsys, path, *args)
        assert status == 1 and expected in out, err


def test_a_damaged_chunk_is_named_and_the_rest_still_read(tmp_path, capsys):
    path = _make(tmp_path / "a.h5", "trace")
    archive.finish(path)
    _flip_a_byte(path, "ntk", 1)  # dump 1's kernel

    status, out, err = inspect(capsys, path, "--step", 10)
    assert status == 1, err
    assert "dump 1 (iteration 10): ntk cannot be read" in out
    assert "a damaged chunk" in out
    assert "dumps: 3, iterations 0 to 20" in out  # the summary is still there
    assert "spectrum at: unreadable dump (see problems)" in out
    status, out, _ = inspect(capsys, path, "--validate")
    assert status == 1 and "dump 1 (iteration 10): ntk cannot be read" in out
    assert "dump 0" not in out and "dump 2" not in out

    status = cli.main(["reduce", str(path), "-o", str(tmp_path / "m.nc")])
    err = capsys.readouterr().err
    assert status == 2 and "a damaged chunk" in err and f"ntkcl inspect {path}" in err


def test_inspect_usage_errors(tmp_path, capsys):
    path = _make(tmp_path / "a.h5", "trace")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["inspect", str(path), "--validate", "--step", "10"])
    assert exit_info.value.code == 2
    assert "use one of them" in capsys.readouterr().err
    status, _, err = inspect(capsys, tmp_path)
    assert status == 2 and "is a folder; give one archive file" in err


def test_inspect_sees_the_dumps_of_a_run_being_written(tmp_path):
    """A reader in another process, while this one appends (HDF5 SWMR)."""
    path = _make(tmp_path / "live.h5", dumps=0)
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom ntkcl import cli\nfor _ in sys.stdin:\n"
            "    cli.main(['inspect', '--json', sys.argv[1]])\n"
            "    print('END', flush=True)\n",
            str(path),
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def read():
        reader.stdin.write("go\n")
        reader.stdin.flush()
        lines = iter(reader.stdout.readline, "END\n")
        return json.loads("".join(lines))

    writer = archive.Writer(path)
    try:
        for i in range(2):
            writer.append(**_dump(i))
            info = read()
            assert info["status"] == "running" and not info["complete"]
            assert info["dumps"] == i + 1 and info["iterations"] == [0, 10 * i]
            assert info["problems"] == []
        # half a dump on disk: the reader counts whole dumps only
        for name in archive.STEP_VARIABLES[:4]:
            writer._file[name].resize(3, axis=0)
        writer._file.flush()
        assert read()["dumps"] == 2
    finally:
        writer.close()
        reader.stdin.close()
        assert reader.wait(timeout=60) == 0
        reader.stdout.close()


def _broken_archives(folder: Path) -> dict[str, tuple[Path, str]]:
    """Broken files by name, each with the problem its error must name."""
    good = _make(folder / "good.h5")
    archive.finish(good)
    cases = {}
    path = folder / "truncated.h5"
    path.write_bytes(good.read_bytes()[:30000])
    cases["truncated"] = (path, "truncated: the file has 30000 bytes")
    path = _make(folder / "missing.h5")
    with h5py.File(path, "r+") as f:
        del f["logits"]
    cases["missing"] = (path, "missing variable(s) ['logits']")
    path = _make(folder / "extra.h5")
    with h5py.File(path, "r+") as f:
        f["extra"] = np.zeros(2)
    cases["extra"] = (path, "unexpected variable(s) ['extra']")
    path = _make(folder / "newer.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = archive.FORMAT_VERSION + 1
    cases["newer"] = (path, f"format version {archive.FORMAT_VERSION + 1} is newer")
    path = _make(folder / "nan.h5")
    with h5py.File(path, "r+") as f:
        f["ntk"][1] = np.nan
    cases["nan"] = (path, "dump 1 (iteration 10)")
    path = folder / "notes.txt"
    path.write_text("not an archive\n")
    cases["not hdf5"] = (path, "not an HDF5 file")
    return cases


@pytest.fixture
def restore_logging():
    logger = logging.getLogger("ntkcl")
    handlers, level = logger.handlers[:], logger.level
    yield
    for handler in logger.handlers:
        handler.close()
    logger.handlers[:], logger.level = handlers, level
    logging.captureWarnings(False)


def test_broken_archives_give_one_clear_error(tmp_path, capsys, restore_logging):
    for name, (path, problem) in _broken_archives(tmp_path).items():
        # ntkcl reduce
        status = cli.main(["reduce", str(path), "-o", str(tmp_path / "m.nc")])
        err = capsys.readouterr().err
        assert status == 2, name
        assert f"ntkcl reduce: error: {path}: " in err and problem in err, err
        assert "Traceback" not in err

        # ntkcl inspect: unreadable (2), or readable with problems (1)
        status, out, err = inspect(capsys, path)
        assert status == (1 if name == "nan" else 2), name
        assert str(path) in out + err and problem in out + err, out + err
        assert "Traceback" not in err

        # the Snakemake reduce rule
        log = tmp_path / f"{name}.log"
        smk = SimpleNamespace(
            rule="reduce",
            log=[str(log)],
            threads=1,
            input=SimpleNamespace(archive=str(path)),
            output=[str(tmp_path / "m.nc")],
        )
        with pytest.raises(SystemExit) as exit_info:
            cli.run_rule(smk)
        assert str(path) in str(exit_info.value) and problem in str(exit_info.value)
        assert problem in log.read_text() and "Traceback" not in log.read_text()
    assert not (tmp_path / "m.nc").exists()


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    """A run with a learning rate far too high: the loss becomes NaN."""
    folder = tmp_path_factory.mktemp("diverged")
    digits = folder / "digits.h5"
    data.prepare({"name": "digits", "test_fraction": 0.2}, digits)
    run = tiny_run(
        optim={"lr": 100.0},
        model={"activation": "gelu", "width": 32},
        ntk={"kind": "trace"},
    )
    assert train.train_run(run, digits, folder / "run.h5", folder / "w") == "diverged"
    return folder / "run.h5"


def test_a_diverged_run_shows_in_reduce_and_inspect(diverged, capsys, tmp_path):
    status, out, err = inspect(capsys, diverged)
    assert status == 0, out + err
    assert "status: diverged at iteration 7: training loss became nan" in out
    assert "dumps: 2, iterations 0 to 5 of 19" in out

    assert cli.main(["reduce", str(diverged), "-o", str(tmp_path / "m.nc")]) == 0
    metrics = xr.load_dataset(tmp_path / "m.nc", engine="h5netcdf")
    assert metrics.attrs["status"] == "diverged"
    assert metrics.attrs["diverged_iteration"] == 7
    assert list(metrics["step"].values) == [0, 5]
