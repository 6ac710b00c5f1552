// Terminal tabs: one xterm.js view and one /terminal/ws connection per tab, kept open while
// the page is, so switching tabs is instant. Each connection reconnects by itself (the tmux
// session is still there) with a growing delay.

import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import { api } from './api.js';
import {
  addTab, backoffDelay, closeTab, labelsOf, renameTab, shouldReconnect, tabsFromServer, tabsToServer,
} from './state.js';

const LABELS_KEY = '3compute.tabLabels';
const STARTING_NOTICE_MS = 800;

function socketUrl(tabId) {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}/terminal/ws?tabId=${encodeURIComponent(tabId)}&events=files-changed`;
}

/** An xterm.js view with the page's look, opened in `element` and fitted to it. */
export function openXterm(element, options = {}) {
  const term = new Terminal({
    cursorBlink: true,
    fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace',
    fontSize: 14,
    scrollback: 5000,
    theme: { background: '#1e1e1e' },
    ...options,
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(element);
  return { term, fit };
}

/** A server frame from a WebSocket message; null for one that is not JSON. */
export function parseFrame(data) {
  try {
    return JSON.parse(data);
  } catch {
    return null;
  }
}

/** One tab: its view, its connection and that connection's state. */
class TerminalTab {
  constructor(id, host, { onState, onFilesChanged, onUnauthorized }) {
    this.id = id;
    this.onState = onState;
    this.onFilesChanged = onFilesChanged;
    this.onUnauthorized = onUnauthorized;
    this.attempt = 0;
    this.state = 'connecting';
    this.disposed = false;
    this.element = document.createElement('div');
    this.element.className = 'terminal';
    this.element.id = `terminal-${id}`;
    this.element.setAttribute('role', 'tabpanel');
    this.element.dataset.tab = id;
    host.append(this.element);
    ({ term: this.term, fit: this.fit } = openXterm(this.element));
    this.term.attachCustomKeyEventHandler((event) => this.key(event));
    this.term.onData((data) => this.input(data));
    this.term.onResize(({ rows, cols }) => this.send({ type: 'resize', data: { rows, cols } }));
    this.connect();
  }

  /** Ctrl+Shift+C / Ctrl+Shift+V copy and paste; Alt+digits belong to the page. */
  key(event) {
    if (event.type !== 'keydown') return true;
    if (event.altKey && /^[1-3]$/.test(event.key)) return false;
    if (event.ctrlKey && event.shiftKey && event.code === 'KeyC') {
      const text = this.term.getSelection();
      if (text) navigator.clipboard?.writeText(text).catch(() => {});
      return false;
    }
    if (event.ctrlKey && event.shiftKey && event.code === 'KeyV') {
      navigator.clipboard?.readText().then((text) => this.term.paste(text)).catch(() => {});
      return false;
    }
    return true;
  }

  setState(state, detail = '') {
    this.state = state;
    this.detail = detail;
    this.onState(this);
  }

  connect() {
    clearTimeout(this.retryTimer);
    clearTimeout(this.startingTimer);
    this.setState(this.attempt ? 'reconnecting' : 'connecting');
    const socket = new WebSocket(socketUrl(this.id));
    this.socket = socket;
    this.gotOutput = false;
    socket.onopen = () => {
      this.setState('starting');
      // A warm container answers at once; a cold one is being made: say so.
      this.startingTimer = setTimeout(() => {
        if (!this.gotOutput && this.socket === socket) this.setState('starting', 'starting your Linux box…');
      }, STARTING_NOTICE_MS);
      this.sendSize();
    };
    socket.onmessage = (event) => this.receive(event.data);
    socket.onclose = (event) => this.closed(socket, event);
  }

  receive(data) {
    const frame = parseFrame(data);
    if (!frame) return;
    if (frame.type === 'pty-output') {
      if (!this.gotOutput) {
        this.gotOutput = true;
        this.attempt = 0;
        this.setState('connected');
      }
      this.term.write(frame.data.output);
    } else if (frame.type === 'files-changed') {
      this.onFilesChanged();
    } else if (frame.type === 'error') {
      this.lastError = frame.data.message;
      this.setState(this.state, frame.data.message);
    }
  }

  async closed(socket, event) {
    if (socket !== this.socket || this.disposed) return;
    clearTimeout(this.startingTimer);
    if (!shouldReconnect(event.code)) {
      this.setState('ended');
      this.term.write('\r\n\x1b[2m[the shell ended: press any key for a new one]\x1b[0m\r\n');
      return;
    }
    if (!event.wasClean && !this.gotOutput) {
      // A refused upgrade looks like any network failure: ask whether we are still signed in.
      try {
        await api.me();
      } catch (error) {
        if (error.status === 401) {
          this.onUnauthorized();
          return;
        }
      }
    }
    const delay = backoffDelay(this.attempt++);
    this.setState('offline', this.lastError || `reconnecting in ${Math.ceil(delay / 1000)} s`);
    this.lastError = '';
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  input(data) {
    if (this.state === 'ended') {
      this.attempt = 0;
      this.connect();
      return;
    }
    this.send({ type: 'pty-input', data: { input: data } });
  }

  send(frame) {
    if (this.socket?.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(frame));
  }

  sendSize() {
    this.send({ type: 'resize', data: { rows: this.term.rows, cols: this.term.cols } });
  }

  /** Fit the view to its box; xterm then reports the new size (onResize). */
  layout() {
    if (this.element.offsetParent === null) return; // hidden: measuring would give zero
    try {
      this.fit.fit();
    } catch { /* not laid out yet */ }
  }

  /** Reconnect now, skipping the wait (the network came back). */
  retryNow() {
    if (this.state === 'offline') {
      this.attempt = 0;
      this.connect();
    }
  }

  dispose() {
    this.disposed = true;
    clearTimeout(this.retryTimer);
    clearTimeout(this.startingTimer);
    this.socket?.close();
    this.term.dispose();
    this.element.remove();
  }
}

/** The tab bar and its terminals. */
export class Terminals {
  constructor({ bar, host, status, onFilesChanged, onUnauthorized }) {
    this.bar = bar;
    this.host = host;
    this.status = status;
    this.onFilesChanged = onFilesChanged;
    this.onUnauthorized = onUnauthorized;
    this.views = new Map();
    this.state = { tabs: [], active: null };
    new ResizeObserver(() => this.active()?.layout()).observe(host);
    window.addEventListener('online', () => this.views.forEach((view) => view.retryNow()));
  }

  async start() {
    let labels = {};
    try {
      labels = JSON.parse(localStorage.getItem(LABELS_KEY) || '{}');
    } catch { /* a bad value: default labels */ }
    this.state = tabsFromServer(await api.tabs(), labels);
    this.render();
  }

  active() {
    return this.views.get(this.state.active);
  }

  update(state) {
    this.state = state;
    localStorage.setItem(LABELS_KEY, JSON.stringify(labelsOf(state)));
    api.saveTabs(tabsToServer(state)).catch((error) => this.showStatus(`tabs not saved: ${error.message}`));
    this.render();
  }

  add() {
    this.update(addTab(this.state));
    this.focus();
  }

  select(id) {
    if (id !== this.state.active) this.update({ ...this.state, active: id });
    this.focus();
  }

  close(id) {
    const view = this.views.get(id);
    const label = this.state.tabs.find((t) => t.id === id)?.label;
    if (!confirm(`Close ${label}? Programs running in it are ended.`)) return;
    view?.dispose();
    this.views.delete(id);
    api.closeTab(id).catch(() => {});
    this.update(closeTab(this.state, id));
  }

  rename(id) {
    const tab = this.state.tabs.find((t) => t.id === id);
    const label = prompt('Name of this terminal', tab.label);
    if (label !== null) this.update(renameTab(this.state, id, label));
  }

  focus() {
    this.active()?.term.focus();
  }

  render() {
    for (const { id } of this.state.tabs) {
      if (!this.views.has(id)) {
        this.views.set(id, new TerminalTab(id, this.host, {
          onState: (view) => this.renderStatus(view),
          onFilesChanged: this.onFilesChanged,
          onUnauthorized: this.onUnauthorized,
        }));
      }
    }
    this.bar.replaceChildren(...this.state.tabs.map((tab) => this.tabButton(tab)), this.newButton());
    for (const [id, view] of this.views) view.element.hidden = id !== this.state.active;
    requestAnimationFrame(() => this.active()?.layout());
    this.renderStatus(this.active());
  }

  tabButton(tab) {
    const active = tab.id === this.state.active;
    const item = document.createElement('div');
    item.className = 'tab' + (active ? ' active' : '');
    const select = document.createElement('button');
    select.className = 'tab-label';
    select.setAttribute('role', 'tab');
    select.setAttribute('aria-selected', String(active));
    select.setAttribute('aria-controls', `terminal-${tab.id}`);
    select.dataset.tab = tab.id;
    select.title = 'Double-click or F2 to rename';
    select.textContent = tab.label;
    select.onclick = () => this.select(tab.id);
    select.ondblclick = () => this.rename(tab.id);
    select.onkeydown = (event) => {
      if (event.key === 'F2') this.rename(tab.id);
      if (event.key === 'Delete') this.close(tab.id);
    };
    const close = document.createElement('button');
    close.className = 'tab-close';
    close.setAttribute('aria-label', `Close ${tab.label}`);
    close.textContent = '×';
    close.onclick = () => this.close(tab.id);
    item.append(select, close);
    return item;
  }

  newButton() {
    const button = document.createElement('button');
    button.className = 'tab-new';
    button.setAttribute('aria-label', 'New terminal');
    button.title = 'New terminal';
    button.textContent = '+';
    button.onclick = () => this.add();
    return button;
  }

  renderStatus(view) {
    if (!view || view.id !== this.state.active) return;
    const words = {
      connecting: 'connecting…', reconnecting: 'reconnecting…', starting: 'starting…',
      connected: 'connected', offline: 'offline', ended: 'shell ended',
    };
    this.showStatus(words[view.state] + (view.detail ? ` · ${view.detail}` : ''), view.state);
  }

  showStatus(text, state = '') {
    this.status.textContent = text;
    this.status.dataset.state = state;
  }
}
