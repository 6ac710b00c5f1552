// The workspace page: who is signed in, the file tree, the editor, the terminals and the classes.

import '@xterm/xterm/css/xterm.css';
import './app.css';
import { api } from './api.js';
import { Classes } from './classes.js';
import { Editor } from './editor.js';
import { FileTree } from './files.js';
import { Terminals } from './terminals.js';

const $ = (selector) => document.querySelector(selector);

function toSignIn() {
  location.assign('/sign-in');
}

async function main() {
  let me;
  try {
    me = await api.me();
  } catch (error) {
    if (error.status === 401) return toSignIn();
    $('#user').textContent = `server unavailable: ${error.message}`;
    return;
  }
  $('#user').textContent = me.email;
  $('#ports').textContent = `ports ${me.port_start}–${me.port_end}`;
  $('#sign-out').onclick = async () => {
    await api.logout().catch(() => {});
    toSignIn();
  };

  const editor = new Editor({
    host: $('#editor'), title: $('#editor-title'), status: $('#editor-status'),
    saveButton: $('#save'), pane: $('#editor-pane'),
  });
  const files = new FileTree({
    tree: $('#tree'), toolbar: $('#file-toolbar'), progress: $('#upload-progress'), message: $('#file-message'),
    onOpen: (path) => editor.open(path),
    onMoved: (source, destination) => editor.moved(source, destination),
    onDeleted: (path) => editor.deleted(path),
  });
  new Classes({ dialog: $('#classes'), openButton: $('#open-classes'), onFilesChanged: () => files.changed() });
  const terminals = new Terminals({
    bar: $('#tabs'), host: $('#terminals'), status: $('#connection'),
    onFilesChanged: () => files.changed(),
    onUnauthorized: toSignIn,
  });

  // Alt+1/2/3 move between the three areas: the terminal keeps Tab for itself.
  document.addEventListener('keydown', (event) => {
    if (!event.altKey || event.ctrlKey || event.metaKey) return;
    const target = {
      1: () => ($('#tree .entry[aria-selected="true"]') || $('#tree .entry') || $('#file-toolbar button')).focus(),
      2: () => editor.focus(),
      3: () => terminals.focus(),
    }[event.key];
    if (target) {
      event.preventDefault();
      target();
    }
  }, true);

  await Promise.all([files.refresh(), terminals.start()]);
  terminals.focus();
}

main();
