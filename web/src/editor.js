// The editor: CodeMirror 6, one file at a time, saved with Ctrl/Cmd-S through PUT /file/.
// Language support is loaded on demand (a separate chunk per language).

import { EditorView, basicSetup } from 'codemirror';
import { Compartment, EditorState } from '@codemirror/state';
import { keymap } from '@codemirror/view';
import { oneDark } from '@codemirror/theme-one-dark';
import { api } from './api.js';
import { languageFor } from './state.js';

const LANGUAGES = {
  python: () => import('@codemirror/lang-python').then((m) => m.python()),
  javascript: () => import('@codemirror/lang-javascript').then((m) => m.javascript()),
  typescript: () => import('@codemirror/lang-javascript').then((m) => m.javascript({ typescript: true })),
  html: () => import('@codemirror/lang-html').then((m) => m.html()),
  css: () => import('@codemirror/lang-css').then((m) => m.css()),
  json: () => import('@codemirror/lang-json').then((m) => m.json()),
  markdown: () => import('@codemirror/lang-markdown').then((m) => m.markdown()),
};

const MAX_EDIT_BYTES = 5 * 1024 * 1024; // a browser tab stays responsive below this

export class Editor {
  constructor({ host, title, status, saveButton, pane }) {
    this.title = title;
    this.status = status;
    this.pane = pane;
    this.path = null;
    this.savedText = '';
    this.language = new Compartment();
    this.view = new EditorView({
      parent: host,
      state: this.freshState(''),
    });
    saveButton.onclick = () => this.save();
    window.addEventListener('beforeunload', (event) => {
      if (this.dirty()) event.preventDefault();
    });
  }

  freshState(text) {
    return EditorState.create({
      doc: text,
      extensions: [
        keymap.of([{ key: 'Mod-s', preventDefault: true, run: () => { this.save(); return true; } }]),
        basicSetup,
        oneDark,
        this.language.of([]),
        EditorView.updateListener.of((update) => update.docChanged && this.renderTitle()),
        EditorView.contentAttributes.of({ 'aria-label': 'File contents' }),
      ],
    });
  }

  dirty() {
    return this.path !== null && this.view.state.doc.toString() !== this.savedText;
  }

  async open(path) {
    if (path === this.path) return this.view.focus();
    if (this.dirty() && !confirm(`${this.path} has unsaved changes. Discard them?`)) return;
    let text;
    try {
      const response = await api.read(path);
      if (!(response.headers.get('Content-Type') || '').startsWith('text/plain')) {
        this.say(`${path} is not a text file: download it instead`, true);
        return;
      }
      if (Number(response.headers.get('Content-Length')) > MAX_EDIT_BYTES) {
        this.say(`${path} is too large to edit here: use the terminal, or download it`, true);
        return;
      }
      text = await response.text();
    } catch (error) {
      this.say(`${path} not opened: ${error.message}`, true);
      return;
    }
    this.path = path;
    this.savedText = text;
    this.view.setState(this.freshState(text));
    this.pane.hidden = false;
    this.say('');
    this.renderTitle();
    const loader = LANGUAGES[languageFor(path)];
    if (loader) {
      const support = await loader();
      if (this.path === path) this.view.dispatch({ effects: this.language.reconfigure(support) });
    }
    this.view.focus();
  }

  async save() {
    if (this.path === null) return;
    const path = this.path;
    const text = this.view.state.doc.toString();
    this.say('saving…');
    try {
      await api.save(path, text);
    } catch (error) {
      this.say(`Not saved: ${error.message}. Your changes are still here.`, true);
      return;
    }
    if (this.path !== path) return;
    this.savedText = text;
    this.say(`saved ${new Date().toLocaleTimeString()}`);
    this.renderTitle();
  }

  /** A file was moved or renamed in the tree: follow it. */
  moved(source, destination) {
    if (this.path === null) return;
    if (this.path === source) this.path = destination;
    else if (source.endsWith('/') && this.path.startsWith(source)) this.path = destination + this.path.slice(source.length);
    this.renderTitle();
  }

  deleted(path) {
    if (this.path !== null && (this.path === path || (path.endsWith('/') && this.path.startsWith(path)))) {
      this.say(`${this.path} was deleted; saving creates it again`, true);
    }
  }

  renderTitle() {
    const dirty = this.dirty();
    this.title.textContent = (this.path ?? 'No file open') + (dirty ? ' ●' : '');
    this.title.dataset.dirty = String(dirty);
    this.title.title = dirty ? 'unsaved changes' : '';
    document.title = `${dirty ? '● ' : ''}${this.path ? `${this.path} · ` : ''}3Compute`;
  }

  say(text, isError = false) {
    this.status.textContent = text;
    this.status.classList.toggle('error', isError);
    this.status.setAttribute('role', isError ? 'alert' : 'status');
  }

  focus() {
    if (this.path !== null) this.view.focus();
  }
}
