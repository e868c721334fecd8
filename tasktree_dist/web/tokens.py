"""API tokens of `tasktree serve`: who a request is (a token's name), what it may do (scopes), which runs it may see
(labels).

Tokens come from TASKTREE_API_TOKENS / TASKTREE_TOKENS_FILE (a JSON list of `{"name", "token" | "sha256",
"scopes", "labels"}`) and `--control-token` (a token named `control` with every scope). Only their sha256 digests
are kept in memory; a presented token is hashed and compared with every digest by `hmac.compare_digest` (no early
exit), so neither the comparison nor the loop tells an attacker how close a guess was.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Scope(StrEnum):
    """What a token may do. `admin` implies every other scope (and reads the audit)."""

    READ = "read"
    SUBMIT = "submit"
    SIGNAL = "signal"
    CONTROL = "control"  # cancel and retry
    ADMIN = "admin"


class TokenConfigError(ValueError):
    """The token configuration is malformed (named: where, which entry, which field)."""


_HEX64 = re.compile(r"[0-9a-f]{64}")


class TokenSpec(BaseModel):
    """One entry of TASKTREE_API_TOKENS."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.@:-]+$")
    token: str | None = Field(None, min_length=16, description="The token itself (hashed at load, never kept)")
    sha256: str | None = Field(None, description="Hex sha256 digest of the token (the token is never configured)")
    scopes: list[Scope] = Field(min_length=1)
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_secret(self) -> TokenSpec:
        if (self.token is None) == (self.sha256 is None):
            raise ValueError("give exactly one of `token` and `sha256`")
        if self.sha256 is not None and not _HEX64.fullmatch(self.sha256.lower()):
            raise ValueError("`sha256` must be 64 hex digits (sha256 of the token)")
        return self

    def digest(self) -> bytes:
        if self.sha256 is not None:
            return bytes.fromhex(self.sha256)
        assert self.token is not None
        return token_digest(self.token)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True)
class Principal:
    """Who a request is: a token's name, its scopes, and the labels every run it touches must carry."""

    name: str
    scopes: frozenset[Scope]
    labels: Mapping[str, str] = field(default_factory=dict)

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes or Scope.ADMIN in self.scopes

    def sees(self, run_labels: Mapping[str, str] | None) -> bool:
        """A run is visible when it carries every label of the token (a token without labels sees every run)."""
        found = run_labels or {}
        return all(found.get(key) == value for key, value in self.labels.items())

    def stamp(self, labels: Mapping[str, str] | None) -> dict[str, str]:
        """The labels of a run this principal submits: its own win, so it can never submit outside its runs."""
        return {**(labels or {}), **self.labels}


#: Who a request is on a server without tokens (open mode: loopback by default): it may read, nothing else.
ANONYMOUS = Principal("anonymous", frozenset({Scope.READ}))


def parse_tokens(text: str, where: str) -> list[TokenSpec]:
    """The entries of a JSON token list; TokenConfigError naming `where`, the entry and the field otherwise."""
    if not text.strip():
        return []
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise TokenConfigError(f"{where}: not JSON ({exc})") from None
    if not isinstance(raw, list):
        raise TokenConfigError(f"{where}: must be a JSON list of tokens, got {type(raw).__name__}")
    out = []
    for index, entry in enumerate(raw):
        try:
            out.append(TokenSpec.model_validate(entry))
        except ValidationError as exc:
            problem = exc.errors()[0]
            place = ".".join(str(part) for part in problem["loc"])
            name = entry.get("name") if isinstance(entry, dict) else None
            message = problem["msg"].removeprefix("Value error, ")
            raise TokenConfigError(f"{where}: token #{index}{f' ({name})' if name else ''}: "
                                   f"{f'{place}: ' if place else ''}{message}") from None
    return out


class TokenSet:
    """The configured tokens as digests; empty when the server runs open (reads only, loopback by default)."""

    def __init__(self, specs: Iterable[TokenSpec] = ()) -> None:
        self._entries: list[tuple[bytes, Principal]] = []
        for spec in specs:
            self._add(spec.digest(), Principal(spec.name, frozenset(spec.scopes), dict(spec.labels)))

    def _add(self, digest: bytes, principal: Principal) -> None:
        if any(known.name == principal.name for _, known in self._entries):
            raise TokenConfigError(f"two tokens are named {principal.name!r}: names identify tokens in the audit")
        if any(hmac.compare_digest(digest, known) for known, _ in self._entries):
            raise TokenConfigError(f"token {principal.name!r} is the same token as another one")
        self._entries.append((digest, principal))

    @classmethod
    def merged(cls, *sets: TokenSet) -> TokenSet:
        out = cls()
        for token_set in sets:
            for digest, principal in token_set._entries:
                out._add(digest, principal)
        return out

    @classmethod
    def configured(cls, api_tokens: str = "", tokens_file: str = "", control_token: str = "") -> TokenSet:
        """Tokens from TASKTREE_API_TOKENS, a tokens file and the control token, merged."""
        specs = parse_tokens(api_tokens, "TASKTREE_API_TOKENS")
        if tokens_file:
            try:
                text = Path(tokens_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise TokenConfigError(f"tokens file {tokens_file}: {exc.strerror or exc}") from None
            specs += parse_tokens(text, f"tokens file {tokens_file}")
        if control_token:
            # built without validation: a control token of any length keeps working as before
            specs.append(TokenSpec.model_construct(name="control", token=control_token, sha256=None,
                                                   scopes=[Scope.ADMIN], labels={}))
        return cls(specs)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, presented: str) -> Principal | None:
        """The principal of a presented token, or None. Every digest is compared (constant time per digest)."""
        digest = token_digest(presented)
        found = None
        for known, principal in self._entries:
            if hmac.compare_digest(digest, known):
                found = principal
        return found

    def by_name(self, name: str) -> Principal | None:
        return next((principal for _, principal in self._entries if principal.name == name), None)

    def names(self) -> list[str]:
        return [principal.name for _, principal in self._entries]


def describe(principal: Principal) -> dict[str, Any]:
    """What /api/config tells the board about the token it sent (never the token)."""
    return {"name": principal.name, "scopes": sorted(s.value for s in principal.scopes),
            "labels": dict(principal.labels)}
