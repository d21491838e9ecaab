"""``import ist_accel`` and ``ist-accel --help`` load no heavy framework (issue 18).

Each check runs in a fresh interpreter: in this process pytest and other tests have
already imported torch, transformers and friends.
"""

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("deepspeed", "transformers", "accelerate", "torch")


def _fresh(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    return json.loads(_fresh(probe).splitlines()[-1])


def test_import_loads_no_framework():
    assert _loaded_after("import ist_accel") == []


def test_cli_help_loads_no_framework():
    code = ("import contextlib, io\nfrom ist_accel.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['--help'])")
    assert _loaded_after(code) == []


def test_import_time_under_two_seconds():
    """``python -X importtime``: the package's own cumulative import time (measured 5 ms;
    1.9 s when it imported everything eagerly, nearly all of it torch)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import ist_accel"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line.split("|") for line in out.stderr.splitlines() if line.startswith("import time:")]
    cumulative = {r[2].strip(): int(r[1]) for r in rows[1:]}  # rows[0] is the header
    assert cumulative["ist_accel"] < 2_000_000, cumulative["ist_accel"]


def test_public_names_load_on_use():
    """``from ist_accel import X`` imports X's own submodule; the Trainer names are exported."""
    code = "from ist_accel import ISTCallback, ISTAccelerator, ISTTrainer, ISTSeq2SeqTrainer"
    assert {"transformers", "accelerate", "torch"} <= set(_loaded_after(code))
    assert _loaded_after("from ist_accel import ISTConfig") == []


def test_every_public_name_resolves_and_is_listed():
    import ist_accel
    from ist_accel.trainer import ISTCallback

    assert sorted(ist_accel.__all__) == sorted(ist_accel._EXPORTS)
    for name in ist_accel.__all__:
        assert getattr(ist_accel, name) is not None, name
    assert set(ist_accel.__all__) <= set(dir(ist_accel))
    assert ist_accel.ISTCallback is ISTCallback
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ist_accel.nope  # noqa: B018


def test_decompose_stays_the_function_after_its_subpackage_loads():
    """``ist_accel.decompose`` is the public function; loading the subpackage that defines
    it (``ist_accel.decompositions``, named differently so that it cannot shadow the
    function) must not replace it with a module."""
    code = ("import ist_accel\nimport ist_accel.decompositions.base\nfrom ist_accel import decompose\n"
            "import inspect\nprint(inspect.isfunction(decompose), inspect.isfunction(ist_accel.decompose))")
    assert _fresh(code).split() == ["True", "True"]
