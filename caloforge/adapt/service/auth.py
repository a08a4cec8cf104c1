"""Bearer tokens of the service: made, listed and revoked by ``caloforge serve token ...``.

A token is ``cft_`` + 32 random bytes (``secrets.token_urlsafe``), shown once. The database keeps a lookup
id (the first 16 hex digits of the token's SHA-256) and a salted SHA-256 of the token (a token has 256
random bits, so a slow password hash buys nothing; a stolen database reveals no usable token); the check
recomputes it and compares in constant time (``hmac.compare_digest``). Scopes: ``read`` (GET), ``submit``
(submit and cancel), ``admin`` (everything, including the audit log); ``admin`` implies the others.
The bootstrap token (``CALOFORGE_SERVICE_BOOTSTRAP_TOKEN``) becomes an ``admin`` token named ``bootstrap``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import insert, select, update

from caloforge.adapt.service import db
from caloforge.adapt.service.store import JobStore, utcnow

__all__ = ["SCOPES", "Principal", "TokenInfo", "TokenStore", "parse_scopes"]

SCOPES = ("read", "submit", "admin")
TOKEN_PREFIX = "cft_"
MIN_BOOTSTRAP_CHARS = 32
BOOTSTRAP_NAME = "bootstrap"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")


def parse_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """Known scopes, deduplicated in ``SCOPES`` order; ValueError naming an unknown one."""
    given = [s.strip() for item in scopes for s in item.split(",") if s.strip()]
    unknown = sorted(set(given) - set(SCOPES))
    if unknown or not given:
        raise ValueError(f"scope: {unknown or given} — each scope must be one of {list(SCOPES)}")
    return tuple(s for s in SCOPES if s in given)


def _lookup_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def _hash(salt: str, token: str) -> str:
    return hashlib.sha256(f"{salt}:{token}".encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who a request is: the token's name and scopes."""

    name: str
    scopes: tuple[str, ...]

    def has(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


@dataclass(frozen=True)
class TokenInfo:
    name: str
    scopes: tuple[str, ...]
    created_at: str
    revoked_at: str | None


class TokenStore:
    """Tokens in the service database (the ``tokens`` table of ``store``'s engine)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def create(self, name: str, scopes: Iterable[str], token: str | None = None) -> str:
        """A new token named ``name`` (unique; a revoked name can be reused) with ``scopes``; returns the
        token (the only time it is shown). ``token``: use this value instead of a random one (bootstrap)."""
        if not _NAME_RE.match(name):
            raise ValueError(f"token name {name!r}: letters, digits, '_', '.', '@' and '-' (at most 128)")
        scopes = parse_scopes(scopes)
        token = token if token is not None else TOKEN_PREFIX + secrets.token_urlsafe(32)
        if len(token) < 16:
            raise ValueError("token: a token must have at least 16 characters")
        salt = secrets.token_hex(16)
        row = {
            "token_id": _lookup_id(token),
            "salt": salt,
            "hash": _hash(salt, token),
            "scopes": ",".join(scopes),
            "created_at": utcnow(),
            "revoked_at": None,
        }
        t = db.tokens.c
        with self.store._write() as conn:
            existing = conn.execute(select(t.revoked_at).where(t.name == name)).first()
            if existing is not None and existing.revoked_at is None:
                raise ValueError(f"token name {name!r} exists (revoke it first, or choose another name)")
            if conn.execute(select(t.name).where(t.token_id == row["token_id"])).first() is not None:
                raise ValueError("token: this token value is in use already")
            if existing is None:
                conn.execute(insert(db.tokens).values(name=name, **row))
            else:
                conn.execute(update(db.tokens).where(t.name == name).values(**row))
        return token

    def ensure_bootstrap(self, token: str) -> None:
        """The ``bootstrap`` admin token is ``token`` (replacing another value; a revoked bootstrap token
        with this very value stays revoked). A value that looks like a placeholder (shorter than
        ``MIN_BOOTSTRAP_CHARS``, or with ``<``, ``>`` or whitespace, as in the Kubernetes Secret template) is
        refused, so a template applied by mistake never becomes an admin token."""
        if len(token) < MIN_BOOTSTRAP_CHARS or any(c in token for c in "<> \t\n"):
            raise ValueError(
                f"CALOFORGE_SERVICE_BOOTSTRAP_TOKEN looks like a placeholder ({len(token)} characters; it "
                f"needs >= {MIN_BOOTSTRAP_CHARS} and no '<', '>' or whitespace): generate one, e.g. "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        t = db.tokens.c
        with self.store._read() as conn:
            row = conn.execute(select(db.tokens).where(t.name == BOOTSTRAP_NAME)).first()
        if row is not None and hmac.compare_digest(row.hash, _hash(row.salt, token)):
            return
        if row is not None and row.revoked_at is None:
            self.revoke(BOOTSTRAP_NAME)
        self.create(BOOTSTRAP_NAME, ["admin"], token=token)

    def authenticate(self, token: str) -> Principal | None:
        """The principal of a valid, unrevoked ``token``; None otherwise."""
        t = db.tokens.c
        with self.store._read() as conn:
            row = conn.execute(select(db.tokens).where(t.token_id == _lookup_id(token))).first()
        if row is None or row.revoked_at is not None:
            return None
        if not hmac.compare_digest(row.hash, _hash(row.salt, token)):
            return None
        return Principal(row.name, tuple(row.scopes.split(",")))

    def list(self) -> list[TokenInfo]:
        with self.store._read() as conn:
            rows = conn.execute(select(db.tokens).order_by(db.tokens.c.name)).all()
        return [TokenInfo(r.name, tuple(r.scopes.split(",")), r.created_at, r.revoked_at) for r in rows]

    def revoke(self, name: str) -> None:
        """Revoke the token ``name`` (ValueError when there is no such active token)."""
        t = db.tokens.c
        with self.store._write() as conn:
            n = conn.execute(
                update(db.tokens).where(t.name == name, t.revoked_at.is_(None)).values(revoked_at=utcnow())
            ).rowcount
        if n != 1:
            raise ValueError(f"token {name!r}: no such active token (see `caloforge serve token list`)")
