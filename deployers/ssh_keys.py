"""SSH keys as the runner reads them: a private key from a file or a secret's text, a public
key line, a key's fingerprint for messages."""
from __future__ import annotations

import io
from pathlib import Path

import paramiko


def load_private_key(path: str | None = None, text: str | None = None,
                     passphrase: str | None = None) -> paramiko.PKey:
    """A private key from a file or from a secret's text (OpenSSH or PEM; ed25519, ecdsa, rsa)."""
    if path:
        try:
            return paramiko.PKey.from_path(Path(path).expanduser(), passphrase)
        except FileNotFoundError:
            raise ValueError(f"ssh key file not found: {path}") from None
        except (paramiko.SSHException, ValueError, TypeError) as exc:
            # TypeError: cryptography's word for an encrypted key without its passphrase
            raise ValueError(f"cannot read ssh key file {path}: {exc}") from None
    if text:
        errors = []
        for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
            try:
                return cls.from_private_key(io.StringIO(text.strip() + "\n"),
                                            password=passphrase)
            except (paramiko.SSHException, ValueError, TypeError) as exc:
                errors.append(f"{cls.__name__}: {exc}")
        raise ValueError("the ssh key secret is not a private key this runner can read")
    raise ValueError("no ssh key: set ssh.key_file or ssh.key (a secret name)")


def parse_public_key(line: str) -> paramiko.PKey:
    """'ssh-ed25519 AAAA... [comment]' -> key."""
    parts = line.split()
    if len(parts) < 2:
        raise ValueError(f"not a public key line: {line!r}")
    import base64
    try:
        return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))
    except Exception as exc:  # paramiko raises several types here
        raise ValueError(f"not a public key ({parts[0]}): {exc}") from None


def key_fingerprint(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.fingerprint}"
