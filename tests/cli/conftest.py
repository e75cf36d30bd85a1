import pytest

from cli_testing import TINY, run_cli


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One tiny training run (2 epochs) shared by the eval/visualize/resume tests."""
    out = tmp_path_factory.mktemp("run") / "run"
    proc = run_cli("train", *TINY, "--output", out)
    assert proc.returncode == 0, proc.stderr
    return out, proc
