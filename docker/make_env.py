"""Write docker/.env from docker/.env.example with every `change-me` replaced by a random secret.

Usage: python3 docker/make_env.py [TARGET]   (TARGET defaults to docker/.env; `make secrets`)

Never overwrites an existing file: the databases keep the passwords they were first created
with, so new secrets need fresh volumes too. Standard library only.
"""

import base64
import os
import secrets
import string
import sys
from pathlib import Path

PLACEHOLDER = "change-me"
# Letters and digits only: the values go into URLs, YAML and command lines unquoted.
ALPHABET = string.ascii_letters + string.digits
# MinIO accepts access keys of at most 20 characters.
LENGTHS = {"MINIO_ROOT_USER": 20}


def make_secret(name: str) -> str:
    if name == "AIRFLOW_FERNET_KEY":  # a Fernet key is 32 random bytes, urlsafe base64
        return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    return "".join(secrets.choice(ALPHABET) for _ in range(LENGTHS.get(name, 32)))


def render_env(template: str) -> str:
    lines = ["# Written by `make secrets` from .env.example. Keep it private; never commit it."]
    body = template.split("\n\n", 1)[1]  # without the template's own header paragraph
    for line in body.splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#") and value.strip() == PLACEHOLDER:
            line = f"{name.strip()}={make_secret(name.strip())}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent
    target = Path(argv[1]) if len(argv) > 1 else here / ".env"
    text = render_env((here / ".env.example").read_text())
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"{target} exists: not overwriting it. To start over, stop the stack with "
              "`docker compose -f docker/compose.yaml down -v` (drops the volumes) and delete it.",
              file=sys.stderr)
        return 1
    os.fchmod(fd, 0o600)  # whatever the umask
    with os.fdopen(fd, "w") as out:
        out.write(text)
    print(f"wrote {target} (mode 0600)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
