"""The classroom API (`/classrooms/...`) and its admin side (`/admin/...`).

Each handler finds the caller's role and membership first (401, then 403 or 404) and only
then reads a body or touches a workspace. The model is in classrooms.py, test runs in
grading.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import io
import os
from pathlib import Path
from typing import Any

from ..classrooms import Assignment, Classroom, ClassroomError
from ..store import User
from ..workspace import MAX_LISTED_ENTRIES, WorkspaceError
from .base import BaseHandler, HTTPError

ASSIGNMENT_BODY_BYTES = 2 * 1024 * 1024
MAX_READ_BYTES = 1024 * 1024
ID = r"([^/]+)"  # looked up, never used as a path: any segment


class ClassroomBase(BaseHandler):
    user: User
    role: str

    async def prepare(self) -> None:
        super().prepare()
        self.user = await self.require_user()
        self.role = await self.services.classrooms.role_of(self.user)

    @property
    def model(self) -> Any:
        return self.services.classrooms

    def require_role(self, *roles: str) -> None:
        if self.role not in roles:
            raise HTTPError(403, f"only {' or '.join(roles)}s may do this")

    async def classroom_for(self, classroom_id: str, instructor: bool) -> tuple[Classroom, str]:
        """The classroom and the caller's part in it; 404 to outsiders (its existence is not told)."""
        classroom = await self.model.get(classroom_id)
        part = "instructor" if self.role == "admin" else await self.model.member_role(classroom_id, self.user.id)
        if part is None:
            raise HTTPError(404, "no such classroom")
        if instructor and part != "instructor":
            raise HTTPError(403, "only the classroom's instructors may do this")
        return classroom, part

    async def assignment_for(self, classroom_id: str, assignment_id: str,
                             instructor: bool) -> tuple[Classroom, Assignment, str]:
        classroom, part = await self.classroom_for(classroom_id, instructor)
        assignment = await self.model.assignment(classroom_id, assignment_id)
        if part != "instructor" and not assignment.published:
            raise HTTPError(404, "no such assignment")
        return classroom, assignment, part

    async def hand_out(self, assignments: list[Assignment], user_ids: list[str]) -> tuple[int, list[str]]:
        """Copy the assignments into each student's workspace: (files written, the students
        whose quota they would pass, who got none of them)."""
        def copy() -> tuple[int, list[str]]:
            count, over = 0, []
            for user_id in user_ids:
                try:
                    count += len(self.model.copy_to(assignments, self.services.workspaces.for_user(user_id)))
                except WorkspaceError as exc:
                    if exc.status != 413:
                        raise
                    over.append(user_id)
            return count, over

        result = await self.in_executor(copy)
        for user_id in user_ids:  # on the IOLoop: the watchers are its connections
            self.services.hub.files.changed(user_id)
        return result

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, ClassroomError):
            e = HTTPError(e.status, e.message)
        super()._handle_request_exception(e)

    def log_exception(self, typ, value, tb) -> None:  # noqa: ANN001 - tornado's signature
        if not isinstance(value, ClassroomError):
            super().log_exception(typ, value, tb)


# -- classrooms -------------------------------------------------------------------------


class ClassroomsHandler(ClassroomBase):
    async def get(self) -> None:
        mine = await self.model.for_user(self.user.id)
        self.answer({"role": self.role, "classrooms": [
            c.to_json(part == "instructor") | {"my_role": part} for c, part in mine]})

    async def post(self) -> None:
        self.require_role("teacher", "admin")
        classroom = await self.model.create(self.user, self.json_body().get("name"))
        self.answer(classroom.to_json(True), 201)


class JoinHandler(ClassroomBase):
    async def post(self) -> None:
        code = self.json_body().get("code")
        classroom = await self.model.by_code(code)
        before = await self.model.member_role(classroom.id, self.user.id)
        await self.model.join(self.user, code)
        if before is None:
            published = await self.model.assignments(classroom.id, published_only=True)
            _, over = await self.hand_out(published, [self.user.id])
            if over:  # not joined after all: nothing changed
                await self.model.remove_participant(classroom, self.user.id)
                raise HTTPError(413, "the classroom's assignments would pass your workspace quota")
        self.answer(classroom.to_json(False))


class TeacherSignupHandler(ClassroomBase):
    async def post(self) -> None:
        await self.model.redeem_teacher_code(self.user, self.json_body().get("code"))
        self.answer({"role": await self.model.role_of(self.user)})


class ClassroomHandler(ClassroomBase):
    async def get(self, classroom_id: str) -> None:
        classroom, part = await self.classroom_for(classroom_id, instructor=False)
        self.answer(classroom.to_json(part == "instructor") | {"my_role": part})

    async def delete(self, classroom_id: str) -> None:
        classroom, _ = await self.classroom_for(classroom_id, instructor=True)
        if classroom.owner_id != self.user.id and self.role != "admin":
            raise HTTPError(403, "only the classroom's owner may delete it")
        await self.model.delete(classroom.id)
        self.answer({"success": True})


class RenameHandler(ClassroomBase):
    async def post(self, classroom_id: str) -> None:
        await self.classroom_for(classroom_id, instructor=True)
        self.answer((await self.model.rename(classroom_id, self.json_body().get("name"))).to_json(True))


class ArchiveHandler(ClassroomBase):
    async def post(self, classroom_id: str) -> None:
        await self.classroom_for(classroom_id, instructor=True)
        archived = self.json_body().get("archived", True)
        self.answer((await self.model.set_archived(classroom_id, archived)).to_json(True))


class AccessCodeHandler(ClassroomBase):
    async def post(self, classroom_id: str) -> None:
        await self.classroom_for(classroom_id, instructor=True)
        self.answer((await self.model.new_access_code(classroom_id)).to_json(True))


class ParticipantsHandler(ClassroomBase):
    async def get(self, classroom_id: str) -> None:
        await self.classroom_for(classroom_id, instructor=True)
        self.answer({"participants": await self.model.participants(classroom_id)})

    async def post(self, classroom_id: str) -> None:
        await self.classroom_for(classroom_id, instructor=True)
        body = self.json_body()
        added = await self.model.add_participant(classroom_id, body.get("email"), body.get("role", "student"))
        over: list[str] = []
        if added["role"] == "student":
            _, over = await self.hand_out(await self.model.assignments(classroom_id, published_only=True),
                                          [added["user_id"]])
        self.answer(added | {"over_quota": bool(over)}, 201)


class ParticipantHandler(ClassroomBase):
    async def delete(self, classroom_id: str, user_id: str) -> None:
        classroom, _ = await self.classroom_for(classroom_id, instructor=True)
        await self.model.remove_participant(classroom, user_id)
        self.answer({"success": True})


# -- assignments ------------------------------------------------------------------------


class AssignmentsHandler(ClassroomBase):
    def check_body_length(self) -> None:
        pass  # judged in prepare, once the caller is known

    async def prepare(self) -> None:
        self.request.connection.set_max_body_size(self.max_body_bytes)
        self.check_origin_for_unsafe_method()
        self.user = await self.require_user()
        self.role = await self.services.classrooms.role_of(self.user)
        if self.request.method == "POST":
            await self.classroom_for(self.path_args[0], instructor=True)
            self.allow_body(ASSIGNMENT_BODY_BYTES)
        else:
            self.allow_body(self.max_body_bytes)

    async def get(self, classroom_id: str) -> None:
        _, part = await self.classroom_for(classroom_id, instructor=False)
        assignments = await self.model.assignments(classroom_id, published_only=part != "instructor")
        self.answer({"assignments": [a.to_json() for a in assignments]})

    async def post(self, classroom_id: str) -> None:
        assignment = await self.model.create_assignment(classroom_id, self.json_body())
        self.answer(assignment.to_json() | {"files": self.model.starter_files(assignment)}, 201)


class AssignmentHandler(ClassroomBase):
    async def get(self, classroom_id: str, assignment_id: str) -> None:
        _, assignment, part = await self.assignment_for(classroom_id, assignment_id, instructor=False)
        answer = assignment.to_json() | {"files": self.model.starter_files(assignment)}
        if part == "instructor":
            answer["tests"] = sorted(p.name for p in (self.model.assignment_dir(assignment) / "tests").glob("*.py"))
        self.answer(answer)

    async def delete(self, classroom_id: str, assignment_id: str) -> None:
        _, assignment, _ = await self.assignment_for(classroom_id, assignment_id, instructor=True)
        await self.model.delete_assignment(assignment)
        self.answer({"success": True})


class PublishHandler(ClassroomBase):
    async def post(self, classroom_id: str, assignment_id: str) -> None:
        _, assignment, _ = await self.assignment_for(classroom_id, assignment_id, instructor=True)
        assignment = await self.model.publish(assignment, self.json_body().get("due_at"))
        students = await self.model.students(classroom_id)
        written, over = await self.hand_out([assignment], students)
        self.answer(assignment.to_json() | {"students": len(students), "files_written": written, "over_quota": over})


class WeightHandler(ClassroomBase):
    async def post(self, classroom_id: str, assignment_id: str) -> None:
        _, assignment, _ = await self.assignment_for(classroom_id, assignment_id, instructor=True)
        self.answer((await self.model.set_weight(assignment, self.json_body().get("weight"))).to_json())


class ManualScoreHandler(ClassroomBase):
    async def post(self, classroom_id: str, assignment_id: str, user_id: str) -> None:
        _, assignment, _ = await self.assignment_for(classroom_id, assignment_id, instructor=True)
        if await self.model.member_role(classroom_id, user_id) != "student":
            raise HTTPError(404, "not a student of this classroom")
        score = self.json_body().get("score")
        await self.model.set_manual_score(assignment, user_id, score, self.user.id)
        self.answer({"user_id": user_id, "assignment_id": assignment.id, "manual_score": score})


class RestoreHandler(ClassroomBase):
    async def post(self, classroom_id: str, assignment_id: str) -> None:
        _, assignment, part = await self.assignment_for(classroom_id, assignment_id, instructor=False)
        if part != "student":
            raise HTTPError(403, "only the classroom's students restore their own copy")
        path = self.json_body().get("path")
        if path is not None and not isinstance(path, str):
            raise HTTPError(400, "path must be a starter file's path, or absent for all")
        workspaces, user_id = self.services.workspaces, self.user.id
        restored = await self.in_executor(lambda: self.model.restore(assignment, workspaces.for_user(user_id), path))
        self.services.hub.files.changed(user_id)
        self.answer({"restored": restored})


class RunHandler(ClassroomBase):
    async def post(self, classroom_id: str, assignment_id: str) -> None:
        _, assignment, part = await self.assignment_for(classroom_id, assignment_id, instructor=False)
        body = self.json_body()
        if part == "student":
            if body.get("user_id", self.user.id) != self.user.id or body.get("all"):
                raise HTTPError(403, "a student runs the tests of their own work only")
            targets = [self.user.id]
        elif body.get("all") is True:
            targets = await self.model.students(classroom_id)
        else:
            user_id = body.get("user_id")
            if not isinstance(user_id, str) or await self.model.member_role(classroom_id, user_id) != "student":
                raise HTTPError(400, "user_id must be a student of this classroom (or all: true)")
            targets = [user_id]
        runs = await asyncio.gather(*(self.run_for(assignment, user_id) for user_id in targets))
        self.answer({"runs": list(runs)})

    async def run_for(self, assignment: Assignment, user_id: str) -> dict:
        workspace = await self.in_executor(self.services.workspaces.for_user, user_id)
        result = await self.services.grader.run(assignment, workspace)
        return await self.model.record_run(assignment, user_id, self.user.id, result)


class ResultsHandler(ClassroomBase):
    async def get(self, classroom_id: str, assignment_id: str) -> None:
        _, assignment, part = await self.assignment_for(classroom_id, assignment_id, instructor=False)
        runs = await self.model.latest_runs(classroom_id, None if part == "instructor" else self.user.id)
        self.answer({"results": [r for r in runs if r["assignment_id"] == assignment.id]})


class ProgressHandler(ClassroomBase):
    async def get(self, classroom_id: str) -> None:
        await self.classroom_for(classroom_id, instructor=True)
        progress = await self.model.progress(classroom_id)
        if self.get_argument("format", "json") != "csv":
            self.answer(progress)
            return
        self.set_header("Content-Type", "text/csv; charset=utf-8")
        self.set_header("Content-Disposition", f'attachment; filename="{classroom_id}-progress.csv"')
        self.finish(progress_csv(progress))


def progress_csv(progress: dict) -> str:
    """One row per student, one score column per assignment (empty: never run)."""
    out = io.StringIO()
    writer = csv.writer(out)
    assignments = progress["assignments"]
    writer.writerow(["email", "user_id", *(_cell(a["name"]) for a in assignments), "total"])
    for row in progress["students"]:
        scores = [row["assignments"][a["id"]]["score"] for a in assignments] + [row["total"]]
        writer.writerow([_cell(row["email"]), row["user_id"], *("" if s is None else s for s in scores)])
    return out.getvalue()


def _cell(text: str) -> str:
    """No formula in a spreadsheet from a value a user chose."""
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


class StudentFilesHandler(ClassroomBase):
    """An instructor's read-only look at one student's copy: the listing, or one file."""

    async def get(self, classroom_id: str, assignment_id: str, user_id: str) -> None:
        _, assignment, _ = await self.assignment_for(classroom_id, assignment_id, instructor=True)
        if await self.model.member_role(classroom_id, user_id) != "student":
            raise HTTPError(404, "not a student of this classroom")
        path = self.get_argument("path", None)

        def look() -> dict:
            workspace = self.services.workspaces.for_user(user_id)
            prefix = assignment.folder + "/"
            if path is None:
                return {"files": [f[len(prefix):] for f in workspace.list_files() if f.startswith(prefix)]
                        [:MAX_LISTED_ENTRIES]}
            info = workspace.read(prefix + path)
            if info.size > MAX_READ_BYTES:
                raise HTTPError(413, f"files larger than {MAX_READ_BYTES} bytes are not shown here")
            with info.open() as file:
                data = file.read(MAX_READ_BYTES)
            return {"path": path, "size": info.size, "content_base64": base64.b64encode(data).decode()}

        self.answer(await self.in_executor(look))


class StudentTabsHandler(ClassroomBase):
    """An instructor's look at which terminal tabs a student has (to watch one)."""

    async def get(self, classroom_id: str, user_id: str) -> None:
        await self.classroom_for(classroom_id, instructor=True)
        student = await self.services.store.get_user(user_id)
        if student is None or await self.model.member_role(classroom_id, user_id) != "student":
            raise HTTPError(404, "not a student of this classroom")
        self.answer({"tabs": student.tabs, "active_tab": student.active_tab})


# -- admin ------------------------------------------------------------------------------


class AdminBase(ClassroomBase):
    async def prepare(self) -> None:
        await super().prepare()
        self.require_role("admin")


class AdminUsersHandler(AdminBase):
    async def get(self) -> None:
        users = await self.services.store.list_users()
        roles = [await self.model.role_of(u) for u in users]
        self.answer({"users": [u.to_json() | {"role": r} for u, r in zip(users, roles, strict=True)]})


class AdminRoleHandler(AdminBase):
    async def post(self, user_id: str) -> None:
        role = self.json_body().get("role")
        await self.model.set_role(user_id, role)
        self.answer({"user_id": user_id, "role": role})


class AdminUserHandler(AdminBase):
    async def delete(self, user_id: str) -> None:
        """Container, workspace and rows, in that order; again, it finds nothing and succeeds."""
        if user_id == self.user.id:
            raise HTTPError(409, "an admin cannot delete themselves")
        # Their cookies first: a request in the meantime would make the workspace again.
        await self.services.store.revoke_user(user_id, self.services.tokens.lifetime_seconds)
        record = await self.services.store.get_user(user_id)
        ref = self.services.user_ref(record) if record is not None else None
        for terminal in self.services.hub.terminals_of(user_id):
            await self.services.hub.close(terminal)
        if ref is not None:
            await self.services.backend.remove_user(ref)
        await self.in_executor(self.services.workspaces.remove, user_id)
        await self.model.delete_user_rows(user_id)
        self.answer({"success": True, "existed": record is not None})


class AllowlistHandler(AdminBase):
    async def get(self) -> None:
        self.answer({"allowlist": await self.model.allowlist()})

    async def post(self) -> None:
        await self.model.allow_teacher(self.json_body().get("email"), self.user.id)
        self.answer({"allowlist": await self.model.allowlist()}, 201)


class AllowlistEntryHandler(AdminBase):
    async def delete(self, email: str) -> None:
        if not await self.model.disallow_teacher(email):
            raise HTTPError(404, "that address is not on the allowlist")
        self.answer({"success": True})


class TeacherCodesHandler(AdminBase):
    async def post(self) -> None:
        body = self.json_body()
        code = await self.model.new_teacher_code(self.user.id, body.get("max_uses", 1),
                                                 body.get("expires_in_hours", 72))
        self.answer(code, 201)


class AdminStatsHandler(AdminBase):
    async def get(self) -> None:
        users = await self.services.store.list_users()
        roles = [await self.model.role_of(u) for u in users]
        base = self.services.settings.workspaces_dir
        sizes = await self.in_executor(lambda: {u.id: folder_bytes(base / u.id) for u in users})
        terminals = self.services.hub.metrics()
        backend = self.services.backend.metrics()
        grader = self.services.grader
        self.answer({
            "users": {"total": len(users), **{role: roles.count(role) for role in ("admin", "teacher", "student")}},
            "classrooms": len(await self.model.all()),
            "containers": {"backend": self.services.backend.name,
                           "running": backend.get("running_containers", 0)},
            "terminals": {"open": terminals["open_terminals"], "users": terminals["terminal_users"]},
            "grading": {"running": grader.running, "peak": grader.peak,
                        "concurrency": self.services.settings.grading_concurrency},
            "workspaces": [{"user_id": u.id, "email": u.email, "bytes": sizes[u.id]} for u in users],
        })


def folder_bytes(root: Path, limit: int = 200_000) -> int:
    """The bytes of files under `root`, links not followed, at most `limit` entries counted."""
    total, seen = 0, 0
    for folder, dirs, files in os.walk(root):  # os.walk follows no link by default
        seen += len(dirs) + len(files)
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
        if seen >= limit:
            break
    return total


class AdminClassroomsHandler(AdminBase):
    async def get(self) -> None:
        self.answer({"classrooms": [c.to_json(True) for c in await self.model.all()]})


def classroom_routes() -> list[tuple[str, type]]:
    c, a = rf"/classrooms/{ID}", rf"/classrooms/{ID}/assignments/{ID}"
    return [
        (r"/classrooms", ClassroomsHandler),
        (r"/classrooms/join", JoinHandler),
        (r"/classrooms/teacher-signup", TeacherSignupHandler),
        (c, ClassroomHandler),
        (f"{c}/rename", RenameHandler),
        (f"{c}/archive", ArchiveHandler),
        (f"{c}/access-code", AccessCodeHandler),
        (f"{c}/participants", ParticipantsHandler),
        (rf"{c}/participants/{ID}", ParticipantHandler),
        (f"{c}/assignments", AssignmentsHandler),
        (f"{c}/progress", ProgressHandler),
        (a, AssignmentHandler),
        (f"{a}/publish", PublishHandler),
        (f"{a}/restore", RestoreHandler),
        (f"{a}/weight", WeightHandler),
        (rf"{a}/scores/{ID}", ManualScoreHandler),
        (f"{a}/run", RunHandler),
        (f"{a}/results", ResultsHandler),
        (rf"{a}/files/{ID}", StudentFilesHandler),
        (rf"{c}/students/{ID}/tabs", StudentTabsHandler),
        (r"/admin/users", AdminUsersHandler),
        (rf"/admin/users/{ID}", AdminUserHandler),
        (rf"/admin/users/{ID}/role", AdminRoleHandler),
        (r"/admin/teacher-allowlist", AllowlistHandler),
        (r"/admin/teacher-allowlist/([^/]+)", AllowlistEntryHandler),
        (r"/admin/teacher-codes", TeacherCodesHandler),
        (r"/admin/classrooms", AdminClassroomsHandler),
        (r"/admin/stats", AdminStatsHandler),
    ]
