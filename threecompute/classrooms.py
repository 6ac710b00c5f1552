"""Classrooms: roles, teacher sign-up, classes and their members, assignments handed out to
every student's workspace, and the grades of their hidden tests.

Roles. `admin` comes from ADMIN_EMAILS alone. `teacher`: a role an admin gave, an address
on the admins' allowlist, or a one-time sign-up code redeemed. Everyone else is a
`student`. Membership is per classroom: its `instructor`s (the owner and co-instructors)
manage it; its `student`s get its published assignments.

Files. An assignment's starter files and hidden tests live in the server's own folder,
DATA_DIR/classrooms/<classroom>/<assignment>/{starter,tests}/, never in a workspace. The
starter files are copied into `classrooms/<classroom>/<assignment>/` of each student's
workspace through the workspace layer (so a student's links can lead nowhere), and a file
that is already there is never overwritten.

Nothing here knows HTTP: refusals are `ClassroomError(status, message)`. SQL goes through
`Store.transaction`, written once for both engines.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .settings import Settings
from .store import Store, User
from .workspace import Workspace, WorkspaceError

ROLES = ("admin", "teacher", "student")
MEMBER_ROLES = ("student", "instructor")
MAX_NAME = 100
MAX_CODE_USES = 1000
MAX_CODE_HOURS = 24 * 90
ACCESS_CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: read aloud in class
ACCESS_CODE_LENGTH = 8
SLUG = re.compile(r"[^a-z0-9]+")
SAFE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\- ]{0,99}")
TEST_FILE = re.compile(r"(test_[A-Za-z0-9_]+|[A-Za-z0-9_]+_test|conftest)\.py")
MAX_STARTER_FILES = 200
MAX_STARTER_BYTES = 1024 * 1024
BACKUP_SUFFIX = ".backup-"


class ClassroomError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Classroom:
    id: str
    name: str
    owner_id: str
    access_code: str
    archived: bool
    created_at: float

    def to_json(self, instructor: bool) -> dict:
        answer = {"id": self.id, "name": self.name, "archived": self.archived, "created_at": self.created_at}
        return answer | ({"owner_id": self.owner_id, "access_code": self.access_code} if instructor else {})


@dataclass(frozen=True)
class Assignment:
    id: str
    classroom_id: str
    slug: str
    name: str
    published: bool
    due_at: float | None
    created_at: float
    weight: float = 1.0

    @property
    def folder(self) -> str:
        """Where it lives in each student's workspace."""
        return f"classrooms/{self.classroom_id}/{self.slug}"

    def to_json(self) -> dict:
        return {"id": self.id, "classroom_id": self.classroom_id, "slug": self.slug, "name": self.name,
                "published": self.published, "due_at": self.due_at, "created_at": self.created_at,
                "weight": self.weight, "folder": self.folder}


def _slug(name: str) -> str:
    return SLUG.sub("-", name.lower()).strip("-")[:40] or "x"


def _name(value: object, what: str = "name") -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME or any(ord(c) < 32 for c in value):
        raise ClassroomError(400, f"{what} must be 1-{MAX_NAME} printable characters")
    return value.strip()


def _hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def new_access_code() -> str:
    return "".join(secrets.choice(ACCESS_CODE_ALPHABET) for _ in range(ACCESS_CODE_LENGTH))


def starter_parts(path: object) -> list[str]:
    """A starter file's relative path, each part plain (no `..`, no hidden names, no links)."""
    if not isinstance(path, str):
        raise ClassroomError(400, "file paths must be strings")
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 8 or not all(SAFE_PART.fullmatch(p) and ".." not in p for p in parts):
        raise ClassroomError(400, f"bad file path: {path[:80]!r}")
    return parts


def _text_files(files: object, what: str, limit: int) -> dict[str, bytes]:
    if not isinstance(files, dict) or len(files) > limit:
        raise ClassroomError(400, f"{what} must be an object of at most {limit} path: text entries")
    out: dict[str, bytes] = {}
    for path, content in files.items():
        if not isinstance(content, str):
            raise ClassroomError(400, f"{what}: each file's content must be text")
        out["/".join(starter_parts(path))] = content.encode()
    if sum(len(v) for v in out.values()) > MAX_STARTER_BYTES:
        raise ClassroomError(413, f"{what} larger than {MAX_STARTER_BYTES} bytes")
    return out


class Classrooms:
    """The classroom model on a store, with the assignment files in DATA_DIR/classrooms."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.files_dir = settings.data_dir / "classrooms"

    async def _one(self, sql: str, *params: object) -> dict | None:
        rows = (await self.store.transaction([(sql, params)]))[0]
        return rows[0] if rows else None

    async def _all(self, sql: str, *params: object) -> list[dict]:
        return (await self.store.transaction([(sql, params)]))[0]

    # -- roles ----------------------------------------------------------------------------

    async def role_of(self, user: User) -> str:
        email = user.email.lower()
        if email in self.settings.admin_emails:
            return "admin"
        row = await self._one("SELECT role FROM user_roles WHERE user_id = ?", user.id)
        if row is not None:
            return row["role"]
        listed = await self._one("SELECT email FROM teacher_allowlist WHERE email = ?", email)
        return "teacher" if listed else "student"

    async def set_role(self, user_id: str, role: object) -> None:
        if role not in ("teacher", "student"):
            raise ClassroomError(400, "role must be teacher or student (admins come from ADMIN_EMAILS)")
        if await self._one("SELECT id FROM users WHERE id = ?", user_id) is None:
            raise ClassroomError(404, "no such user")
        await self.store.transaction([("INSERT INTO user_roles VALUES (?, ?) ON CONFLICT (user_id)"
                                       " DO UPDATE SET role = excluded.role", (user_id, role))])

    async def allowlist(self) -> list[dict]:
        return await self._all("SELECT email, added_by, added_at FROM teacher_allowlist ORDER BY email")

    async def allow_teacher(self, email: object, by: str) -> None:
        if not isinstance(email, str) or "@" not in email or len(email) > 254:
            raise ClassroomError(400, "email must be an address")
        await self.store.transaction([("INSERT INTO teacher_allowlist VALUES (?, ?, ?) ON CONFLICT (email)"
                                       " DO NOTHING", (email.strip().lower(), by, time.time()))])

    async def disallow_teacher(self, email: str) -> bool:
        rows = await self._all("DELETE FROM teacher_allowlist WHERE email = ? RETURNING email", email.lower())
        return bool(rows)

    async def new_teacher_code(self, by: str, max_uses: object = 1, hours: object = 72) -> dict:
        if not isinstance(max_uses, int) or isinstance(max_uses, bool) or not 1 <= max_uses <= MAX_CODE_USES:
            raise ClassroomError(400, f"max_uses must be an integer from 1 to {MAX_CODE_USES}")
        if not isinstance(hours, int | float) or isinstance(hours, bool) or not 0 < hours <= MAX_CODE_HOURS:
            raise ClassroomError(400, f"expires_in_hours must be a number above 0, at most {MAX_CODE_HOURS}")
        code = secrets.token_urlsafe(24)  # 192 bits: never guessed; only its hash is stored
        now = time.time()
        expires = now + hours * 3600
        await self.store.transaction([("INSERT INTO teacher_codes VALUES (?, ?, ?, ?, ?, 0)",
                                       (_hash(code), by, now, expires, max_uses))])
        return {"code": code, "expires_at": expires, "max_uses": max_uses}

    async def redeem_teacher_code(self, user: User, code: object) -> None:
        if not isinstance(code, str) or not code:
            raise ClassroomError(400, "code is required")
        # One statement takes a use, so that parallel redemptions never pass max_uses.
        used = await self.store.transaction([
            ("UPDATE teacher_codes SET uses = uses + 1 WHERE code_hash = ? AND uses < max_uses"
             " AND expires_at > ? RETURNING code_hash", (_hash(code), time.time())),
        ])
        if not used[0]:
            raise ClassroomError(403, "that code is unknown, expired or used up")
        if await self.role_of(user) != "admin":
            await self.store.transaction([("INSERT INTO user_roles VALUES (?, 'teacher') ON CONFLICT (user_id)"
                                           " DO UPDATE SET role = 'teacher'", (user.id,))])

    async def delete_user_rows(self, user_id: str) -> None:
        """The user's rows: classrooms they own (with theirs), memberships, grades, the user."""
        for row in await self._all("SELECT id FROM classrooms WHERE owner_id = ?", user_id):
            await self.delete(row["id"])
        await self.store.transaction([
            ("DELETE FROM grade_runs WHERE user_id = ?", (user_id,)),
            ("DELETE FROM manual_scores WHERE user_id = ?", (user_id,)),
            ("DELETE FROM classroom_members WHERE user_id = ?", (user_id,)),
            ("DELETE FROM user_roles WHERE user_id = ?", (user_id,)),
            ("DELETE FROM users WHERE id = ?", (user_id,)),
        ])

    # -- classrooms -----------------------------------------------------------------------

    async def create(self, owner: User, name: object) -> Classroom:
        name = _name(name)
        classroom_id = f"{_slug(name)}-{secrets.token_hex(3)}"
        now = time.time()
        await self.store.transaction([
            ("INSERT INTO classrooms VALUES (?, ?, ?, ?, 0, ?)",
             (classroom_id, name, owner.id, new_access_code(), now)),
            ("INSERT INTO classroom_members VALUES (?, ?, 'instructor', ?)", (classroom_id, owner.id, now)),
        ])
        return await self.get(classroom_id)

    async def get(self, classroom_id: str) -> Classroom:
        row = await self._one("SELECT * FROM classrooms WHERE id = ?", classroom_id)
        if row is None:
            raise ClassroomError(404, "no such classroom")
        return _classroom(row)

    async def member_role(self, classroom_id: str, user_id: str) -> str | None:
        row = await self._one("SELECT role FROM classroom_members WHERE classroom_id = ? AND user_id = ?",
                              classroom_id, user_id)
        return None if row is None else row["role"]

    async def may_watch(self, viewer: User, classroom_id: str, student_id: str) -> bool:
        """Whether `viewer` instructs the classroom (an admin instructs every one) and
        `student_id` is one of its students: who may see that student's terminals."""
        if await self.member_role(classroom_id, student_id) != "student":
            return False
        return await self.role_of(viewer) == "admin" or await self.member_role(classroom_id, viewer.id) == "instructor"

    async def for_user(self, user_id: str) -> list[tuple[Classroom, str]]:
        rows = await self._all("SELECT c.*, m.role AS member_role FROM classrooms c JOIN classroom_members m"
                               " ON m.classroom_id = c.id WHERE m.user_id = ? ORDER BY c.created_at, c.id", user_id)
        return [(_classroom(r), r["member_role"]) for r in rows]

    async def all(self) -> list[Classroom]:
        return [_classroom(r) for r in await self._all("SELECT * FROM classrooms ORDER BY created_at, id")]

    async def rename(self, classroom_id: str, name: object) -> Classroom:
        await self.store.transaction([("UPDATE classrooms SET name = ? WHERE id = ?", (_name(name), classroom_id))])
        return await self.get(classroom_id)

    async def set_archived(self, classroom_id: str, archived: object) -> Classroom:
        if not isinstance(archived, bool):
            raise ClassroomError(400, "archived must be true or false")
        await self.store.transaction([("UPDATE classrooms SET archived = ? WHERE id = ?",
                                       (int(archived), classroom_id))])
        return await self.get(classroom_id)

    async def new_access_code(self, classroom_id: str) -> Classroom:
        await self.store.transaction([("UPDATE classrooms SET access_code = ? WHERE id = ?",
                                       (new_access_code(), classroom_id))])
        return await self.get(classroom_id)

    async def delete(self, classroom_id: str) -> None:
        """Its rows, then its files. Students keep the copies in their workspaces."""
        await self.store.transaction([
            ("DELETE FROM grade_runs WHERE assignment_id IN (SELECT id FROM assignments WHERE classroom_id = ?)",
             (classroom_id,)),
            ("DELETE FROM manual_scores WHERE assignment_id IN (SELECT id FROM assignments WHERE classroom_id = ?)",
             (classroom_id,)),
            ("DELETE FROM assignments WHERE classroom_id = ?", (classroom_id,)),
            ("DELETE FROM classroom_members WHERE classroom_id = ?", (classroom_id,)),
            ("DELETE FROM classrooms WHERE id = ?", (classroom_id,)),
        ])
        shutil.rmtree(self.files_dir / classroom_id, ignore_errors=True)

    async def by_code(self, code: object) -> Classroom:
        if not isinstance(code, str) or not code.strip():
            raise ClassroomError(400, "code is required")
        row = await self._one("SELECT * FROM classrooms WHERE access_code = ?", code.strip().upper())
        if row is None:
            raise ClassroomError(404, "no classroom has that access code")
        classroom = _classroom(row)
        if classroom.archived:
            raise ClassroomError(409, "that classroom is archived")
        return classroom

    async def join(self, user: User, code: object) -> Classroom:
        classroom = await self.by_code(code)
        await self.store.transaction([("INSERT INTO classroom_members VALUES (?, ?, 'student', ?)"
                                       " ON CONFLICT (classroom_id, user_id) DO NOTHING",
                                       (classroom.id, user.id, time.time()))])
        return classroom

    async def participants(self, classroom_id: str) -> list[dict]:
        return await self._all(
            "SELECT m.user_id, u.email, m.role, m.joined_at FROM classroom_members m JOIN users u ON u.id = m.user_id"
            " WHERE m.classroom_id = ? ORDER BY m.role, u.email", classroom_id)

    async def students(self, classroom_id: str) -> list[str]:
        rows = await self._all("SELECT user_id FROM classroom_members WHERE classroom_id = ? AND role = 'student'"
                               " ORDER BY user_id", classroom_id)
        return [r["user_id"] for r in rows]

    async def add_participant(self, classroom_id: str, email: object, role: object) -> dict:
        if role not in MEMBER_ROLES:
            raise ClassroomError(400, "role must be student or instructor")
        if not isinstance(email, str):
            raise ClassroomError(400, "email is required")
        user = await self._one("SELECT id FROM users WHERE lower(email) = ?", email.strip().lower())
        if user is None:
            raise ClassroomError(404, "no user with that address has signed in yet")
        await self.store.transaction([("INSERT INTO classroom_members VALUES (?, ?, ?, ?) ON CONFLICT"
                                       " (classroom_id, user_id) DO UPDATE SET role = excluded.role",
                                       (classroom_id, user["id"], role, time.time()))])
        return {"user_id": user["id"], "role": role}

    async def remove_participant(self, classroom: Classroom, user_id: str) -> None:
        if user_id == classroom.owner_id:
            raise ClassroomError(409, "the classroom's owner cannot be removed")
        rows = await self._all("DELETE FROM classroom_members WHERE classroom_id = ? AND user_id = ?"
                               " RETURNING user_id", classroom.id, user_id)
        if not rows:
            raise ClassroomError(404, "not a participant")

    # -- assignments ----------------------------------------------------------------------

    def assignment_dir(self, assignment: Assignment) -> Path:
        return self.files_dir / assignment.classroom_id / assignment.id

    async def create_assignment(self, classroom_id: str, body: dict) -> Assignment:
        name = _name(body.get("name"))
        starter = _text_files(body.get("files", {}), "files", MAX_STARTER_FILES)
        tests = _text_files(body.get("tests"), "tests", 20)
        if not all(TEST_FILE.fullmatch(p) for p in tests) or set(tests) <= {"conftest.py"}:
            raise ClassroomError(400, "tests must hold one or more test_*.py files and at most a "
                                      "conftest.py (no folders)")
        slug = _slug(name)
        if await self._one("SELECT id FROM assignments WHERE classroom_id = ? AND slug = ?", classroom_id, slug):
            raise ClassroomError(409, "this classroom has an assignment of that name")
        assignment = Assignment(f"a{secrets.token_hex(6)}", classroom_id, slug, name, False, None, time.time())
        folder = self.assignment_dir(assignment)
        # Written completely before the row exists: an assignment is never seen half-made.
        for sub, files in (("starter", starter), ("tests", tests)):
            for rel, data in files.items():
                target = folder / sub / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        (folder / "starter").mkdir(parents=True, exist_ok=True)
        try:
            await self.store.transaction([("INSERT INTO assignments VALUES (?, ?, ?, ?, 0, NULL, ?, 1)",
                                           (assignment.id, classroom_id, slug, name, assignment.created_at))])
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return assignment

    async def assignments(self, classroom_id: str, published_only: bool) -> list[Assignment]:
        rows = await self._all("SELECT * FROM assignments WHERE classroom_id = ? ORDER BY created_at, id",
                               classroom_id)
        return [a for a in map(_assignment, rows) if a.published or not published_only]

    async def assignment(self, classroom_id: str, assignment_id: str) -> Assignment:
        row = await self._one("SELECT * FROM assignments WHERE id = ? AND classroom_id = ?", assignment_id,
                              classroom_id)
        if row is None:
            raise ClassroomError(404, "no such assignment")
        return _assignment(row)

    async def publish(self, assignment: Assignment, due_at: object) -> Assignment:
        if due_at is not None and (not isinstance(due_at, int | float) or isinstance(due_at, bool) or due_at <= 0):
            raise ClassroomError(400, "due_at must be a Unix time in seconds, or null")
        await self.store.transaction([("UPDATE assignments SET published = 1, due_at = ? WHERE id = ?",
                                       (due_at, assignment.id))])
        return await self.assignment(assignment.classroom_id, assignment.id)

    async def set_weight(self, assignment: Assignment, weight: object) -> Assignment:
        if not isinstance(weight, int | float) or isinstance(weight, bool) or not 0 <= weight <= 1000:
            raise ClassroomError(400, "weight must be a number from 0 to 1000")
        await self.store.transaction([("UPDATE assignments SET weight = ? WHERE id = ?", (weight, assignment.id))])
        return await self.assignment(assignment.classroom_id, assignment.id)

    async def set_manual_score(self, assignment: Assignment, user_id: str, score: object, by: str) -> None:
        """A teacher's score for a student, over any run's; None removes it."""
        if score is None:
            await self.store.transaction([("DELETE FROM manual_scores WHERE assignment_id = ? AND user_id = ?",
                                           (assignment.id, user_id))])
            return
        if not isinstance(score, int | float) or isinstance(score, bool) or not 0 <= score <= 100:
            raise ClassroomError(400, "score must be a number from 0 to 100, or null")
        await self.store.transaction([("INSERT INTO manual_scores VALUES (?, ?, ?, ?, ?) ON CONFLICT"
                                       " (assignment_id, user_id) DO UPDATE SET score = excluded.score,"
                                       " set_by = excluded.set_by, set_at = excluded.set_at",
                                       (assignment.id, user_id, score, by, time.time()))])

    async def delete_assignment(self, assignment: Assignment) -> None:
        await self.store.transaction([("DELETE FROM grade_runs WHERE assignment_id = ?", (assignment.id,)),
                                      ("DELETE FROM manual_scores WHERE assignment_id = ?", (assignment.id,)),
                                      ("DELETE FROM assignments WHERE id = ?", (assignment.id,))])
        shutil.rmtree(self.assignment_dir(assignment), ignore_errors=True)

    def starter_files(self, assignment: Assignment) -> list[str]:
        root = self.assignment_dir(assignment) / "starter"
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def copy_to(self, assignments: list[Assignment], workspace: Workspace) -> list[str]:
        """Copy the starter files the workspace lacks; those already there stay as they are.

        All or nothing under the workspace quota (413 before anything is written). Blocking
        (file I/O): run it in an executor. Returns the paths written.
        """
        missing = [(a, rel) for a in assignments for rel in self.starter_files(a)
                   if not _exists(workspace, f"{a.folder}/{rel}")]
        workspace.check_room(sum(self._starter_bytes(a, [rel]) for a, rel in missing))
        for assignment, rel in missing:
            self._write_starter(assignment, workspace, rel, f"{assignment.folder}/{rel}")
        return [f"{a.folder}/{rel}" for a, rel in missing]

    def _starter_bytes(self, assignment: Assignment, files: list[str]) -> int:
        root = self.assignment_dir(assignment) / "starter"
        return sum((root / rel).stat().st_size for rel in files)

    def restore(self, assignment: Assignment, workspace: Workspace, path: str | None) -> list[dict]:
        """Starter versions back, for one file or all; the student's version is renamed to
        `<name>.backup-<time>` beside it first. Blocking: run it in an executor."""
        files = self.starter_files(assignment)
        if path is not None:
            rel = "/".join(starter_parts(path))
            if rel not in files:
                raise ClassroomError(404, "that file is not one of the assignment's starter files")
            files = [rel]
        stamp = time.strftime("%Y%m%d-%H%M%S")
        workspace.check_room(self._starter_bytes(assignment, files))  # the backups stay
        restored = []
        for rel in files:
            target = f"{assignment.folder}/{rel}"
            backup = None
            if _exists(workspace, target):
                backup = f"{target}{BACKUP_SUFFIX}{stamp}"
                workspace.move(target, backup, overwrite=True)
            self._write_starter(assignment, workspace, rel, target)
            restored.append({"path": target, "backup": backup})
        return restored

    def _write_starter(self, assignment: Assignment, workspace: Workspace, rel: str, target: str) -> None:
        data = (self.assignment_dir(assignment) / "starter" / rel).read_bytes()
        with workspace.open_writer(target, make_parents=True) as writer:
            writer.write(data)
            writer.commit()

    # -- grades ---------------------------------------------------------------------------

    async def record_run(self, assignment: Assignment, user_id: str, ran_by: str, result: dict) -> dict:
        run = {"id": secrets.token_hex(8), "assignment_id": assignment.id, "user_id": user_id, "ran_by": ran_by,
               "ran_at": time.time(), **result}
        await self.store.transaction([(
            "INSERT INTO grade_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (run["id"], assignment.id, user_id, ran_by, run["ran_at"], result["status"], result["passed"],
             result["failed"], result["score"], json.dumps(result["tests"]), result["output"]))])
        return run

    async def latest_runs(self, classroom_id: str, user_id: str | None = None) -> list[dict]:
        """The newest run per (assignment, student) of the classroom; one student's if given."""
        sql = ("SELECT g.* FROM grade_runs g JOIN assignments a ON a.id = g.assignment_id WHERE a.classroom_id = ?"
               " AND g.ran_at = (SELECT MAX(h.ran_at) FROM grade_runs h WHERE h.assignment_id = g.assignment_id"
               " AND h.user_id = g.user_id)")
        params: tuple = (classroom_id,)
        if user_id is not None:
            sql += " AND g.user_id = ?"
            params += (user_id,)
        rows = await self._all(sql + " ORDER BY g.ran_at", *params)
        return [row | {"tests": json.loads(row["tests"])} for row in rows]

    async def progress(self, classroom_id: str) -> dict:
        """The teacher's table: each student × each assignment, with the latest score (a manual
        score overrides it), and each student's `total`: the mean of the scores weighted by the
        assignments' weights (an assignment not yet scored counts 0)."""
        assignments = await self.assignments(classroom_id, published_only=False)
        members = [p for p in await self.participants(classroom_id) if p["role"] == "student"]
        latest = {(r["assignment_id"], r["user_id"]): r for r in await self.latest_runs(classroom_id)}
        manual = {(r["assignment_id"], r["user_id"]): r["score"] for r in await self._all(
            "SELECT s.* FROM manual_scores s JOIN assignments a ON a.id = s.assignment_id WHERE a.classroom_id = ?",
            classroom_id)}
        weights = sum(a.weight for a in assignments)
        rows = []
        for member in members:
            cells = {}
            for a in assignments:
                run = latest.get((a.id, member["user_id"])) or {}
                override = manual.get((a.id, member["user_id"]))
                cells[a.id] = {"status": run.get("status", "not run"), "passed": run.get("passed"),
                               "failed": run.get("failed"), "ran_at": run.get("ran_at"),
                               "run_score": run.get("score"), "manual_score": override,
                               "score": override if override is not None else run.get("score")}
            total = sum((cells[a.id]["score"] or 0.0) * a.weight for a in assignments) / weights if weights else None
            rows.append({"user_id": member["user_id"], "email": member["email"], "assignments": cells,
                         "total": None if total is None else round(total, 1)})
        return {"assignments": [a.to_json() for a in assignments], "students": rows}


def _exists(workspace: Workspace, rel: str) -> bool:
    try:
        workspace.read(rel)
    except WorkspaceError as exc:
        if exc.status == 404:
            return False
        raise
    return True


def _classroom(row: dict) -> Classroom:
    return Classroom(row["id"], row["name"], row["owner_id"], row["access_code"], bool(row["archived"]),
                     row["created_at"])


def _assignment(row: dict) -> Assignment:
    return Assignment(row["id"], row["classroom_id"], row["slug"], row["name"], bool(row["published"]),
                      row["due_at"], row["created_at"], row["weight"])
