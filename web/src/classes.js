// The class pages, in a dialog over the workspace: join a classroom by its code; a student's
// assignments, their test runs and results; a teacher's classrooms, assignments (create,
// publish, run the tests for the class), the class progress table, and a read-only view of a
// student's terminal.

import { api } from './api.js';
import { dueText, progressTable, runSummary } from './state.js';
import { TerminalWatch } from './watch.js';

/** An element with attributes (`on*` become listeners) and children (strings become text). */
function el(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name.startsWith('on')) element.addEventListener(name.slice(2), value);
    else if (value !== false && value !== null && value !== undefined) element.setAttribute(name, value === true ? '' : value);
  }
  element.append(...children.filter((child) => child !== null && child !== undefined && child !== false));
  return element;
}

/** The files picked in an <input type=file> as {relative path: text}. */
async function filesAsText(input) {
  const entries = await Promise.all([...input.files].map(async (file) => {
    const name = file.webkitRelativePath ? file.webkitRelativePath.split('/').slice(1).join('/') : file.name;
    return [name, await file.text()];
  }));
  return Object.fromEntries(entries);
}

/** A form's control by name (a control named `name` would shadow the form's own property). */
const field = (form, name) => form.elements.namedItem(name);

export class Classes {
  constructor({ dialog, openButton, onFilesChanged }) {
    this.dialog = dialog;
    this.list = dialog.querySelector('#class-list');
    this.detail = dialog.querySelector('#class-detail');
    this.message = dialog.querySelector('#classes-message');
    this.onFilesChanged = onFilesChanged;
    this.current = null;
    this.watch = null;
    dialog.addEventListener('close', () => this.stopWatching());
    openButton.onclick = () => this.open();
    dialog.querySelector('#classes-close').onclick = () => dialog.close();
    dialog.querySelector('#join-form').onsubmit = (event) => this.submit(event, (form) => this.join(field(form, 'code').value));
    dialog.querySelector('#new-class-form').onsubmit = (event) =>
      this.submit(event, (form) => this.create(field(form, 'name').value));
  }

  say(text, isError = false) {
    this.message.textContent = text;
    this.message.classList.toggle('error', isError);
  }

  /** Run a form's action, saying what went wrong instead of throwing. */
  async submit(event, action) {
    event.preventDefault();
    const form = event.target;
    try {
      await action(form);
      form.reset();
    } catch (error) {
      this.say(error.message, true);
    }
  }

  async guarded(action) {
    try {
      await action();
    } catch (error) {
      this.say(error.message, true);
    }
  }

  async open() {
    if (!this.dialog.open) this.dialog.showModal();
    this.say('');
    await this.guarded(() => this.loadList());
  }

  async loadList() {
    const { role, classrooms } = await api.classrooms();
    this.dialog.querySelector('#new-class-form').hidden = role === 'student';
    this.list.replaceChildren(...(classrooms.length ? classrooms.map((room) => el('li', {},
      el('button', { type: 'button', class: 'class-link', 'data-room': room.id,
        onclick: () => this.guarded(() => this.show(room)) }, room.name, room.archived ? ' (archived)' : ''))) :
      [el('li', { class: 'empty' }, 'No classrooms yet.')]));
    const again = classrooms.find((room) => room.id === this.current?.id);
    if (again) await this.show(again);
  }

  async join(code) {
    const room = await api.join(code.trim());
    this.say(`Joined ${room.name}.`);
    this.onFilesChanged();
    this.current = room;
    await this.loadList();
  }

  async create(name) {
    this.current = await api.createClassroom(name.trim());
    this.say(`Created ${this.current.name}.`);
    await this.loadList();
  }

  async show(room) {
    this.stopWatching();
    this.current = room;
    for (const link of this.list.querySelectorAll('.class-link')) {
      if (link.dataset.room === room.id) link.setAttribute('aria-current', 'true');
      else link.removeAttribute('aria-current');
    }
    const { assignments } = await api.assignments(room.id);
    const view = room.my_role === 'instructor' ? await this.teacherView(room, assignments)
      : await this.studentView(room, assignments);
    this.detail.replaceChildren(el('h3', {}, room.name), ...view);
  }

  async studentView(room, assignments) {
    if (!assignments.length) return [el('p', { class: 'empty' }, 'No assignments yet.')];
    const results = await Promise.all(assignments.map((a) => api.results(room.id, a.id)));
    return assignments.map((assignment, index) => {
      const run = results[index].results[0];
      return el('article', { class: 'assignment', 'data-assignment': assignment.id },
        el('h4', {}, assignment.name),
        el('p', { class: 'dim' }, `${dueText(assignment.due_at)} · in ${assignment.folder}/`),
        el('div', { class: 'row' },
          el('button', { type: 'button', onclick: (event) => this.run(event.target, room, assignment, {}) }, 'Run tests'),
          el('button', { type: 'button', onclick: () => this.restore(room, assignment) }, 'Restore starter files')),
        this.runView(run));
    });
  }

  runView(run) {
    return el('div', { class: 'run', role: 'status' },
      el('p', { class: 'summary' }, runSummary(run)),
      run ? el('ul', { class: 'outcomes' }, ...run.tests.map((test) =>
        el('li', { 'data-outcome': test.outcome }, `${test.outcome} ${test.name}`))) : null,
      run?.output ? el('details', {}, el('summary', {}, 'Output'), el('pre', {}, run.output)) : null);
  }

  async run(button, room, assignment, body) {
    button.disabled = true;
    const previous = button.textContent;
    button.textContent = 'Running…';
    try {
      const { runs } = await api.runTests(room.id, assignment.id, body);
      this.say(body.all ? `Ran the tests for ${runs.length} student(s).` : runSummary(runs[0]));
      await this.show(room);
    } catch (error) {
      this.say(error.message, true);
    } finally {
      button.disabled = false;
      button.textContent = previous;
    }
  }

  async restore(room, assignment) {
    if (!confirm(`Restore the starter files of ${assignment.name}? Your versions are kept as backups.`)) return;
    await this.guarded(async () => {
      const { restored } = await api.restore(room.id, assignment.id);
      this.say(`Restored ${restored.length} file(s).`);
      this.onFilesChanged();
    });
  }

  async teacherView(room, assignments) {
    const progress = await api.progress(room.id);
    const { header, rows } = progressTable(progress);
    return [
      el('p', {}, 'Access code ', el('code', { class: 'access-code' }, room.access_code || ''), ' ',
        el('button', { type: 'button', onclick: () => this.guarded(async () => this.show(await api.newAccessCode(room.id))) },
          'New code')),
      el('h4', {}, 'Assignments'),
      assignments.length ? el('ul', { class: 'assignments' }, ...assignments.map((assignment) =>
        el('li', { 'data-assignment': assignment.id }, el('span', {}, assignment.name), ' ',
          el('span', { class: 'dim' }, assignment.published ? dueText(assignment.due_at) : 'not published'), ' ',
          assignment.published ? null : el('button', { type: 'button',
            onclick: () => this.guarded(async () => {
              const answer = await api.publish(room.id, assignment.id);
              this.say(`Published to ${answer.students} student(s).`);
              await this.show(room);
            }) }, 'Publish'),
          assignment.published ? el('button', { type: 'button',
            onclick: (event) => this.run(event.target, room, assignment, { all: true }) }, 'Run tests for the class') : null)))
        : el('p', { class: 'empty' }, 'No assignments yet.'),
      this.newAssignmentForm(room),
      el('h4', {}, 'Progress ', el('a', { href: `/classrooms/${room.id}/progress?format=csv`, download: '' }, 'CSV')),
      el('table', { class: 'progress' },
        el('thead', {}, el('tr', {}, ...header.map((name) => el('th', { scope: 'col' }, name)),
          el('th', { scope: 'col' }, 'Terminal'))),
        el('tbody', {}, ...rows.map((row, index) => el('tr', {}, el('th', { scope: 'row' }, row[0]),
          ...row.slice(1).map((cell) => el('td', {}, cell)),
          el('td', {}, el('button', { type: 'button', 'aria-label': `Watch the terminal of ${row[0]}`,
            onclick: () => this.guarded(() => this.startWatching(room, progress.students[index])) }, 'Watch')))))),
      el('section', { id: 'watch', class: 'watch', 'aria-label': 'Student terminal, read-only', hidden: true }),
    ];
  }

  /** The student's current tab, read-only, under the progress table. */
  async startWatching(room, student) {
    this.stopWatching();
    const { active_tab: tabId } = await api.studentTabs(room.id, student.user_id);
    const section = this.detail.querySelector('#watch');
    section.hidden = false;
    section.replaceChildren(el('div', { class: 'row' },
      el('span', {}, `${student.email}, tab ${tabId} (read-only)`),
      el('button', { type: 'button', onclick: () => this.stopWatching() }, 'Stop watching')));
    this.watch = new TerminalWatch(section, { classroomId: room.id, userId: student.user_id, tabId });
  }

  stopWatching() {
    this.watch?.dispose();
    this.watch = null;
    const section = this.detail.querySelector('#watch');
    if (section) {
      section.hidden = true;
      section.replaceChildren();
    }
  }

  newAssignmentForm(room) {
    const form = el('form', { class: 'new-assignment' },
      el('label', {}, 'Name ', el('input', { name: 'name', required: true, maxlength: 100 })),
      el('label', {}, 'Starter files ', el('input', { name: 'files', type: 'file', multiple: true })),
      el('label', {}, 'Hidden tests ', el('input', { name: 'tests', type: 'file', multiple: true, accept: '.py', required: true })),
      el('button', { type: 'submit' }, 'Add assignment'));
    form.onsubmit = (event) => this.submit(event, async () => {
      const body = { name: field(form, 'name').value.trim(), files: await filesAsText(field(form, 'files')),
        tests: await filesAsText(field(form, 'tests')) };
      const assignment = await api.createAssignment(room.id, body);
      this.say(`Added ${assignment.name}; publish it to hand it out.`);
      await this.show(room);
    });
    return el('details', {}, el('summary', {}, 'New assignment'), form);
  }
}
