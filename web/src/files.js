// The file tree: listed from /list-files, refreshed when the server says files changed.
// A selection (click or keyboard) is what the toolbar's actions act on.

import { api, filePath, upload } from './api.js';
import { baseName, buildTree, folderOf, moveTarget, sortedChildren } from './state.js';

const DRAG_TYPE = 'application/x-3compute-path';

export class FileTree {
  constructor({ tree, toolbar, progress, message, onOpen, onMoved, onDeleted }) {
    this.treeElement = tree;
    this.progress = progress;
    this.message = message;
    this.onOpen = onOpen;
    this.onMoved = onMoved;
    this.onDeleted = onDeleted;
    this.expanded = new Set();
    this.selected = '';
    this.paths = [];
    this.refreshing = null;
    this.again = false;
    this.wire(toolbar);
    this.dropTarget(tree, () => '');
  }

  wire(toolbar) {
    const actions = {
      'new-file': () => this.createEntry(false),
      'new-folder': () => this.createEntry(true),
      rename: () => this.renameSelected(),
      delete: () => this.deleteSelected(),
      download: () => this.download(),
      'upload-files': () => toolbar.querySelector('#pick-files').click(),
      'upload-folder': () => toolbar.querySelector('#pick-folder').click(),
    };
    for (const [name, action] of Object.entries(actions)) {
      toolbar.querySelector(`[data-action="${name}"]`).onclick = action;
    }
    for (const id of ['#pick-files', '#pick-folder']) {
      const input = toolbar.querySelector(id);
      input.onchange = () => {
        const entries = [...input.files].map((file) => ({ file, name: file.webkitRelativePath || file.name }));
        input.value = '';
        this.upload(entries, folderOf(this.selected));
      };
    }
  }

  say(text, isError = false) {
    this.message.textContent = text;
    this.message.classList.toggle('error', isError);
  }

  /** Refresh now; calls arriving during a refresh make exactly one more. */
  async refresh() {
    if (this.refreshing) {
      this.again = true;
      return this.refreshing;
    }
    this.refreshing = (async () => {
      do {
        this.again = false;
        try {
          this.paths = (await api.listFiles()).files;
          this.render();
        } catch (error) {
          this.say(`files not listed: ${error.message}`, true);
        }
      } while (this.again);
      this.refreshing = null;
    })();
    return this.refreshing;
  }

  /** From a files-changed event: several in a row (one per tab) make one refresh. */
  changed() {
    clearTimeout(this.changedTimer);
    this.changedTimer = setTimeout(() => this.refresh(), 50);
  }

  render() {
    // A drag from the tree must keep its rows: a refresh arriving meanwhile (a files-changed
    // event) is drawn when the drag ends.
    if (this.dragging) {
      this.renderLater = true;
      return;
    }
    const known = new Set(this.paths);
    if (this.selected && !known.has(this.selected)) this.selected = '';
    const focused = document.activeElement?.dataset?.path;
    const list = this.renderFolder(buildTree(this.paths), 1);
    list.setAttribute('role', 'tree');
    list.setAttribute('aria-label', 'Files');
    this.treeElement.replaceChildren(list);
    if (!this.paths.length) {
      const empty = document.createElement('p');
      empty.className = 'empty';
      empty.textContent = 'No files yet: create one, or drop files here.';
      this.treeElement.append(empty);
    }
    if (focused) this.treeElement.querySelector(`[data-path="${CSS.escape(focused)}"]`)?.focus();
  }

  renderFolder(node, level) {
    const list = document.createElement('ul');
    if (level > 1) list.setAttribute('role', 'group');
    for (const child of sortedChildren(node)) {
      const item = document.createElement('li');
      item.setAttribute('role', 'none');
      item.append(this.row(child, level));
      if (child.folder && this.expanded.has(child.path)) item.append(this.renderFolder(child, level + 1));
      list.append(item);
    }
    return list;
  }

  row(node, level) {
    const row = document.createElement('button');
    row.className = 'entry ' + (node.folder ? 'folder' : 'file');
    row.setAttribute('role', 'treeitem');
    row.setAttribute('aria-level', String(level));
    row.setAttribute('aria-selected', String(node.path === this.selected));
    if (node.folder) row.setAttribute('aria-expanded', String(this.expanded.has(node.path)));
    row.dataset.path = node.path;
    row.style.paddingLeft = `${0.5 + (level - 1) * 1}rem`;
    row.draggable = true;
    const icon = document.createElement('span');
    icon.className = 'icon';
    icon.setAttribute('aria-hidden', 'true');
    icon.textContent = node.folder ? (this.expanded.has(node.path) ? '▾ ' : '▸ ') : '· ';
    row.append(icon, node.name);
    row.onclick = () => this.activate(node);
    row.onkeydown = (event) => this.key(event, node);
    row.ondragstart = (event) => {
      event.dataTransfer.setData(DRAG_TYPE, node.path);
      event.dataTransfer.effectAllowed = 'move';
      this.dragging = true;
    };
    row.ondragend = () => {
      this.dragging = false;
      if (this.renderLater) {
        this.renderLater = false;
        this.render();
      }
    };
    if (node.folder) this.dropTarget(row, () => node.path);
    return row;
  }

  activate(node) {
    this.selected = node.path;
    if (node.folder) {
      if (this.expanded.has(node.path)) this.expanded.delete(node.path);
      else this.expanded.add(node.path);
    } else {
      this.onOpen(node.path);
    }
    this.render();
  }

  key(event, node) {
    const rows = [...this.treeElement.querySelectorAll('.entry')];
    const index = rows.indexOf(event.currentTarget);
    const go = (i) => rows[Math.max(0, Math.min(rows.length - 1, i))]?.focus();
    const actions = {
      ArrowDown: () => go(index + 1),
      ArrowUp: () => go(index - 1),
      ArrowRight: () => node.folder && !this.expanded.has(node.path) && this.activate(node),
      ArrowLeft: () => node.folder && this.expanded.has(node.path) && this.activate(node),
      F2: () => { this.selected = node.path; this.renameSelected(); },
      Delete: () => { this.selected = node.path; this.deleteSelected(); },
    };
    if (actions[event.key]) {
      event.preventDefault();
      actions[event.key]();
    }
  }

  /** Dropping on `element`: a tree entry moves there, files from outside are uploaded there. */
  dropTarget(element, folder) {
    element.addEventListener('dragover', (event) => {
      event.preventDefault();
      event.stopPropagation();
      element.classList.add('drop');
      event.dataTransfer.dropEffect = event.dataTransfer.types.includes(DRAG_TYPE) ? 'move' : 'copy';
    });
    element.addEventListener('dragleave', () => element.classList.remove('drop'));
    element.addEventListener('drop', async (event) => {
      event.preventDefault();
      event.stopPropagation();
      element.classList.remove('drop');
      const source = event.dataTransfer.getData(DRAG_TYPE);
      if (source) {
        this.dragging = false;  // the drag is over here even if its row's dragend never comes
        await this.move(source, folder());
        return;
      }
      const entries = await droppedFiles(event.dataTransfer);
      if (entries.length) await this.upload(entries, folder());
    });
  }

  async move(source, folder) {
    const destination = moveTarget(source, folder);
    if (destination === null) return;
    try {
      await api.move(source.replace(/\/$/, ''), destination);
      this.onMoved(source, destination + (source.endsWith('/') ? '/' : ''));
      this.say(`moved ${baseName(source)} to ${folder || 'the top folder'}`);
    } catch (error) {
      this.say(`not moved: ${error.message}`, true);
    }
    await this.refresh();
  }

  async upload(entries, folder) {
    this.progress.hidden = false;
    this.progress.value = 0;
    this.say(`uploading ${entries.length} file${entries.length === 1 ? '' : 's'}…`);
    try {
      await upload(entries, folder, (part) => { this.progress.value = part; });
      this.progress.value = 1;
      this.say(`uploaded ${entries.length} file${entries.length === 1 ? '' : 's'}`);
    } catch (error) {
      this.say(`upload failed: ${error.message}`, true);
    } finally {
      setTimeout(() => { this.progress.hidden = true; }, 800);
    }
    await this.refresh();
  }

  async createEntry(folder) {
    const where = folderOf(this.selected);
    const name = prompt(`New ${folder ? 'folder' : 'file'} in /${where}`);
    if (!name || !name.trim()) return;
    const path = where + name.trim().replace(/^\/+/, '');
    try {
      await api.create(folder ? path.replace(/\/?$/, '/') : path);
      if (where) this.expanded.add(where);
      this.selected = folder ? path.replace(/\/?$/, '/') : path;
      if (!folder) this.onOpen(path);
    } catch (error) {
      this.say(`not created: ${error.message}`, true);
    }
    await this.refresh();
  }

  async renameSelected() {
    const source = this.selected;
    if (!source) return this.say('select a file or folder first', true);
    const name = prompt(`Rename ${baseName(source)} to`, baseName(source));
    if (!name || !name.trim() || name.trim() === baseName(source)) return;
    const destination = folderOf(source.replace(/\/$/, '')) + name.trim();
    try {
      await api.move(source.replace(/\/$/, ''), destination);
      this.selected = destination + (source.endsWith('/') ? '/' : '');
      this.onMoved(source, this.selected);
    } catch (error) {
      this.say(`not renamed: ${error.message}`, true);
    }
    await this.refresh();
  }

  async deleteSelected() {
    const path = this.selected;
    if (!path) return this.say('select a file or folder first', true);
    const what = path.endsWith('/') ? `the folder ${path} and everything in it` : path;
    if (!confirm(`Delete ${what}? This cannot be undone.`)) return;
    try {
      await api.remove(path.replace(/\/$/, ''));
      this.onDeleted(path);
      this.selected = '';
      this.say(`deleted ${baseName(path)}`);
    } catch (error) {
      this.say(`not deleted: ${error.message}`, true);
    }
    await this.refresh();
  }

  download() {
    const link = document.createElement('a');
    link.href = `/download/${filePath(this.selected.replace(/\/$/, ''))}`;
    link.download = '';
    document.body.append(link);
    link.click();
    link.remove();
  }
}

/** Files (and, through webkitGetAsEntry, whole folders) dropped from the desktop. */
async function droppedFiles(transfer) {
  const roots = [...(transfer.items || [])].map((item) => item.webkitGetAsEntry?.()).filter(Boolean);
  if (!roots.length) return [...transfer.files].map((file) => ({ file, name: file.name }));
  const found = [];
  const walk = async (entry, prefix) => {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      found.push({ file, name: prefix + entry.name });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!batch.length) break;
        for (const child of batch) await walk(child, `${prefix}${entry.name}/`);
      }
    }
  };
  for (const root of roots) await walk(root, '');
  return found;
}
