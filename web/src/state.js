// Pure logic of the page, without the DOM, so that node --test can check it:
// the reconnect schedule, the tab list, and the file tree built from /list-files.

/** Delay before reconnect attempt `attempt` (0-based): doubling from `base`, capped, with jitter. */
export function backoffDelay(attempt, { base = 500, max = 15000, jitter = 0.2, random = Math.random } = {}) {
  const plain = Math.min(max, base * 2 ** Math.min(attempt, 30));
  return Math.round(plain * (1 - jitter + 2 * jitter * random()));
}

/** Whether a socket closed with `code` should be reopened by itself. 1000: the shell ended. */
export function shouldReconnect(code) {
  return code !== 1000;
}

const TAB_ID = /^[A-Za-z0-9]{1,32}$/;
export const MAX_TABS = 50;

/** Tab state: {tabs: [{id, label}], active}. Labels live in the browser; ids in the server. */
export function tabsFromServer(answer, labels = {}) {
  const ids = (answer && Array.isArray(answer.tabs) ? answer.tabs : []).filter((id) => TAB_ID.test(id));
  const tabs = (ids.length ? ids : ['1']).map((id) => ({ id, label: labels[id] || `Terminal ${id}` }));
  const active = tabs.some((t) => t.id === answer?.active_tab) ? answer.active_tab : tabs[0].id;
  return { tabs, active };
}

/** The body for POST /tabs. */
export function tabsToServer(state) {
  return { tabs: state.tabs.map((t) => t.id), active_tab: state.active };
}

export function nextTabId(state) {
  const numbers = state.tabs.map((t) => Number(t.id)).filter(Number.isInteger);
  return String(Math.max(0, ...numbers) + 1);
}

export function addTab(state) {
  if (state.tabs.length >= MAX_TABS) return state;
  const id = nextTabId(state);
  return { tabs: [...state.tabs, { id, label: `Terminal ${id}` }], active: id };
}

/** Closing the last tab leaves a fresh one: the server keeps at least one. */
export function closeTab(state, id) {
  const index = state.tabs.findIndex((t) => t.id === id);
  if (index < 0) return state;
  const tabs = state.tabs.filter((t) => t.id !== id);
  if (!tabs.length) {
    const fresh = nextTabId(state);
    return { tabs: [{ id: fresh, label: `Terminal ${fresh}` }], active: fresh };
  }
  const active = state.active === id ? tabs[Math.min(index, tabs.length - 1)].id : state.active;
  return { tabs, active };
}

export function renameTab(state, id, label) {
  const clean = String(label).trim().slice(0, 40);
  if (!clean) return state;
  return { ...state, tabs: state.tabs.map((t) => (t.id === id ? { ...t, label: clean } : t)) };
}

export function labelsOf(state) {
  return Object.fromEntries(state.tabs.map((t) => [t.id, t.label]));
}

/** A nested tree from /list-files' flat, sorted list (folders end in '/'). */
export function buildTree(paths) {
  const root = { name: '', path: '', folder: true, children: new Map() };
  for (const entry of paths) {
    const folder = entry.endsWith('/');
    const parts = entry.split('/').filter(Boolean);
    let node = root;
    parts.forEach((name, i) => {
      const last = i === parts.length - 1;
      const path = parts.slice(0, i + 1).join('/') + (last && !folder ? '' : '/');
      if (!node.children.has(name)) {
        node.children.set(name, { name, path, folder: !last || folder, children: new Map() });
      }
      node = node.children.get(name);
    });
  }
  return root;
}

/** Children in display order: folders first, then by name. */
export function sortedChildren(node) {
  return [...node.children.values()].sort(
    (a, b) => (b.folder - a.folder) || a.name.localeCompare(b.name));
}

/** The folder a new entry goes in when `path` is selected ('' is the root). */
export function folderOf(path) {
  if (!path || path.endsWith('/')) return path || '';
  const cut = path.lastIndexOf('/');
  return cut < 0 ? '' : path.slice(0, cut + 1);
}

export function baseName(path) {
  const parts = path.split('/').filter(Boolean);
  return parts[parts.length - 1] || '';
}

/** Where dropping `source` on folder `target` moves it, or null when that makes no sense. */
export function moveTarget(source, target) {
  const destination = target + baseName(source) + (source.endsWith('/') ? '/' : '');
  if (destination === source || target.startsWith(source)) return null;
  return destination.replace(/\/$/, '');
}

/** The editor's language for a file name. */
export function languageFor(name) {
  const ext = name.toLowerCase().split('.').pop();
  return {
    py: 'python', js: 'javascript', mjs: 'javascript', cjs: 'javascript', jsx: 'javascript',
    ts: 'typescript', tsx: 'typescript', html: 'html', htm: 'html', css: 'css', json: 'json',
    md: 'markdown', markdown: 'markdown',
  }[ext] || null;
}

/** A score (0–100 or null) as the class pages show it. */
export function scoreText(score) {
  return score === null || score === undefined ? '–' : `${Number(score).toFixed(1).replace(/\.0$/, '')} %`;
}

/** A due date (unix seconds or null) as the pages show it, in the browser's time zone. */
export function dueText(dueAt, locale = undefined) {
  if (!dueAt) return 'no due date';
  return `due ${new Date(dueAt * 1000).toLocaleString(locale, { dateStyle: 'medium', timeStyle: 'short' })}`;
}

/** The teacher's progress table from GET /classrooms/{id}/progress: a header and one row per student. */
export function progressTable(progress) {
  const assignments = progress?.assignments || [];
  const header = ['Student', ...assignments.map((a) => a.name), 'Total'];
  const rows = (progress?.students || []).map((student) => [
    student.email,
    ...assignments.map((a) => {
      const cell = student.assignments?.[a.id];
      return cell && cell.score !== null && cell.score !== undefined ? scoreText(cell.score) : (cell?.status || 'not run');
    }),
    scoreText(student.total),
  ]);
  return { header, rows };
}

/** The hidden-test outcomes of one run as one line: "3 passed, 1 failed". */
export function runSummary(run) {
  if (!run) return 'not run yet';
  if (run.status !== 'done') return `${run.status}: ${scoreText(run.score)}`;
  return `${scoreText(run.score)}: ${run.passed} passed, ${run.failed} failed`;
}
