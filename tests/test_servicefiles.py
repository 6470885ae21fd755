"""The systemd unit and launchd plist: their content, validity per the real tools, and the CLI."""

from __future__ import annotations

import io
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from paiv_sync.servicefiles import (
    example_files,
    find_executable,
    render_launchd,
    render_systemd,
    service_command,
)

REPO = Path(__file__).resolve().parent.parent
CONFIG = Path("/etc/paiv-sync/configuration.json")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"
)


def _directives(unit: str) -> dict[str, list[str]]:
    """``Section.Key`` → values, in order, of a unit file; comments left out."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in unit.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key}", []).append(value)
    return found


def _stub_executable(folder: Path) -> Path:
    """A real executable file, for systemd-analyze verify to find."""
    folder.mkdir(parents=True, exist_ok=True)
    stub = folder / "paiv-sync"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return stub


def _verify(unit_file: Path) -> str:
    """Run ``systemd-analyze verify``; return its complaints about this unit (empty if none)."""
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Warnings (an unknown key, a bad value) leave the exit status at 0 but name the file.
    complaints = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if unit_file.name in line or "paiv-sync" in line
    ]
    if result.returncode != 0:
        complaints.append(f"exit status {result.returncode}: {result.stderr.strip()}")
    return "\n".join(complaints)


# -- the systemd unit --------------------------------------------------------------------------


def test_unit_runs_paiv_sync_as_a_notify_service() -> None:
    d = _directives(render_systemd(executable="/opt/paiv-sync/bin/paiv-sync", config_path=CONFIG))
    assert d["Service.Type"] == ["notify"]
    assert d["Service.NotifyAccess"] == ["main"]
    assert d["Service.ExecStart"] == [
        "/opt/paiv-sync/bin/paiv-sync --config /etc/paiv-sync/configuration.json"
    ]
    assert d["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["Service.WatchdogSec"] == ["60"]
    assert d["Service.Restart"] == ["on-failure"]
    assert int(d["Service.RestartSec"][0]) > 0
    assert d["Service.TimeoutStopSec"] == ["30"]
    assert d["Service.StateDirectory"] == ["paiv-sync"]
    assert d["Service.User"] == ["paiv-sync"]
    assert d["Service.UMask"] == ["0077"]
    assert d["Install.WantedBy"] == ["multi-user.target"]
    assert "network-online.target" in d["Unit.After"][0]


def test_unit_is_hardened_but_keeps_folders_and_network_reachable() -> None:
    d = _directives(render_systemd(executable="/usr/local/bin/paiv-sync", config_path=CONFIG))
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "read-only",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }
    for key, value in expected.items():
        assert d[f"Service.{key}"] == [value], key
    assert "@system-service" in d["Service.SystemCallFilter"]
    # Nothing may hide or block the places watched folders live in.
    for key in ("InaccessiblePaths", "TemporaryFileSystem", "PrivateNetwork", "DynamicUser"):
        assert f"Service.{key}" not in d, key


def test_unit_shows_how_to_load_a_credential() -> None:
    unit = render_systemd(executable="/usr/local/bin/paiv-sync", config_path=CONFIG)
    assert "#LoadCredential=password:/etc/paiv-sync/password" in unit
    assert "Service.LoadCredential" not in _directives(unit)


def test_template_unit_takes_the_configuration_from_the_instance_name() -> None:
    unit = render_systemd(executable="/usr/local/bin/paiv-sync", config_path=CONFIG, instance=True)
    d = _directives(unit)
    assert d["Service.ExecStart"] == ["/usr/local/bin/paiv-sync --config /etc/paiv-sync/%i.json"]
    assert "%i" in d["Unit.Description"][0]


def test_a_python_module_command_becomes_several_words() -> None:
    unit = render_systemd(executable="/opt/venv/bin/python -m paiv_sync", config_path=CONFIG)
    assert _directives(unit)["Service.ExecStart"] == [
        "/opt/venv/bin/python -m paiv_sync --config /etc/paiv-sync/configuration.json"
    ]


@pytest.mark.parametrize(
    ("executable", "config"),
    [
        ("paiv-sync", CONFIG),
        ("", CONFIG),
        ("/usr/local/bin/paiv-sync", Path("configuration.json")),
        ("/usr/local/bin/paiv-sync", Path("/etc/paiv-sync/a\nExecStartPre=/bin/true")),
        ("'/usr/local/bin/paiv-sync", CONFIG),
    ],
)
def test_unusable_paths_are_refused(executable: str, config: Path) -> None:
    with pytest.raises(ValueError):
        render_systemd(executable=executable, config_path=config)
    with pytest.raises(ValueError):
        render_launchd(executable=executable, config_path=config)


@needs_systemd_analyze
@pytest.mark.parametrize("instance", [False, True], ids=["unit", "template"])
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path, instance: bool) -> None:
    stub = _stub_executable(tmp_path / "bin")
    unit = render_systemd(executable=str(stub), config_path=CONFIG, instance=instance)
    name = "paiv-sync@.service" if instance else "paiv-sync.service"
    (tmp_path / name).write_text(unit)
    # A template is verified through one of its instances.
    target = tmp_path / ("paiv-sync@cameras.service" if instance else name)
    if instance:
        target.symlink_to(tmp_path / name)
    assert _verify(target) == ""


@needs_systemd_analyze
def test_systemd_analyze_verify_sees_a_missing_executable(tmp_path: Path) -> None:
    # The check above can fail: verify does complain about what it finds wrong.
    unit_file = tmp_path / "paiv-sync.service"
    unit_file.write_text(
        render_systemd(executable=str(tmp_path / "nowhere" / "paiv-sync"), config_path=CONFIG)
    )
    assert "nowhere" in _verify(unit_file)


@needs_systemd_analyze
def test_paths_with_blanks_percent_and_dollar_reach_systemd_intact(tmp_path: Path) -> None:
    # systemd expands %-specifiers (and, in arguments, $VARIABLES) in ExecStart and splits at
    # blanks; the stub is only found (verify passes) when its path arrives unchanged.
    stub = _stub_executable(tmp_path / "my apps" / "100% $HOME")
    config = tmp_path / "conf dir" / "a$b%c.json"
    unit_file = tmp_path / "paiv-sync.service"
    # The command is given as shell words (what find_executable returns), hence the quoting.
    unit_file.write_text(render_systemd(executable=shlex.quote(str(stub)), config_path=config))
    assert _verify(unit_file) == ""
    exec_start = _directives(unit_file.read_text())["Service.ExecStart"][0]
    program, _, arguments = exec_start.partition('" ')
    assert program.startswith('"') and program.endswith("100%% $HOME/paiv-sync")
    assert arguments.endswith('a$$b%%c.json"')


@needs_systemd_analyze
def test_systemd_analyze_security_rates_the_unit_ok(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    help_text = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    if "--offline" not in help_text:
        pytest.skip("this systemd-analyze has no security --offline (systemd < 250)")
    stub = _stub_executable(tmp_path / "bin")
    unit_file = tmp_path / "paiv-sync.service"
    unit_file.write_text(render_systemd(executable=str(stub), config_path=CONFIG))
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    # The brief asks for "OK" or better (≤ 4.9); it is 1.3 with systemd 252. A bound this low
    # catches a hardening line lost by accident.
    assert float(match.group(1)) <= 2.5, result.stdout
    assert match.group(2) in {"OK", "SAFE"}, result.stdout


# -- the launchd plist -------------------------------------------------------------------------


def _plist(text: str) -> dict[str, Any]:
    job = plistlib.loads(text.encode())
    assert isinstance(job, dict)
    return job


def test_plist_describes_a_restarting_background_agent(tmp_path: Path) -> None:
    text = render_launchd(
        executable="/Users/ann/paiv-sync/bin/paiv-sync",
        config_path=Path("/Users/ann/paiv-sync/configuration.json"),
        log_dir=tmp_path / "logs",
    )
    job = _plist(text)
    assert job["Label"] == "org.paiv-sync.agent"
    assert job["ProgramArguments"] == [
        "/Users/ann/paiv-sync/bin/paiv-sync",
        "--config",
        "/Users/ann/paiv-sync/configuration.json",
    ]
    assert job["RunAtLoad"] is True
    assert job["KeepAlive"] == {"SuccessfulExit": False}
    assert job["ThrottleInterval"] > 0
    assert job["ProcessType"] == "Background"
    assert job["StandardErrorPath"] == str(tmp_path / "logs" / "org.paiv-sync.agent.log")
    assert job["StandardOutPath"] == job["StandardErrorPath"]
    # Round trip: what plistlib writes from the parsed job parses to the same job.
    assert plistlib.loads(plistlib.dumps(job)) == job


def test_plist_logs_under_library_logs_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/Users/ann")
    job = _plist(render_launchd(executable="/usr/local/bin/paiv-sync", config_path=CONFIG))
    assert job["StandardErrorPath"] == "/Users/ann/Library/Logs/paiv-sync/org.paiv-sync.agent.log"


def test_plist_label_and_module_command() -> None:
    job = _plist(
        render_launchd(
            executable="'/Users/ann/my env/bin/python' -m paiv_sync",
            config_path=Path("/Users/ann/cams & more.json"),
            label="com.example.cams",
            log_dir=Path("/tmp/logs"),
        )
    )
    assert job["Label"] == "com.example.cams"
    assert job["ProgramArguments"] == [
        "/Users/ann/my env/bin/python",
        "-m",
        "paiv_sync",
        "--config",
        "/Users/ann/cams & more.json",
    ]
    assert job["StandardErrorPath"] == "/tmp/logs/com.example.cams.log"


def test_plist_without_a_label_is_refused() -> None:
    with pytest.raises(ValueError):
        render_launchd(executable="/usr/local/bin/paiv-sync", config_path=CONFIG, label=" ")


def test_plist_stays_valid_when_a_path_would_break_its_comment() -> None:
    text = render_launchd(
        executable="/usr/local/bin/paiv-sync", config_path=CONFIG, log_dir=Path("/tmp/a--b")
    )
    assert _plist(text)["StandardErrorPath"] == "/tmp/a--b/org.paiv-sync.agent.log"


@pytest.mark.skipif(shutil.which("plutil") is None, reason="plutil (macOS) is not installed")
def test_plutil_lint_accepts_the_plist(tmp_path: Path) -> None:
    plist = tmp_path / "org.paiv-sync.agent.plist"
    plist.write_text(render_launchd(executable="/usr/local/bin/paiv-sync", config_path=CONFIG))
    result = subprocess.run(
        ["plutil", "-lint", str(plist)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- the files in the repository ---------------------------------------------------------------


def test_service_files_in_the_repository_are_what_the_renderer_makes() -> None:
    folder = REPO / "service-files"
    expected = example_files()
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)
    for name, text in expected.items():
        assert (folder / name).read_text() == text, (
            f"service-files/{name} is out of step with paiv_sync/servicefiles.py; "
            "regenerate it as example_files() describes"
        )


# -- finding the executable --------------------------------------------------------------------


def test_find_executable_resolves_the_console_script_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = _stub_executable(tmp_path / "venv" / "bin")
    linked = tmp_path / "usr-local-bin"
    linked.mkdir()
    (linked / "paiv-sync").symlink_to(real)
    monkeypatch.setenv("PATH", str(linked))
    assert find_executable() == str(real.resolve())


def test_find_executable_quotes_a_path_with_blanks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = _stub_executable(tmp_path / "Application Support" / "bin")
    monkeypatch.setenv("PATH", str(real.parent))
    found = find_executable()
    assert found == f"'{real.resolve()}'"
    # ... and the renderers take it back apart into the one path.
    job = _plist(render_launchd(executable=found, config_path=CONFIG))
    assert job["ProgramArguments"][0] == str(real.resolve())


def test_find_executable_falls_back_to_the_running_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _stub_executable(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(sys, "argv", [str(script), "service", "systemd"])
    assert find_executable() == str(script.resolve())


def test_find_executable_falls_back_to_this_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    # Under pytest, argv[0] is pytest, not paiv-sync: it must not be taken.
    monkeypatch.setattr(sys, "argv", [str(_stub_executable(tmp_path / "bin").parent / "pytest")])
    found = find_executable()
    assert found.endswith(" -m paiv_sync")
    # The interpreter path is kept as it is (a venv's python is a symlink out of the venv).
    python = found.removesuffix(" -m paiv_sync").strip("'")
    assert python == str(Path(sys.executable).absolute())
    result = subprocess.run(
        [python, "-m", "paiv_sync", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and "paiv-sync" in result.stdout


# -- the `service` command ---------------------------------------------------------------------


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A paiv-sync on PATH and a configuration file; returns the executable's path."""
    stub = _stub_executable(tmp_path / "venv" / "bin")
    monkeypatch.setenv("PATH", str(stub.parent))
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "configuration.json").write_text("{}")
    return stub


def test_service_systemd_prints_a_unit_for_this_installation(
    installed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    assert service_command("systemd", Path("etc/../etc/configuration.json"), out=out) == 0
    config = tmp_path / "etc" / "configuration.json"
    exec_start = _directives(out.getvalue())["Service.ExecStart"]
    assert exec_start == [f"{installed.resolve()} --config {config}"]


def test_service_launchd_prints_a_plist_for_this_installation(
    installed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path / "etc")
    out = io.StringIO()
    assert service_command("launchd", Path("configuration.json"), out=out) == 0
    job = _plist(out.getvalue())
    config = tmp_path / "etc" / "configuration.json"
    assert job["ProgramArguments"] == [str(installed.resolve()), "--config", str(config)]


@pytest.mark.parametrize(
    ("kind", "config_name", "message"),
    [
        ("upstart", "etc/configuration.json", "unknown service manager 'upstart'"),
        ("systemd", "etc/missing.json", "does not exist"),
        ("launchd", "etc", "not a file"),
    ],
)
def test_service_command_refuses_bad_input(
    installed: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kind: str,
    config_name: str,
    message: str,
) -> None:
    out = io.StringIO()
    assert service_command(kind, tmp_path / config_name, out=out) == 2
    assert out.getvalue() == ""
    assert message in capsys.readouterr().err


# -- what MemoryDenyWriteExecute=yes means for the code ------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_paiv_sync_runs_without_writable_executable_memory(tmp_path: Path) -> None:
    """The unit sets MemoryDenyWriteExecute=yes: what paiv-sync uses must work under it.

    Linux 6.3+ offers the same rule to any process (prctl PR_SET_MDWE); the child applies it to
    itself, then imports everything, watches a folder with inotify, writes a WAL SQLite
    database, hashes and sets up TLS.
    """
    script = textwrap.dedent(
        """
        import ctypes, mmap, sys
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
            print("unsupported"); sys.exit(0)
        try:
            mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        except OSError:
            pass
        else:
            print("not enforced"); sys.exit(0)
        import hashlib, queue, sqlite3, ssl, pathlib
        import paiv_sync.cli, paiv_sync.service, paiv_sync.sdnotify
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers.inotify import InotifyObserver
        folder = pathlib.Path(sys.argv[1])
        seen = queue.Queue()
        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                seen.put(event.src_path)
        observer = InotifyObserver()
        observer.schedule(Handler(), str(folder))
        observer.start()
        try:
            (folder / "a.jpg").write_bytes(b"x")
            seen.get(timeout=10)
        finally:
            observer.stop()
            observer.join(10)
        db = sqlite3.connect(str(folder / "ledger.sqlite3"))
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (x)")
        db.commit()
        db.close()
        hashlib.sha256(b"x").hexdigest()
        ssl.create_default_context()
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    if result.stdout.strip() in {"unsupported", "not enforced"}:
        pytest.skip(f"PR_SET_MDWE: {result.stdout.strip()} on this kernel")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
