"""The adapter registry: named, versioned LoRA adapters with checksums and lineage.

Layout under ``root`` (default ``LORA_KIT_HOME/registry``)::

    index.sqlite          adapters, versions, aliases (the single source of truth)
    blobs/ab/abcd...      file contents, named by sha256 (identical files are stored once)
    versions/<id>/        adapter_config.json + adapter_model.safetensors (hard links to blobs)
    tmp/                  staging area for registrations in progress

Crash safety: a registration stages and hashes its files outside the lock, then, inside one
``BEGIN IMMEDIATE`` transaction, moves them into ``blobs/`` (atomic renames) and inserts the
version row. A process killed at any point leaves either no row (its blobs are unreferenced
garbage that ``gc`` removes under the same lock) or a complete version. Blobs are only ever
deleted while holding that lock, so a concurrent registration cannot lose a blob it reuses.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import shutil
import signal
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lora_kit import paths
from lora_kit.adapters import validation
from lora_kit.adapters.format import ADAPTER_FILES, CONFIG_FILE, parse_config
from lora_kit.errors import LoraKitError
from lora_kit.registry import lineage as lineage_mod
from lora_kit.registry.lineage import sha256_file

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # use fullmatch: "$" accepts a trailing newline
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")  # fullmatch
_VERSION_RE = re.compile(r"[0-9]{1,18}")  # ASCII digits only (str.isdigit accepts "²"), fits SQLite
STORED_FILES = ADAPTER_FILES  # exactly what a version stores: the two adapter files
# Test hook: kill this process with SIGKILL at a named point of ``register`` (crash-safety tests).
KILL_HOOK_ENV = "LORA_KIT_REGISTRY_TEST_KILL_AT"


class RegistryError(LoraKitError):
    """A registry operation failed for a reason the user can fix; the message says which."""


class AdapterNotFound(RegistryError):
    """A reference resolves to no registered adapter version.

    ``public`` is the same fact for an HTTP client: no registry path, no other adapter's name.
    """

    def __init__(self, message: str, public: str | None = None):
        super().__init__(message)
        self.public = public or message


class InvalidReference(RegistryError):
    """A string that is not an adapter reference at all (not a NAME, NAME@VERSION, NAME:ALIAS or id)."""

    def __init__(self, ref: object):
        shown = ref if isinstance(ref, str) and len(ref) <= 80 else f"{str(ref)[:80]}..."
        super().__init__(
            f"invalid adapter reference {shown!r}: use NAME, NAME@VERSION, NAME:ALIAS or a version id "
            "(names: 1-64 characters from a-z 0-9 . _ -; versions: a positive number)"
        )
        self.ref = ref


class InvalidName(RegistryError):
    """An adapter name or alias breaks the naming rules."""


@dataclass(frozen=True)
class AdapterVersion:
    """One registered version of an adapter."""

    name: str
    version: int
    id: str
    created_at: str
    base_model: str | None
    description: str
    tags: list[str]
    rank: int
    alpha: float
    target_modules: list[str]
    files: dict[str, dict]
    lineage: dict
    aliases: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ref"] = self.ref
        return out


def check_name(name: str, what: str = "adapter name") -> str:
    """Return ``name`` if it is a valid adapter name or alias, else raise InvalidName."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise InvalidName(
            f"invalid {what} {name!r}: use 1-64 characters from a-z 0-9 . _ -, starting with a letter or digit "
            "(no spaces, capitals or slashes)"
        )
    return name


def _is_name(value: str) -> bool:
    return bool(NAME_RE.fullmatch(value)) and value not in (".", "..")


def parse_reference(ref: object) -> tuple[str, str, int | str | None]:
    """Split an adapter reference: ("id", ID, None), ("version", NAME, N), ("alias", NAME, ALIAS)
    or ("latest", NAME, None); InvalidReference for anything else (never ValueError/OverflowError)."""
    if not isinstance(ref, str) or not ref:
        raise InvalidReference(ref)
    if _UUID_RE.fullmatch(ref):
        return "id", ref, None
    if "@" in ref:
        name, _, ver = ref.partition("@")
        if _is_name(name) and _VERSION_RE.fullmatch(ver):
            return "version", name, int(ver)
    elif ":" in ref:
        name, _, alias = ref.partition(":")
        if _is_name(name) and _is_name(alias):
            return "alias", name, alias
    elif _is_name(ref):
        return "latest", ref, None
    raise InvalidReference(ref)


def reference_name(ref: object) -> str | None:
    """The adapter name ``ref`` names (``NAME``, ``NAME@V``, ``NAME:ALIAS`` -> ``NAME``), parsed as
    :func:`parse_reference` does; None for a version id (it names no name) or a non-reference."""
    try:
        kind, name, _ = parse_reference(ref)
    except InvalidReference:
        return None
    return None if kind == "id" else name


def _kill_hook(point: str) -> None:
    if os.environ.get(KILL_HOOK_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def local_base_dir(spec: str | None) -> Path | None:
    """A local directory holding the base model ``spec`` (path, prepared embedded model, hub cache), or None.

    Never downloads or converts anything: validation must stay fast and offline.
    """
    if not spec:
        return None
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return path.resolve()
    from lora_kit import models  # light: torch is imported lazily there

    if spec in models.EMBEDDED:
        return models.embedded_dir(spec) if models.is_prepared(spec) else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json")
    except Exception:  # not a hub id, or no cache
        return None
    return Path(cached).parent if isinstance(cached, str) else None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    next_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL REFERENCES adapters(name),
    version INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    base_model TEXT,
    description TEXT NOT NULL,
    tags TEXT NOT NULL,
    rank INTEGER NOT NULL,
    alpha REAL NOT NULL,
    target_modules TEXT NOT NULL,
    files TEXT NOT NULL,
    lineage TEXT NOT NULL,
    warnings TEXT NOT NULL,
    UNIQUE (name, version)
);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (name, alias)
);
CREATE TABLE IF NOT EXISTS evals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    version_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    metric TEXT NOT NULL,
    score REAL NOT NULL,
    n INTEGER NOT NULL,
    ci_low REAL NOT NULL,
    ci_high REAL NOT NULL,
    data_sha256 TEXT NOT NULL,
    data_name TEXT NOT NULL,
    precision TEXT NOT NULL,
    details TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS evals_by_version ON evals (version_id);
"""


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation result of a version (``lora-kit eval`` or the end of training).

    ``score`` is the share of ``n`` examples right under ``metric``, ``ci`` its 95% interval;
    ``data_sha256`` the fingerprint of the data (the file's sha256), ``precision`` how the base
    was loaded (fp32, bf16, nf4...), ``details`` the rest (field-level scores, max tokens...).
    """

    ref: str
    version_id: str
    created_at: str
    metric: str
    score: float
    n: int
    ci: tuple[float, float]
    data_sha256: str
    data_name: str
    precision: str
    details: dict

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ci"] = list(self.ci)
        return out


@dataclass
class _Staged:
    """What a registration learned from its staged copy, ready to be inserted."""

    base_spec: str | None
    rank: int
    alpha: float
    target_modules: list[str]
    files: dict[str, dict]  # file name -> {"sha256", "size"}
    lineage: dict
    warnings: list[str]


def _check_tags(tags: tuple[str, ...] | list[str] | str) -> list[str]:
    tags = [tags] if isinstance(tags, str) else list(tags)
    for tag in tags:
        if not isinstance(tag, str) or not tag.strip():
            raise RegistryError(f"invalid tag {tag!r}: tags are non-empty strings")
    return tags


class Registry:
    """A registry rooted at ``root`` (default: ``paths.registry_dir()``)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else paths.registry_dir()
        for sub in ("blobs", "versions", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "index.sqlite"
        db = self._connect()
        try:
            # WAL: readers (the server resolving references) never wait for a registering writer.
            db.execute("PRAGMA journal_mode=WAL")
        finally:
            db.close()
        with self._write() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    # -- plumbing ------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN ourselves; timeout: wait for other writers.
        db = sqlite3.connect(self.db_path, timeout=120, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding the registry's lock (SQLite's RESERVED lock) from the start."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        try:
            db.execute("BEGIN")  # one consistent snapshot for multi-query reads
            yield db
            db.execute("COMMIT")
        finally:
            db.close()

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def _row_to_version(self, db: sqlite3.Connection, row: sqlite3.Row) -> AdapterVersion:
        aliases = [
            r["alias"]
            for r in db.execute(
                "SELECT alias FROM aliases WHERE name = ? AND version = ? ORDER BY alias", (row["name"], row["version"])
            )
        ]
        return AdapterVersion(
            name=row["name"],
            version=row["version"],
            id=row["id"],
            created_at=row["created_at"],
            base_model=row["base_model"],
            description=row["description"],
            tags=json.loads(row["tags"]),
            rank=row["rank"],
            alpha=row["alpha"],
            target_modules=json.loads(row["target_modules"]),
            files=json.loads(row["files"]),
            lineage=json.loads(row["lineage"]),
            aliases=aliases,
            warnings=json.loads(row["warnings"]),
        )

    # -- register ------------------------------------------------------------------------------

    def register(
        self,
        adapter_dir: Path | str,
        name: str,
        *,
        base_model: str | None = None,
        description: str = "",
        tags: tuple[str, ...] | list[str] = (),
        lineage: dict | None = None,
        parent: str | None = None,
        unless_latest_is_identical: bool = False,
    ) -> AdapterVersion:
        """Validate the PEFT directory ``adapter_dir`` and store it as the next version of ``name``.

        ``unless_latest_is_identical``: when the latest version of ``name`` holds exactly these files
        (by sha256), return it and add no version. The check runs inside the registry's write
        lock, so concurrent registrations of the same files add one version in all.

        ``base_model`` defaults to the adapter config's ``base_model_name_or_path``; when that base
        is available locally, target modules and shapes are checked against it. ``parent`` is a
        reference to the adapter this one was derived from (recorded in lineage). ``lineage`` holds
        the caller's facts (recipe, metrics...), added to what ``registry.lineage.build`` computes.
        """
        check_name(name)
        tags = _check_tags(tags)
        self._clean_staging()
        adapter_dir = Path(adapter_dir)
        validation.check_files(adapter_dir)  # refuse pickles before copying anything
        parent_info = None
        if parent is not None:
            p = self.resolve(parent)
            parent_info = {"ref": p.ref, "id": p.id}
        stage = self.root / "tmp" / f"stage-{os.getpid()}-{uuid.uuid4().hex}"
        stage.mkdir(parents=True)
        try:
            staged = self._stage(adapter_dir, stage, base_model, parent_info, lineage)
            _kill_hook("staged")
            version_id = str(uuid.uuid4())
            with self._write() as db:
                same = self._latest_with_files(db, name, staged.files) if unless_latest_is_identical else None
                if same is None:
                    self._store_blobs(stage, staged.files)
                    _kill_hook("blobs")
                    self._insert_version(db, version_id, name, description, tags, staged)
                    _kill_hook("inserted")
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return self.resolve(same or version_id)

    def _stage(
        self, adapter_dir: Path, stage: Path, base_model: str | None, parent: dict | None, facts: dict | None
    ) -> _Staged:
        """Copy the adapter files into ``stage``, validate the copy (what is checked is exactly
        what is stored), hash it, build its lineage, and make the files durable and read-only."""
        for fname in STORED_FILES:
            shutil.copyfile(adapter_dir / fname, stage / fname)
        config_base = parse_config(stage / CONFIG_FILE).get("base_model_name_or_path")
        base_spec = base_model or config_base or None
        base_dir = local_base_dir(base_spec)
        try:
            info = validation.validate_adapter_dir(stage, base_dir)
        except validation.InvalidAdapter as err:  # name the user's directory, not the staging copy
            raise validation.InvalidAdapter(str(err).replace(str(stage), str(adapter_dir))) from None
        warnings = list(info.warnings)
        if base_spec and base_dir is None:
            warnings.append(
                f"base model '{base_spec}' is not available locally: modules and shapes were not checked against it"
            )
        files = {
            fname: {"sha256": sha256_file(stage / fname), "size": (stage / fname).stat().st_size}
            for fname in STORED_FILES
        }
        lineage = lineage_mod.build(adapter_dir, info.config, base_spec, base_dir, parent=parent, facts=facts)
        for fname in STORED_FILES:
            os.chmod(stage / fname, 0o444)  # blobs are immutable; discourage edits through links
            with open(stage / fname, "rb") as fh:
                os.fsync(fh.fileno())
        return _Staged(base_spec, info.rank, info.alpha, info.target_modules, files, lineage, warnings)

    @staticmethod
    def _latest_with_files(db: sqlite3.Connection, name: str, files: dict[str, dict]) -> str | None:
        """The id of ``name``'s latest version when it holds exactly ``files`` (same sha256 each), else None."""
        row = db.execute(
            "SELECT id, files FROM versions WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
        ).fetchone()
        if row is None:
            return None
        stored = {fname: meta["sha256"] for fname, meta in json.loads(row["files"]).items()}
        return row["id"] if stored == {fname: meta["sha256"] for fname, meta in files.items()} else None

    def _store_blobs(self, stage: Path, files: dict[str, dict]) -> None:
        """Move staged files into ``blobs/`` (atomic renames; a file already stored is kept once)."""
        for fname, meta in files.items():
            blob = self.blob_path(meta["sha256"])
            if not blob.exists():
                blob.parent.mkdir(parents=True, exist_ok=True)
                os.replace(stage / fname, blob)

    def _insert_version(
        self, db: sqlite3.Connection, version_id: str, name: str, description: str, tags: list[str], staged: _Staged
    ) -> None:
        """Take the next version number of ``name`` and insert the row (inside the write lock)."""
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        row = db.execute("SELECT next_version FROM adapters WHERE name = ?", (name,)).fetchone()
        version = row["next_version"] if row else 1
        if row is None:
            db.execute("INSERT INTO adapters (name, created_at, next_version) VALUES (?, ?, ?)", (name, created, 2))
        else:
            db.execute("UPDATE adapters SET next_version = ? WHERE name = ?", (version + 1, name))
        db.execute(
            "INSERT INTO versions (id, name, version, created_at, base_model, description, tags, rank, alpha,"
            " target_modules, files, lineage, warnings) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                version_id,
                name,
                version,
                created,
                staged.base_spec,
                description,
                json.dumps(tags),
                staged.rank,
                staged.alpha,
                json.dumps(staged.target_modules),
                json.dumps(staged.files, sort_keys=True),
                json.dumps(staged.lineage, sort_keys=True, default=str),
                json.dumps(staged.warnings),
            ),
        )

    # -- read ----------------------------------------------------------------------------------

    def resolve(self, ref: str) -> AdapterVersion:
        """``NAME`` (latest), ``NAME@3``, ``NAME:alias`` or a version id -> that version.

        Raises InvalidReference for a string of none of these forms, AdapterNotFound otherwise.
        """
        kind, name, arg = parse_reference(ref)
        with self._read() as db:
            if kind == "id":
                row = db.execute("SELECT * FROM versions WHERE id = ?", (ref,)).fetchone()
                if row:
                    return self._row_to_version(db, row)
                kind = "latest"  # an id is also a well-formed name
            if kind == "version":
                row = db.execute("SELECT * FROM versions WHERE name = ? AND version = ?", (name, arg)).fetchone()
                if row is None:
                    self._not_found(db, name, f"no version {arg}")
            elif kind == "alias":
                row = db.execute(
                    "SELECT v.* FROM versions v JOIN aliases a ON a.name = v.name AND a.version = v.version"
                    " WHERE a.name = ? AND a.alias = ?",
                    (name, arg),
                ).fetchone()
                if row is None:
                    self._not_found(db, name, f"no alias '{arg}'")
            else:
                row = db.execute(
                    "SELECT * FROM versions WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
                ).fetchone()
                if row is None:
                    self._not_found(db, name, "")
            return self._row_to_version(db, row)

    def _not_found(self, db: sqlite3.Connection, name: str, what: str) -> None:
        versions = [r[0] for r in db.execute("SELECT version FROM versions WHERE name = ? ORDER BY version", (name,))]
        if versions:
            aliases = [
                f"{r[0]}->@{r[1]}"
                for r in db.execute("SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias", (name,))
            ]
            raise AdapterNotFound(
                f"adapter '{name}' has {what}; versions: {', '.join(map(str, versions))}"
                + (f"; aliases: {', '.join(aliases)}" if aliases else ""),
                public=f"adapter '{name}' has {what}",
            )
        names = [r[0] for r in db.execute("SELECT DISTINCT name FROM versions")]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = (
            f"; did you mean {', '.join(close)}?"
            if close
            else ("; it is empty" if not names else "; `lora-kit adapters list` shows what is there")
        )
        raise AdapterNotFound(
            f"no adapter '{name}' in the registry at {self.root}{hint}", public=f"no adapter '{name}' in the registry"
        )

    def list(self) -> list[AdapterVersion]:
        """All versions, ordered by name then version."""
        with self._read() as db:
            rows = db.execute("SELECT * FROM versions ORDER BY name, version").fetchall()
            return [self._row_to_version(db, r) for r in rows]

    def adapter_path(self, ref: str) -> Path:
        """A directory with this version's ``adapter_config.json`` + ``adapter_model.safetensors`` (read-only)."""
        return self.version_dir(self.resolve(ref))

    def version_dir(self, av: AdapterVersion) -> Path:
        """:meth:`adapter_path` of a version already resolved (no second lookup in the database)."""
        target = self.root / "versions" / av.id
        if all((target / f).is_file() for f in STORED_FILES):
            return target
        # (Re)build the directory from blobs: hard links (no copy) where the filesystem allows.
        tmp = self.root / "tmp" / f"vdir-{os.getpid()}-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            for fname, meta in av.files.items():
                blob = self.blob_path(meta["sha256"])
                if not blob.is_file():
                    raise RegistryError(
                        f"{av.ref}: the stored file {fname} ({meta['sha256'][:12]}) is missing; run `lora-kit adapters verify`"
                    )
                try:
                    os.link(blob, tmp / fname)
                except OSError:
                    shutil.copyfile(blob, tmp / fname)
            # Only an incomplete directory is removed: a complete one may be a twin's (two
            # requests resolving one version at once), which its caller is reading right now.
            if target.exists() and not all((target / f).is_file() for f in STORED_FILES):
                shutil.rmtree(target, ignore_errors=True)
            try:
                os.replace(tmp, target)
            except OSError:
                if not all((target / f).is_file() for f in STORED_FILES):  # lost a race to a twin: fine
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    # -- change --------------------------------------------------------------------------------

    def tag(self, ref: str, alias: str) -> AdapterVersion:
        """Point ``NAME:alias`` at the version ``ref`` resolves to (moving the alias if it exists)."""
        check_name(alias, "alias")
        self._clean_staging()
        if alias.isdigit():
            raise InvalidName(f"invalid alias {alias!r}: an alias cannot be a number (it would read like a version)")
        av = self.resolve(ref)
        with self._write() as db:
            if db.execute("SELECT 1 FROM versions WHERE id = ?", (av.id,)).fetchone() is None:
                raise AdapterNotFound(f"{av.ref} was removed meanwhile")
            db.execute(
                "INSERT INTO aliases (name, alias, version) VALUES (?, ?, ?)"
                " ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version",
                (av.name, alias, av.version),
            )
        return self.resolve(av.id)

    def untag(self, name: str, alias: str) -> None:
        """Remove the alias ``name:alias``."""
        self._clean_staging()
        with self._write() as db:
            cur = db.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias))
            if cur.rowcount == 0:
                self._not_found(db, name, f"no alias '{alias}'")

    def remove(self, ref: str, force: bool = False) -> AdapterVersion:
        """Remove the version ``ref`` resolves to (refused while aliases point at it unless ``force``).

        Files no other version uses are deleted.
        """
        av = self.resolve(ref)
        with self._write() as db:
            aliases = [
                r[0]
                for r in db.execute("SELECT alias FROM aliases WHERE name = ? AND version = ?", (av.name, av.version))
            ]
            if aliases and not force:
                raise RegistryError(
                    f"{av.ref} is still pointed at by alias(es) {', '.join(f'{av.name}:{a}' for a in aliases)}; "
                    "move or remove them (`lora-kit adapters untag`) or pass --force"
                )
            db.execute("DELETE FROM aliases WHERE name = ? AND version = ?", (av.name, av.version))
            db.execute("DELETE FROM evals WHERE version_id = ?", (av.id,))
            db.execute("DELETE FROM versions WHERE id = ?", (av.id,))
        self.gc()
        return av

    def gc(self) -> list[str]:
        """Delete blobs and version directories no version references, and dead staging dirs."""
        removed: list[str] = []
        with self._write() as db:  # the lock: no registration can commit a reference meanwhile
            referenced: set[str] = set()
            ids: set[str] = set()
            for row in db.execute("SELECT id, files FROM versions"):
                ids.add(row["id"])
                referenced.update(meta["sha256"] for meta in json.loads(row["files"]).values())
            for blob in (self.root / "blobs").glob("*/*"):
                if blob.name not in referenced:
                    blob.unlink(missing_ok=True)
                    removed.append(str(blob.relative_to(self.root)))
            for vdir in (self.root / "versions").iterdir():
                if vdir.name not in ids:
                    shutil.rmtree(vdir, ignore_errors=True)
                    removed.append(str(vdir.relative_to(self.root)))
        removed.extend(self._clean_staging())
        return removed

    def _clean_staging(self) -> list[str]:
        """Remove the staging dirs of dead processes (a ``kill -9`` mid-write); cheap: one listing.

        Run at the start of every registry write, so a crash leaves no garbage past the next write.
        """
        removed: list[str] = []
        with contextlib.suppress(OSError):
            for tmp in (self.root / "tmp").iterdir():
                # Staging dirs are named after their process; those of dead processes are garbage.
                m = re.match(r"(?:stage|vdir|import)-(\d+)-", tmp.name)
                if m and not _pid_alive(int(m.group(1))):
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed.append(str(tmp.relative_to(self.root)))
        return removed

    # -- evaluation results ----------------------------------------------------------------------

    def record_eval(
        self,
        ref: str,
        *,
        metric: str,
        score: float,
        n: int,
        ci: tuple[float, float],
        data_sha256: str,
        precision: str,
        data_name: str = "",
        details: dict | None = None,
    ) -> EvalRecord:
        """Keep an evaluation result of the version ``ref`` resolves to (every result is kept)."""
        av = self.resolve(ref)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._write() as db:
            if db.execute("SELECT 1 FROM versions WHERE id = ?", (av.id,)).fetchone() is None:
                raise AdapterNotFound(f"{av.ref} was removed meanwhile")
            db.execute(
                "INSERT INTO evals (version_id, created_at, metric, score, n, ci_low, ci_high, data_sha256,"
                " data_name, precision, details) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    av.id,
                    created,
                    metric,
                    float(score),
                    int(n),
                    float(ci[0]),
                    float(ci[1]),
                    data_sha256,
                    data_name,
                    precision,
                    json.dumps(details or {}, sort_keys=True, default=str),
                ),
            )
        return EvalRecord(
            av.ref,
            av.id,
            created,
            metric,
            float(score),
            int(n),
            (float(ci[0]), float(ci[1])),
            data_sha256,
            data_name,
            precision,
            dict(details or {}),
        )

    def evals(self, ref: str) -> list[EvalRecord]:
        """Every evaluation result of the version ``ref`` resolves to, oldest first."""
        av = self.resolve(ref)
        with self._read() as db:
            rows = db.execute("SELECT * FROM evals WHERE version_id = ? ORDER BY id", (av.id,)).fetchall()
        return [
            EvalRecord(
                av.ref,
                av.id,
                r["created_at"],
                r["metric"],
                r["score"],
                r["n"],
                (r["ci_low"], r["ci_high"]),
                r["data_sha256"],
                r["data_name"],
                r["precision"],
                json.loads(r["details"]),
            )
            for r in rows
        ]

    # -- check ---------------------------------------------------------------------------------

    def verify(self, ref: str | None = None) -> list[str]:
        """Re-hash the stored files of one version (or all); return the problems found (empty = ok)."""
        versions = [self.resolve(ref)] if ref is not None else self.list()
        problems: list[str] = []
        for av in versions:
            vdir = self.root / "versions" / av.id
            for fname, meta in sorted(av.files.items()):
                blob = self.blob_path(meta["sha256"])
                if not blob.is_file():
                    problems.append(f"{av.ref}: {fname} is missing from the store ({blob})")
                    continue
                got = sha256_file(blob)
                if got != meta["sha256"]:
                    problems.append(
                        f"{av.ref}: {fname} is corrupted (sha256 {got[:16]}..., expected {meta['sha256'][:16]}...)"
                    )
                elif blob.stat().st_size != meta["size"]:
                    problems.append(f"{av.ref}: {fname} has size {blob.stat().st_size}, expected {meta['size']}")
                linked = vdir / fname
                if linked.exists() and not os.path.samefile(linked, blob) and sha256_file(linked) != meta["sha256"]:
                    problems.append(f"{av.ref}: {linked} differs from the stored file (edited copy)")
        return problems


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        return True
    return True
