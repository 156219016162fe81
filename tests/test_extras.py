"""A missing optional extra is named, with the install command, instead of a bare ModuleNotFoundError."""

import importlib.util

import pytest

import fedsrd_kernels as fk
from fedsrd_kernels.__main__ import main
from fedsrd_kernels.extras import EXTRA_MODULES, require_extra


def _without(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def test_run_without_the_runner_extra_names_it(monkeypatch, capsys):
    _without(monkeypatch, "peft")
    assert main(["run", "--model", "tiny", "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert "fedsrd run needs the 'runner' extra" in err and "pip install 'fedsrd_kernels[runner]'" in err
    assert "missing: peft" in err


def test_require_extra_is_an_import_error_of_the_package(monkeypatch):
    _without(monkeypatch, *EXTRA_MODULES["flower"])
    with pytest.raises(fk.MissingExtraError, match=r"'flower' extra.*missing: flwr") as info:
        require_extra("flower", "the Flower app")
    assert isinstance(info.value, ImportError) and isinstance(info.value, fk.FedSRDError)
    require_extra("runner", "the runner")  # installed here: no error


def test_a_missing_data_file_is_one_line_not_a_traceback(tmp_path, capsys):
    assert main(["run", "--model", "tiny", "--domains", "", "--jsonl", f"mine={tmp_path / 'none.jsonl'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedsrd: ") and "none.jsonl" in err and "Traceback" not in err
