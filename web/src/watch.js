// A read-only view of a student's terminal tab for an instructor: output only, no input.

import { openXterm, parseFrame } from './terminals.js';

function watchUrl(classroomId, userId, tabId) {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}/classrooms/${encodeURIComponent(classroomId)}/students/`
    + `${encodeURIComponent(userId)}/terminal/ws?tabId=${encodeURIComponent(tabId)}`;
}

export class TerminalWatch {
  constructor(host, { classroomId, userId, tabId }) {
    this.element = document.createElement('div');
    this.element.className = 'watch-terminal';
    host.append(this.element);
    ({ term: this.term, fit: this.fit } = openXterm(this.element,
      { disableStdin: true, cursorBlink: false, fontSize: 13, scrollback: 2000 }));
    this.socket = new WebSocket(watchUrl(classroomId, userId, tabId));
    this.socket.onopen = () => {
      try {
        this.fit.fit();
      } catch { /* not laid out yet */ }
      this.socket.send(JSON.stringify({ type: 'resize', data: { rows: this.term.rows, cols: this.term.cols } }));
    };
    this.socket.onmessage = (event) => this.receive(event.data);
    this.socket.onclose = () => this.note('the view ended');
  }

  receive(data) {
    const frame = parseFrame(data);
    if (!frame) return;
    if (frame.type === 'pty-output') this.term.write(frame.data.output);
    else if (frame.type === 'error') this.note(frame.data.message);
  }

  note(text) {
    this.term.write(`\r\n\x1b[2m[${text}]\x1b[0m\r\n`);
  }

  dispose() {
    this.socket.onclose = null;
    this.socket.close();
    this.term.dispose();
    this.element.remove();
  }
}
