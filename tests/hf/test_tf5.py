"""tests/hf/tf5.py's contract: a missing transformers 5.x venv that cannot be made FAILS the tests that need it;
only an unreachable package registry skips them (with pip's reason). Fast: a fake interpreter stands in for pip.

Run: PYTHONPATH=. python -m pytest -q tests/hf/test_tf5.py
"""
import os
import stat

import pytest

from tests.hf import tf5


def _fake_venv(tmp_path, pip_stderr: str):
    """A venv whose python has no transformers and whose pip fails printing pip_stderr."""
    d = tmp_path / "venv"
    (d / "bin").mkdir(parents=True)
    py = d / "bin" / "python"
    (tmp_path / "err.txt").write_text(pip_stderr)
    py.write_text(f"#!/bin/sh\nif [ \"$1\" = -m ]; then cat '{tmp_path / 'err.txt'}' >&2; fi\nexit 1\n")
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    return str(d)


def test_unreachable_registry_skips_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRAIN_TF5_VENV", _fake_venv(tmp_path, (
        "WARNING: Retrying after connection broken by 'NewConnectionError: Failed to establish a new connection: "
        "[Errno -3] Temporary failure in name resolution'\nERROR: No matching distribution found for "
        "transformers<6,>=5\n")))
    with pytest.raises(tf5.RegistryUnreachable, match="registry is unreachable"):
        tf5.tf5_python()
    with pytest.raises(pytest.skip.Exception, match="No matching distribution"):
        tf5.tf5_python_for_test()


def test_other_failures_fail(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRAIN_TF5_VENV", _fake_venv(tmp_path, "ERROR: No matching distribution found for "
                                                                   "transformers<6,>=5\n"))
    with pytest.raises(tf5.Unavailable) as e:
        tf5.tf5_python()
    assert not isinstance(e.value, tf5.RegistryUnreachable) and os.environ["MEGATRAIN_TF5_VENV"] in str(e.value)
    with pytest.raises(pytest.fail.Exception, match="failed: ERROR: No matching distribution"):
        tf5.tf5_python_for_test()
    with pytest.raises(tf5.Unavailable, match="python -m tests.hf.tf5"):
        tf5.tf5_python(create=False)


def test_venv_sees_the_running_interpreters_packages(tmp_path):
    """From inside a user's venv (torch installed there, not in the base interpreter), the 5.x venv must see the
    user's venv's packages: `--system-site-packages` gave it the base interpreter's instead (no torch)."""
    import subprocess
    import sys
    user = tmp_path / "user_venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(user)], check=True, timeout=120)
    user_py = user / "bin" / "python"
    site = subprocess.run([str(user_py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "_mt_only_in_user_venv.py"), "w") as f:  # stands for the user's torch
        f.write("WHERE = 'user venv'\n")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    made = tmp_path / "tf5"
    subprocess.run([str(user_py), "-c", f"import sys; sys.path.insert(0, {repo!r}); from tests.hf import tf5; "
                    f"tf5.create_venv({str(made)!r}, with_pip=False)"], check=True, timeout=120)
    r = subprocess.run([str(made / "bin" / "python"), "-c", "import _mt_only_in_user_venv as m; print(m.WHERE)"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "user venv", r.stderr


def test_cached_venv_missing_a_client_is_completed(tmp_path, monkeypatch):
    """A cached venv that has transformers 5 but not every REQUIREMENT (one made before peft was added) gets pip
    run on it, instead of being returned as ready."""
    d = tmp_path / "venv"
    (d / "bin").mkdir(parents=True)
    py = d / "bin" / "python"
    py.write_text("#!/bin/sh\n"
                  "if [ \"$1\" = -m ]; then echo \"ERROR: pip ran: $*\" >&2; exit 1; fi\n"
                  "case \"$2\" in *importlib.metadata*) echo 'peft>=0.18.1' ;; *) echo 5.1.0 ;; esac\n")
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("MEGATRAIN_TF5_VENV", str(d))
    assert tf5._missing(str(py)) == ["peft>=0.18.1"]
    with pytest.raises(tf5.Unavailable, match="failed: ERROR: pip ran: -m pip install .*peft>=0.18.1"):
        tf5.tf5_python()
    with pytest.raises(tf5.Unavailable, match="lacks peft>=0.18.1"):
        tf5.tf5_python(create=False)
