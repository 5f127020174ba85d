"""Running the ``workbench`` command in-process from tests, and checking its bad-input contract."""

from workbench.cli import main


def run_cli(capsys, *argv):
    """``(exit code, stdout, stderr)`` of ``workbench ARGV``."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expect_bad_input(capsys, *argv, words=()):
    """Exit code 2 with exactly one error line and one hint, no traceback, naming every word; returns stderr."""
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (code, err)
    lines = err.splitlines()
    assert sum(line.startswith("error: ") for line in lines) == 1, err
    assert sum(line.strip().startswith("hint: ") for line in lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    return err
