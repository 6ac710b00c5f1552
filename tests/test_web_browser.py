"""The web workspace at `/` in a real browser (Debian's chromium, headless, via Playwright)
against a real server process: sign in, terminals, files, editor, restart and reconnect.

Firefox is not installed on the test machines, so only Chromium is driven here."""

from __future__ import annotations

import io
import re
import time
import zipfile

import pytest

from .web_browser import body_json, browser_page, require_browser, running_server, session_cookie

PROMPT = re.compile(r"[$#] *$", re.MULTILINE)


@pytest.fixture(autouse=True)
def _browser_available() -> None:
    require_browser()


def screen(page, tab: str):  # noqa: ANN001, ANN201
    return page.locator(f"#terminal-{tab} .xterm-rows")


def sign_in(page, base_url: str, email: str = "student@example.com") -> None:  # noqa: ANN001
    from playwright.sync_api import expect

    page.goto(base_url + "/")
    expect(page).to_have_url(base_url + "/sign-in")
    page.fill("#email", email)
    page.keyboard.press("Enter")  # the form is keyboard-reachable: Enter submits it
    expect(page).to_have_url(base_url + "/")
    expect(page.locator("#user")).to_have_text(email)


def run_in_terminal(page, tab: str, command: str) -> None:  # noqa: ANN001
    page.locator(f'.tab-label[data-tab="{tab}"]').click()
    page.locator(f"#terminal-{tab} .xterm-helper-textarea").focus()
    page.keyboard.type(command)
    page.keyboard.press("Enter")


def drag_onto(page, source: str, target: str) -> None:
    """Drag one tree row onto another through the page's own drag-and-drop events (one
    DataTransfer from dragstart to drop), which the tree handles exactly as a person's drag;
    Chromium's synthesized mouse gesture starts no drag now and then. `dragend` goes to the
    dragged row itself, as a browser's does: once the move is done the tree may have been
    drawn again without it."""
    transfer = page.evaluate_handle("() => new DataTransfer()")
    dragged = page.locator(source).element_handle()
    dragged.dispatch_event("dragstart", {"dataTransfer": transfer})
    page.dispatch_event(target, "dragenter", {"dataTransfer": transfer})
    page.dispatch_event(target, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(target, "drop", {"dataTransfer": transfer})
    dragged.dispatch_event("dragend", {"dataTransfer": transfer})


@pytest.mark.parametrize("backend", ["local", pytest.param("docker", marks=pytest.mark.docker)])
def test_workspace_terminals_files_and_editor(backend, tmp_path) -> None:
    from playwright.sync_api import expect

    with running_server(backend) as server, browser_page(f"workspace-{backend}") as (page, steps):
        started = time.monotonic()
        sign_in(page, server.base_url)
        if backend == "docker":  # the new user's container is being made: the page says so
            expect(page.locator("#connection")).to_contain_text("starting", timeout=10_000)
        expect(screen(page, "1")).to_contain_text(PROMPT, timeout=60_000)
        print(f"{backend}: sign-in to first prompt {time.monotonic() - started:.2f} s")
        expect(page.locator("#connection")).to_have_text("connected")
        steps.step("first prompt")

        # Two tabs, each running a command.
        page.get_by_role("button", name="New terminal").click()
        expect(screen(page, "2")).to_contain_text(PROMPT, timeout=30_000)
        for tab in ("1", "2"):
            run_in_terminal(page, tab, "echo hi-$((6*7))")
            expect(screen(page, tab)).to_contain_text("hi-42")
        steps.step("two tabs")

        # Resize: the shell sees the new width.
        run_in_terminal(page, "2", "echo cols=$(tput cols)")
        expect(screen(page, "2")).to_contain_text(re.compile(r"cols=\d+"))
        wide = int(re.findall(r"cols=(\d+)", screen(page, "2").inner_text())[-1])
        page.set_viewport_size({"width": 800, "height": 700})
        time.sleep(0.5)  # the fit happens on the next frame, the resize frame follows
        run_in_terminal(page, "2", "echo narrow=$(tput cols)")
        expect(screen(page, "2")).to_contain_text(re.compile(r"narrow=\d+"))
        narrow = int(re.findall(r"narrow=(\d+)", screen(page, "2").inner_text())[-1])
        assert narrow < wide, (narrow, wide)
        page.set_viewport_size({"width": 1280, "height": 800})
        run_in_terminal(page, "2", "echo hi-$((6*7))")
        steps.step("resized")

        # Rename a tab; reload: both tabs come back, with their names and screens.
        steps.prompt = "build"
        page.locator('.tab-label[data-tab="2"]').dblclick()
        expect(page.locator('.tab-label[data-tab="2"]')).to_have_text("build")
        started = time.monotonic()
        page.reload()
        expect(screen(page, "2")).to_contain_text(PROMPT, timeout=30_000)
        print(f"{backend}: reload to first prompt, warm: {time.monotonic() - started:.2f} s")
        expect(page.locator(".tab-label")).to_have_text(["Terminal 1", "build"])
        expect(page.locator('.tab-label[data-tab="2"]')).to_have_attribute("aria-selected", "true")
        expect(screen(page, "2")).to_contain_text("hi-42", timeout=30_000)
        page.locator('.tab-label[data-tab="1"]').click()
        expect(screen(page, "1")).to_contain_text("hi-42", timeout=30_000)
        steps.step("reloaded")

        # The tree follows the terminal, by files-changed events (no polling).
        run_in_terminal(page, "1", "mkdir -p proj && touch proj/made-in-terminal.txt")
        page.locator('.entry[data-path="proj/"]').click()
        expect(page.locator('.entry[data-path="proj/made-in-terminal.txt"]')).to_be_visible()
        steps.step("tree after touch")

        # Upload through the picker, into the selected folder.
        upload = tmp_path / "notes.py"
        upload.write_text("print('uploaded')\n")
        page.locator("#pick-files").set_input_files(str(upload))
        expect(page.locator('.entry[data-path="proj/notes.py"]')).to_be_visible()
        expect(page.locator("#file-message")).to_have_text("uploaded 1 file")
        steps.step("uploaded")

        # Open, edit, save with Ctrl-S; read it back through the API.
        page.locator('.entry[data-path="proj/notes.py"]').click()
        expect(page.locator("#editor-title")).to_have_text("proj/notes.py")
        expect(page.locator(".cm-content")).to_contain_text("print('uploaded')")
        expect(page.locator(".cm-content .tok-keyword, .cm-content span[class]").first).to_be_visible()
        page.locator(".cm-content").click()
        page.keyboard.press("Control+End")
        page.keyboard.type("x = 42\n")
        expect(page.locator("#editor-title")).to_have_text("proj/notes.py ●")
        page.keyboard.press("Control+s")
        expect(page.locator("#editor-title")).to_have_text("proj/notes.py")
        cookie = session_cookie(page)
        status, body = server.api("/file/proj/notes.py", cookie)
        assert (status, body) == (200, b"print('uploaded')\nx = 42\n")
        steps.step("saved")

        # A failed save says so and keeps the marker: the folder went away underneath.
        run_in_terminal(page, "1", "rm -r proj")
        expect(page.locator('.entry[data-path="proj/"]')).to_have_count(0)
        page.locator(".cm-content").click()
        page.keyboard.type("y = 1\n")
        page.keyboard.press("Control+s")
        expect(page.locator("#editor-status")).to_contain_text("Not saved")
        expect(page.locator("#editor-title")).to_contain_text("●")
        steps.step("save failed")

        # Create, rename, move by drag and drop, download a folder as a zip, delete.
        steps.prompt = "lib"
        page.locator('[data-action="new-folder"]').click()
        expect(page.locator('.entry[data-path="lib/"]')).to_be_visible()
        steps.prompt = "main.py"
        page.locator('.entry[data-path="lib/"]').click()  # select and open it
        page.locator('[data-action="new-file"]').click()
        expect(page.locator("#editor-title")).to_have_text("lib/main.py")
        page.locator(".cm-content").click()
        page.keyboard.type("print('main')")
        page.keyboard.press("Control+s")
        expect(page.locator("#editor-title")).to_have_text("lib/main.py")
        steps.prompt = "app.py"
        page.locator('.entry[data-path="lib/main.py"]').click()
        page.locator('[data-action="rename"]').click()
        expect(page.locator('.entry[data-path="lib/app.py"]')).to_be_visible()
        expect(page.locator("#editor-title")).to_have_text("lib/app.py")
        steps.prompt = "dest"
        page.locator('[data-action="new-folder"]').click()  # inside lib/, the selection's folder
        expect(page.locator('.entry[data-path="lib/dest/"]')).to_be_visible()
        drag_onto(page, '.entry[data-path="lib/app.py"]', '.entry[data-path="lib/dest/"]')
        page.locator('.entry[data-path="lib/dest/"]').click()
        expect(page.locator('.entry[data-path="lib/dest/app.py"]')).to_be_visible()
        steps.step("moved")

        page.locator('.entry[data-path="lib/"]').click()
        with page.expect_download() as download_info:
            page.locator('[data-action="download"]').click()
        download = download_info.value
        assert download.suggested_filename == "lib.zip"
        with zipfile.ZipFile(io.BytesIO(open(download.path(), "rb").read())) as archive:
            assert archive.read("dest/app.py") == b"print('main')"

        page.locator('.entry[data-path="lib/"]').click()
        page.locator('[data-action="delete"]').click()  # confirm() is accepted
        expect(page.locator('.entry[data-path="lib/"]')).to_have_count(0)
        assert not [f for f in body_json(server.api("/list-files", cookie)[1])["files"] if f.startswith("lib")]
        steps.step("deleted")


def test_a_tab_reconnects_by_itself_after_a_server_restart() -> None:
    from playwright.sync_api import expect

    with running_server("local") as server, browser_page("reconnect") as (page, steps):
        sign_in(page, server.base_url)
        expect(screen(page, "1")).to_contain_text(PROMPT, timeout=30_000)
        run_in_terminal(page, "1", "export MARK=still-$((40+2))")
        steps.step("before restart")

        server.stop()
        expect(page.locator("#connection")).to_contain_text("offline")
        steps.step("server down")
        server.start()
        expect(page.locator("#connection")).to_have_text("connected", timeout=30_000)
        run_in_terminal(page, "1", 'echo "mark=$MARK"')
        expect(screen(page, "1")).to_contain_text("mark=still-42")  # the same shell
        steps.step("reconnected")


def sign_out(page) -> None:  # noqa: ANN001
    if page.locator("#classes").is_visible():
        page.locator("#classes-close").click()
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/sign-in")


@pytest.mark.docker
def test_a_teacher_hands_out_an_assignment_and_a_student_runs_its_tests() -> None:
    """The class pages: a teacher creates a classroom and an assignment and publishes it, a
    student joins by the code and runs the hidden tests (a real grading container), and the
    teacher's progress table shows the score and a read-only view of the student's terminal."""
    from playwright.sync_api import expect

    env = {"ADMIN_EMAILS": "teacher@example.com", "GRADING_TIMEOUT_SECONDS": "60"}
    with running_server("local", env) as server, browser_page("classes") as (page, steps):
        sign_in(page, server.base_url, "teacher@example.com")
        page.get_by_role("button", name="Classes").click()
        page.get_by_label("New classroom").fill("Intro CS")
        page.get_by_label("New classroom").press("Enter")
        detail = page.locator("#class-detail")
        expect(detail.locator("h3")).to_have_text("Intro CS")
        code = detail.locator(".access-code").inner_text()
        assert re.fullmatch(r"[A-Z2-9]{8}", code), code
        detail.get_by_text("New assignment").click()
        detail.get_by_label("Name").fill("Add two")
        detail.get_by_label("Starter files").set_input_files(
            [{"name": "solution.py", "mimeType": "text/x-python", "buffer": b"def add(a, b):\n    return None\n"}])
        detail.get_by_label("Hidden tests").set_input_files([{"name": "test_add.py", "mimeType": "text/x-python",
            "buffer": b"from solution import add\n\ndef test_add():\n    assert add(2, 3) == 5\n\n"
                      b"def test_zero():\n    assert add(0, 0) == 0\n"}])
        detail.get_by_role("button", name="Add assignment").click()
        detail.get_by_role("button", name="Publish").click()
        expect(page.locator("#classes-message")).to_have_text("Published to 0 student(s).")
        steps.step("published")
        sign_out(page)

        sign_in(page, server.base_url, "student@example.com")
        page.get_by_role("button", name="Classes").click()
        page.get_by_label("Join with a code").fill(code.lower())
        page.get_by_label("Join with a code").press("Enter")
        assignment = detail.locator(".assignment")
        expect(assignment.locator("h4")).to_have_text("Add two")
        expect(assignment.locator(".summary")).to_have_text("not run yet")
        folder = re.search(r"in (classrooms/\S+)/", assignment.inner_text()).group(1)
        expect(page.locator('#tree .entry[data-path="classrooms/"]')).to_have_count(1)  # the copy is there
        status, _ = server.api(f"/file/{folder}/solution.py", session_cookie(page), "PUT",
                               b"def add(a, b):\n    return a + b\n")
        assert status in (200, 201)
        assignment.get_by_role("button", name="Run tests").click()
        expect(assignment.locator(".summary")).to_have_text("100 %: 2 passed, 0 failed", timeout=90_000)
        expect(assignment.locator('.outcomes [data-outcome="passed"]')).to_have_count(2)
        steps.step("graded")
        page.locator("#classes-close").click()
        run_in_terminal(page, "1", "echo watched-$((6*7))")
        expect(screen(page, "1")).to_contain_text("watched-42")
        sign_out(page)

        sign_in(page, server.base_url, "teacher@example.com")
        page.get_by_role("button", name="Classes").click()
        page.get_by_role("button", name="Intro CS").click()
        row = detail.locator("table.progress tbody tr")
        expect(row).to_have_count(1)
        expect(row.locator("th")).to_have_text("student@example.com")
        expect(row.locator("td")).to_have_text(["100 %", "100 %", "Watch"])
        steps.step("progress")
        row.get_by_role("button", name="Watch the terminal of student@example.com").click()
        watch = page.locator("#watch")
        expect(watch).to_contain_text("student@example.com, tab 1 (read-only)")
        expect(watch.locator(".xterm-rows")).to_contain_text("watched-42", timeout=30_000)
        steps.step("watching")


def test_the_sign_in_page_and_a_signed_out_workspace() -> None:
    from playwright.sync_api import expect

    with running_server("local") as server, browser_page("sign-in") as (page, steps):
        page.goto(server.base_url + "/")
        expect(page).to_have_url(server.base_url + "/sign-in")
        expect(page.get_by_label("Email")).to_be_focused()
        steps.step("sign-in page")
        sign_in(page, server.base_url)
        page.get_by_role("button", name="Sign out").click()
        expect(page).to_have_url(server.base_url + "/sign-in")
        page.goto(server.base_url + "/")
        expect(page).to_have_url(server.base_url + "/sign-in")


def test_keyboard_only_at_200_percent_zoom() -> None:
    from playwright.sync_api import expect

    with running_server("local") as server, browser_page("keyboard-zoom", zoom=2) as (page, steps):
        sign_in(page, server.base_url)
        expect(screen(page, "1")).to_contain_text(PROMPT, timeout=30_000)
        steps.step("200 % zoom")
        width = page.viewport_size["width"]
        for control in ('[data-action="new-file"]', '[data-action="download"]', ".tab-new", "#sign-out",
                        "#terminal-1"):
            box = page.locator(control).bounding_box()
            assert box is not None and box["width"] > 0 and box["x"] + box["width"] <= width + 1, (control, box)

        # Alt+1: the files; Tab walks the toolbar; Enter on "New file" asks for a name.
        page.keyboard.press("Alt+1")
        expect(page.locator('[data-action="new-file"]')).to_be_focused()
        steps.prompt = "kb.txt"
        page.keyboard.press("Enter")
        expect(page.locator("#editor-title")).to_have_text("kb.txt")
        page.keyboard.type("typed")  # the new file's editor has the focus
        page.keyboard.press("Control+s")
        expect(page.locator("#editor-title")).to_have_text("kb.txt")
        assert server.api("/file/kb.txt", session_cookie(page))[1] == b"typed"
        # Alt+3: the terminal, which keeps Tab for completion.
        page.keyboard.press("Alt+3")
        page.keyboard.type("echo kb-$((1+1))")
        page.keyboard.press("Enter")
        expect(screen(page, "1")).to_contain_text("kb-2")
        # Alt+1 then arrows reach the tree's entries.
        page.keyboard.press("Alt+1")
        expect(page.locator('.entry[data-path="kb.txt"]')).to_be_focused()
        steps.step("keyboard")


def test_drop_files_on_a_folder_and_copy_paste_in_the_terminal() -> None:
    from playwright.sync_api import expect

    with running_server("local") as server, browser_page("drop-and-clipboard") as (page, steps):
        page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.base_url)
        sign_in(page, server.base_url)
        expect(screen(page, "1")).to_contain_text(PROMPT, timeout=30_000)
        steps.prompt = "inbox"
        page.locator('[data-action="new-folder"]').click()
        folder = page.locator('.entry[data-path="inbox/"]')
        expect(folder).to_be_visible()

        # A drop from the desktop: a DataTransfer holding two files, dropped on the folder.
        transfer = page.evaluate_handle("""() => {
            const transfer = new DataTransfer();
            transfer.items.add(new File(['one'], 'one.txt', {type: 'text/plain'}));
            transfer.items.add(new File(['two'], 'two.txt', {type: 'text/plain'}));
            return transfer;
        }""")
        folder.dispatch_event("dragover", {"dataTransfer": transfer})
        folder.dispatch_event("drop", {"dataTransfer": transfer})
        expect(page.locator("#file-message")).to_have_text("uploaded 2 files")
        cookie = session_cookie(page)
        assert server.api("/file/inbox/two.txt", cookie) == (200, b"two")
        steps.step("dropped")

        # Copy a word of output (double-click selects it), paste it into the command line.
        run_in_terminal(page, "1", "echo paste-$((3*3))")
        expect(screen(page, "1")).to_contain_text("paste-9")
        word = screen(page, "1").get_by_text("paste-9", exact=True).bounding_box()
        page.mouse.dblclick(word["x"] + 3, word["y"] + word["height"] / 2)  # the rows take no events
        page.keyboard.press("Control+Shift+C")
        page.keyboard.type("echo got-")
        page.keyboard.press("Control+Shift+V")
        page.keyboard.press("Enter")
        expect(screen(page, "1")).to_contain_text("got-paste-9")
        steps.step("pasted")
