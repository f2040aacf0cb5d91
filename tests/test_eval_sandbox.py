"""llmkit.eval.sandbox: what generated code may not do (loop forever, eat memory, use the network, write
outside its folder, leave processes behind) and the pass@k estimator against its closed form.

Tests with guard=False check that the OS-level layers (network namespace, Landlock) stop a program on their
own; they skip on systems where those layers cannot be applied (SandboxResult.layers says which were on)."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
from fractions import Fraction
from pathlib import Path

import pytest

from llmkit.errors import LlmkitError
from llmkit.eval.sandbox import pass_at_k, run_code


def test_correct_program_passes():
    r = run_code("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n")
    assert (r.passed, r.status, r.detail) == (True, "passed", "")


def test_failing_assert_fails_with_traceback():
    r = run_code("assert 1 + 1 == 3, 'arithmetic'\n")
    assert (r.passed, r.status) == (False, "failed")
    assert "AssertionError: arithmetic" in r.detail


def test_early_exit_is_not_a_pass():
    r = run_code("import os\nos._exit(0)\nassert False\n", guard=False)
    assert (r.passed, r.status) == (False, "failed")


def test_infinite_loop_is_killed():
    r = run_code("while True:\n    pass\n", timeout=2)
    assert (r.passed, r.status) == (False, "timeout")


@pytest.mark.parametrize("guard", [True, False])
def test_ten_gigabytes_are_refused(guard):
    r = run_code("x = bytearray(10 * 1024**3)\nassert len(x) > 0\n", memory_mb=512, guard=guard)
    assert not r.passed and r.status in ("failed", "error")
    assert "MemoryError" in r.detail


@pytest.mark.parametrize("guard", [True, False])
def test_no_connection_reaches_a_local_server(guard):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        port = srv.getsockname()[1]
        r = run_code(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                     "s.sendall(b'hello')\n", timeout=5, guard=guard)
        if not guard and not {"netns", "landlock-net"} & set(r.layers):
            pytest.skip(f"no OS-level network isolation here (layers: {r.layers})")
        assert (r.passed, r.status) == (False, "failed")
        srv.settimeout(0.5)
        with pytest.raises(socket.timeout):
            srv.accept()  # a connection would have been queued by the kernel even without accept()


ESCAPES = {
    "open": "open({t!r}, 'w').write('x')",
    "pathlib": "import pathlib\npathlib.Path({t!r}).write_text('x')",
    "os.open": "import os\nos.close(os.open({t!r}, os.O_WRONLY | os.O_CREAT))",
    "rename": "open('a', 'w').write('x')\nimport os\nos.rename('a', {t!r})",
    "symlink": "import os\nos.symlink({t!r}, 'link')\nopen('link', 'w').write('x')",
    "mkdir": "import os\nos.mkdir({t!r})",
    "_io": "import _io\n_io.FileIO({t!r}, 'w').write(b'x')",
}


@pytest.mark.parametrize("how", sorted(ESCAPES))
def test_nothing_is_written_outside_the_folder(tmp_path, how):
    target = tmp_path / "outside.txt"
    r = run_code(ESCAPES[how].format(t=str(target)) + "\n")
    if how == "_io" and "landlock-fs" not in r.layers:
        pytest.skip("_io.FileIO walks around the in-process guard; only Landlock stops it")
    assert (r.passed, r.status) == (False, "failed")
    assert "PermissionError" in r.detail
    assert not target.exists()


@pytest.mark.parametrize("how", ["open", "rename", "mkdir"])
def test_landlock_alone_stops_writes_outside(tmp_path, how):
    target = tmp_path / "outside.txt"
    r = run_code(ESCAPES[how].format(t=str(target)) + "\n", guard=False)
    if "landlock-fs" not in r.layers:
        pytest.skip(f"Landlock unavailable here (layers: {r.layers})")
    assert (r.passed, r.status) == (False, "failed")
    assert not target.exists()


def test_existing_files_outside_are_not_removed(tmp_path):
    victim = tmp_path / "keep"
    victim.mkdir()
    (victim / "f").write_text("x")
    r = run_code(f"import shutil\nshutil.rmtree({str(victim)!r})\n")
    assert not r.passed
    assert (victim / "f").read_text() == "x"


def test_folder_home_tmpdir_environment(monkeypatch):
    monkeypatch.setenv("LLMKIT_TEST_SECRET", "s3cret")
    r = run_code("import os, tempfile, json, sys\n"
                 "open('scratch.txt', 'w').write('inside is fine')\n"
                 "print(json.dumps([os.getcwd(), os.environ['HOME'], tempfile.gettempdir(),"
                 " sorted(os.environ), sys.stdin.read()]))\nraise SystemExit(1)\n")
    assert r.status == "failed"
    cwd, home, tmp, env, stdin = json.loads(r.detail.splitlines()[0])
    assert cwd == home == tmp and "llmkit-sandbox-" in cwd
    assert not Path(cwd).exists()  # removed afterwards
    assert "LLMKIT_TEST_SECRET" not in env and stdin == ""


def _gone(pid: int, wait: float = 5.0) -> bool:
    """The process no longer runs (absent, or a zombie waiting for its new parent to reap it)."""
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


FORKER = """import os, time
pid = os.fork()
if pid == 0:
    time.sleep(60)
    os._exit(0)
print("GRANDCHILD", pid, flush=True)
{rest}
"""


@pytest.mark.parametrize("rest,status", [("time.sleep(60)", "timeout"), ("raise SystemExit(3)", "failed")])
def test_forked_grandchild_is_killed_with_the_group(rest, status):
    # on timeout, and when the program ends while its child still sleeps; guard=False: the guard refuses fork
    r = run_code(FORKER.format(rest=rest), timeout=2, guard=False)
    assert r.status == status
    m = re.search(r"GRANDCHILD (\d+)", r.detail)
    assert m, r.detail
    assert _gone(int(m.group(1)))


def test_guard_refuses_fork_and_subprocess():
    for prog in ("import os\nos.fork()\n", "import subprocess\nsubprocess.run(['true'])\n",
                 "import os\nos.system('true')\n"):
        r = run_code(prog)
        assert r.status == "failed" and "TypeError" in r.detail, (prog, r)


def test_bad_arguments():
    with pytest.raises(LlmkitError):
        run_code("pass", timeout=0)
    with pytest.raises(LlmkitError):
        run_code("pass", memory_mb=1)


# ------------------------------------------------------------------------------------------------ pass@k
@pytest.mark.parametrize("n,c,k,want", [
    (10, 3, 1, 0.3),  # pass@1 = c / n
    (10, 0, 5, 0.0),
    (5, 5, 1, 1.0),
    (10, 3, 8, 1.0),  # fewer than k failures: every k-subset holds a pass
    (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
])
def test_pass_at_k_hand_computed(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(200, 10, 100), (200, 1, 1), (200, 37, 10), (64, 5, 32), (1000, 3, 500)])
def test_pass_at_k_closed_form(n, c, k):
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in ((5, 6, 1), (5, 1, 6), (5, 1, 0), (5, -1, 1)):
        with pytest.raises(LlmkitError):
            pass_at_k(n, c, k)


def test_folders_are_removed_after_a_timeout_or_a_pass():
    r = run_code("import os\nopen('x', 'w').write('y' * 1000)\nprint('CWD', os.getcwd(), flush=True)\n"
                 "while True:\n    pass\n", timeout=1)
    assert r.status == "timeout"
    cwd = re.search(r"CWD (\S+)", r.detail).group(1)
    assert "llmkit-sandbox-" in cwd and not Path(cwd).exists()
    marker = f"llmkit-sandbox-probe-{os.getpid()}"
    r = run_code(f"import os\nopen({marker!r}, 'w').write('x')\n")
    assert r.passed
    assert not any(Path(t).exists() for t in Path(cwd).parent.glob(f"llmkit-sandbox-*/work/{marker}"))
