"""The ``credentials`` section: the server's URL, the secret and how it is found, TLS.

Secrets are looked up in this order, the first one found wins: the environment
(``PAIV_PASSWORD`` / ``PAIV_API_KEY``), a systemd credential (``$CREDENTIALS_DIRECTORY/password``
/ ``api_key``), a file named by ``credentials.password_file`` / ``api_key_file``, and last the
plain value in the configuration file. No message ever contains a password or an API key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from paiv_sync.configread import (
    MISSING,
    PLACEHOLDER,
    Section,
    expand,
    kind_of,
    read_number,
    read_string,
    shown,
)

# Environment variables and systemd credential names for the two kinds of secret.
PASSWORD_ENV: Final = "PAIV_PASSWORD"
API_KEY_ENV: Final = "PAIV_API_KEY"


class _UrlError(ValueError):
    """A problem with the endpoint; ``key`` says which credentials key it concerns."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def normalize_base_url(endpoint: str, port: str | int | None) -> str:
    """Turn the configured endpoint (and optional port) into one API base URL.

    The result has the scheme, host, optional port and context root, ends in ``/api`` and
    has no trailing slash, no doubled slash and no doubled ``/api``:
    ``("https://host/powerai-vision", 8000)`` → ``"https://host:8000/powerai-vision/api"``.

    Raises ValueError with a sentence a user can act on: no or unsupported scheme, no host,
    a user name, password, query or fragment in the URL, a bad port, or a port in the
    endpoint that differs from ``port``. The message never repeats a user name or password
    found in the URL.
    """
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise _UrlError("endpoint", "the endpoint must be a non-empty URL such as https://host/api")
    text = endpoint.strip()
    # Look for credentials in the URL before any message repeats the URL.
    authority = text.split("://", 1)[1] if "://" in text else text
    if "@" in authority.split("/", 1)[0]:
        raise _UrlError(
            "endpoint",
            "the endpoint must not contain a user name or password; "
            "put them in credentials.username and credentials.password",
        )
    if "<" in text or ">" in text:
        # Before the scheme check: "<url>" has none, but what it lacks is a real URL.
        raise _UrlError(
            "endpoint", f'the endpoint "{text}" still holds a template placeholder; give the URL'
        )
    if "?" in text or "#" in text:
        raise _UrlError("endpoint", "the endpoint must not contain a query (?…) or fragment (#…)")
    if "://" not in text:
        raise _UrlError(
            "endpoint",
            f'the endpoint "{text}" has no scheme; write it as "https://{text.lstrip("/")}"',
        )
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _UrlError(
            "endpoint",
            f'the endpoint must start with https:// or http://, not "{parts.scheme}://"',
        )
    host = parts.hostname
    if not host:
        raise _UrlError("endpoint", f'the endpoint "{text}" has no host name')
    try:
        url_port = parts.port
    except ValueError:
        raise _UrlError("endpoint", f'the endpoint "{text}" has an invalid port') from None
    key_port = _check_port(port)
    if url_port is not None and key_port is not None and url_port != key_port:
        raise _UrlError(
            "port",
            f"the port {key_port} differs from the port {url_port} in the endpoint; "
            "give the port in one place only",
        )
    final_port = url_port if url_port is not None else key_port
    # Brackets come off an IPv6 literal in urlsplit's hostname; put them back.
    netloc = f"[{host}]" if ":" in host else host
    if final_port is not None:
        netloc = f"{netloc}:{final_port}"
    segments = [s for s in parts.path.split("/") if s]
    # Users paste the base with or without "/api" (sometimes twice); keep exactly one.
    while segments and segments[-1] == "api":
        segments.pop()
    segments.append("api")
    return f"{scheme}://{netloc}/{'/'.join(segments)}"


def _check_port(port: str | int | None) -> int | None:
    """Return the port as an int (None when not given); raise _UrlError when invalid."""
    if port is None:
        return None
    if isinstance(port, str) and port.strip() == "":
        return None
    if isinstance(port, bool):
        value = None
    elif isinstance(port, int):
        value = port
    elif isinstance(port, str) and port.strip().isdigit():
        value = int(port.strip())
    else:
        value = None
    if value is None or not 1 <= value <= 65535:
        raise _UrlError("port", f"must be a port number from 1 to 65535, got {shown(port)}")
    return value


def read_credentials(
    cred: Section,
    *,
    env: Mapping[str, str],
    base_dir: Path,
    file_mode: int | None,
    source: Path | None,
) -> tuple[str | None, str | None, str | None, str | None, bool | str, float]:
    """Return base URL, username, password, API key, verify and timeout."""
    base_url = _read_base_url(cred)
    username = read_string(cred, "username")
    if username is not None and PLACEHOLDER.match(username):
        cred.error("username", "still holds the template placeholder; give the real user name")
        username = None

    password, password_from = _read_secret(
        cred, "password", PASSWORD_ENV, env=env, base_dir=base_dir
    )
    api_key, api_key_from = _read_secret(cred, "api_key", API_KEY_ENV, env=env, base_dir=base_dir)
    if password_from == "" or api_key_from == "":
        pass  # a secret was given but is unusable, already reported; more would be noise
    elif password_from and api_key_from:
        cred.report.error(
            cred.path,
            f"both a password (from {password_from}) and an API key (from {api_key_from}) "
            "are set; keep only one",
        )
    elif password_from is None and api_key_from is None and not cred.broken:
        cred.report.error(
            cred.path,
            "no password and no API key; set credentials.password (or password_file, "
            f"${PASSWORD_ENV}) with a username, or credentials.api_key (or api_key_file, "
            f"${API_KEY_ENV}) for MVI 8.x",
        )
    elif password_from and username is None and not cred.has("username"):
        cred.missing("username", "a password needs a user name (an API key does not)")

    if file_mode is not None and file_mode & 0o077:
        _warn_plaintext_secrets(cred, file_mode, source)
    verify = _read_verify(cred, base_dir, env)
    timeout = read_number(cred, "timeout", strict=True)
    cred.finish()
    return base_url, username, password, api_key, verify, timeout


def _read_base_url(cred: Section) -> str | None:
    """The API's base URL from ``endpoint`` (and ``port``), or None after an error."""
    endpoint = cred.get("endpoint")
    port_value = cred.get("port")
    port: str | int | None = None
    port_ok = True
    if isinstance(port_value, (str, int)) and not isinstance(port_value, bool):
        port = port_value
    elif port_value is not MISSING and port_value is not None:
        cred.error("port", f"must be a port number from 1 to 65535, got {shown(port_value)}")
        port_ok = False
    if endpoint is MISSING:
        cred.missing("endpoint", 'the server URL, e.g. "https://host/powerai-vision/api"')
    elif not isinstance(endpoint, str):
        cred.error("endpoint", f"must be a string (a URL), got {shown(endpoint)}")
    if isinstance(endpoint, str) and port_ok:
        own = _own_port(endpoint)
        if own is not None and port is not None and str(port).strip() not in ("", str(own)):
            # The old script never read "port": an endpoint with its own port worked with any
            # port key beside it. The endpoint's port wins, as it did.
            cred.report.warn(
                cred.key("port"),
                f"ignored: the endpoint gives its own port {own} (the port key says "
                f"{shown(port)}); remove one of them",
            )
            port = None
        try:
            return normalize_base_url(endpoint, port)
        except _UrlError as exc:
            cred.error(exc.key, str(exc))
    return None


def _own_port(endpoint: str) -> int | None:
    """The port an endpoint URL names itself, if any (None also when it is not a URL)."""
    try:
        return urlsplit(endpoint.strip()).port if "://" in endpoint else None
    except ValueError:
        return None


def _warn_plaintext_secrets(cred: Section, file_mode: int, source: Path | None) -> None:
    """A password or API key written in a file that group or others can read: say so."""
    for name, env_var in (("password", PASSWORD_ENV), ("api_key", API_KEY_ENV)):
        value = cred.data.get(name)
        if isinstance(value, str) and value.strip() and not PLACEHOLDER.match(value):
            where = source if source is not None else "the file"
            cred.report.warn(
                cred.key(name),
                f"a plaintext secret in a file that group or others can access "
                f"(mode {file_mode & 0o777:04o}); run chmod 600 {where}, or move it to "
                f"{name}_file or ${env_var}",
            )


def _read_secret(
    cred: Section,
    name: str,
    env_var: str,
    *,
    env: Mapping[str, str],
    base_dir: Path,
) -> tuple[str | None, str | None]:
    """Find one secret by precedence; return (value, where it came from).

    Returns (None, None) when no source gives one, and (None, "") when the winning source
    is unusable (already reported). Messages name the source but never the value.
    """
    file_name = f"{name}_file"
    value = cred.get(name)
    if value is not MISSING and not isinstance(value, str):
        # Say the type, never the value: this may be a password.
        cred.error(name, f"must be a string, got {kind_of(value)}")
        value = MISSING
    file_value = cred.get(file_name)
    if file_value is not MISSING and not (isinstance(file_value, str) and file_value.strip()):
        cred.error(file_name, f"must be a non-empty string (a file path), got {shown(file_value)}")
        file_value = MISSING

    from_env = env.get(env_var, "").strip()
    if from_env:
        return _unless_placeholder(cred, name, from_env, f"${env_var}")

    cred_dir = env.get("CREDENTIALS_DIRECTORY", "")
    if cred_dir:
        systemd_file = Path(cred_dir) / name
        if systemd_file.is_file():
            where = f"$CREDENTIALS_DIRECTORY/{name}"
            return _secret_from_file(cred, name, systemd_file, where)

    if isinstance(file_value, str):
        path = expand(file_value, base_dir, env)
        return _secret_from_file(cred, file_name, path, f"credentials.{file_name}")

    if isinstance(value, str) and value.strip():
        return _unless_placeholder(cred, name, value.strip(), f"credentials.{name}")
    return None, None


def _secret_from_file(
    cred: Section, key: str, path: Path, where: str
) -> tuple[str | None, str | None]:
    try:
        content = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        cred.error(key, f"the file {path} does not exist")
        return None, ""
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        cred.error(key, f"cannot read {path}: {reason}")
        return None, ""
    if not content:
        cred.error(key, f"the file {path} is empty")
        return None, ""
    return _unless_placeholder(cred, key, content, where, f"the file {path}")


def _unless_placeholder(
    cred: Section, key: str, secret: str, where: str, origin: str | None = None
) -> tuple[str | None, str | None]:
    """Return (secret, where), or report a template placeholder and return (None, "").

    ``origin`` names where the value was read, for the message (default: ``where``).
    """
    if not PLACEHOLDER.match(secret):
        return secret, where
    origin = origin or where
    if origin == cred.key(key):
        cred.error(key, "still holds the template placeholder; give the real value")
    else:
        cred.error(key, f"{origin} holds a template placeholder; give the real value")
    # "" (not None): a secret was given, so "no password and no API key" would mislead.
    return None, ""


def _read_verify(cred: Section, base_dir: Path, env: Mapping[str, str]) -> bool | str:
    value = cred.get("verify")
    if value is MISSING or value is True:
        return True
    if value is False:
        return False
    if isinstance(value, str) and value.strip():
        path = expand(value.strip(), base_dir, env)
        if not path.exists():
            cred.error("verify", f"the CA bundle {path} does not exist")
            return True
        return str(path.resolve())
    cred.error("verify", f"must be true, false or the path of a CA bundle, got {shown(value)}")
    return True
