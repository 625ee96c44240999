"""Who may do what on `ptv2 serve`: bearer tokens, each a tenant with the prompt names it may use
and whether it may add, replace and remove prompts.

A token file is either one token on its first line (that token may do everything), or YAML:

    tokens:
      - token: "team-a-0123456789abcdef"       # or token_sha256: <hex digest>, to keep no secret in the file
        prompts: ["team-a-*", "shared"]         # fnmatch patterns of the prompt names it may use
      - token_sha256: 5f0c…
        prompts: ["*"]
        admin: true                             # may add, replace and remove prompts

Replicas receive the tokens' sha256 digests only (their arguments are visible to the cluster). A
prompt a tenant may not use is, to that tenant, a prompt that does not exist: the same 404, and
listings (`/v1/models`, `/v1/prompts`) show only what it may use.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import secrets
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MIN_TOKEN = 16  # characters: a guessable token is no access control


class AccessError(ValueError):
    """A token file that cannot be used; the message names the file and the entry."""


class Tenant(BaseModel):
    """What one bearer token may do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    prompts: tuple[str, ...] = ("*",)  # fnmatch patterns of prompt names
    admin: bool = False  # may add, replace and remove prompts

    def may_use(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.prompts)


OPEN = Tenant(token_sha256="0" * 64, admin=True)  # the caller of a server without tokens


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str | None = Field(None, min_length=MIN_TOKEN)
    token_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    prompts: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    admin: bool = False


def single(token: str) -> list[Tenant]:
    """One token that may do everything (`--token-file` with a bare token, $PTV2_SERVE_TOKEN)."""
    if len(token) < MIN_TOKEN:
        raise AccessError(f"the bearer token must be at least {MIN_TOKEN} characters")
    return [Tenant(token_sha256=digest(token), admin=True)]


def read_token_file(path: Path) -> list[Tenant]:
    """The tenants of a token file (see the module docstring); AccessError names what is wrong."""
    if not path.is_file():
        raise AccessError(f"--token-file {path} does not exist")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict):  # a bare token on the first line
        return single((text.splitlines() or [""])[0].strip())
    if set(data) != {"tokens"} or not isinstance(data["tokens"], list) or not data["tokens"]:
        raise AccessError(f"{path}: expected a mapping with one key, tokens: a list of tokens")
    tenants, seen = [], set()
    for i, raw in enumerate(data["tokens"], 1):
        where = f"{path}: tokens[{i}]"
        try:
            entry = _Entry.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(x) for x in err["loc"])
            # a token's value is never echoed back (the file is a secret)
            raise AccessError(f"{where}.{field}: {err['msg']}" if field else f"{where}: {err['msg']}") from None
        if (entry.token is None) == (entry.token_sha256 is None):
            raise AccessError(f"{where}: give exactly one of token and token_sha256")
        for pattern in entry.prompts:
            if not pattern or not re.fullmatch(r"[\w.*?\[\]!-]+", pattern):
                raise AccessError(f"{where}.prompts: {pattern!r} is not a pattern of prompt names")
        key = entry.token_sha256 or digest(entry.token)
        if key in seen:
            raise AccessError(f"{where}: the same token appears twice")
        seen.add(key)
        tenants.append(Tenant(token_sha256=key, prompts=tuple(entry.prompts), admin=entry.admin))
    return tenants


def authenticate(tenants: list[Tenant] | None, authorization: str) -> Tenant | None:
    """The tenant whose token the Authorization header carries (None: no such token); `OPEN`
    when the server has no tokens. Every digest is compared, in constant time each."""
    if tenants is None:
        return OPEN
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    mine = digest(token.strip())
    found = None
    for tenant in tenants:
        if secrets.compare_digest(mine, tenant.token_sha256):
            found = tenant
    return found
