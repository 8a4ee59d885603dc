"""The Flower quick-start without the optional extra installed: one line naming the
requirements file, not a traceback. (tests/test_flower.py runs the app when flwr is there.)"""

import sys

import pytest

from fslora_flower.local import main


def test_the_quick_start_without_flwr_names_the_requirements_file(monkeypatch, capsys, tmp_path):
    for name in ["flwr", *(m for m in sys.modules if m.startswith("flwr."))]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "fslora_flower.config", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["--work", str(tmp_path / "work")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("flwr is not installed: Flower is an optional extra; from the "
                        "repository root: pip install -r requirements-flower.txt"), err
    assert not (tmp_path / "work").exists()
