import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  addTab, backoffDelay, buildTree, closeTab, folderOf, languageFor, moveTarget, nextTabId,
  dueText, progressTable, renameTab, runSummary, scoreText, shouldReconnect, sortedChildren, tabsFromServer,
  tabsToServer,
} from '../src/state.js';

test('backoff doubles from the base, is capped, and jitters within 20 %', () => {
  const fixed = { random: () => 0.5 };
  assert.deepEqual([0, 1, 2, 3].map((n) => backoffDelay(n, fixed)), [500, 1000, 2000, 4000]);
  assert.equal(backoffDelay(10, fixed), 15000);
  assert.equal(backoffDelay(1000, fixed), 15000);
  assert.equal(backoffDelay(0, { random: () => 0 }), 400);
  assert.equal(backoffDelay(0, { random: () => 1 }), 600);
});

test('every close but a normal one (the shell ended) reconnects', () => {
  assert.equal(shouldReconnect(1000), false);
  for (const code of [1001, 1006, 1011]) assert.equal(shouldReconnect(code), true);
});

test('tabs from the server keep their order and labels; bad answers give one tab', () => {
  const state = tabsFromServer({ tabs: ['1', '3'], active_tab: '3' }, { 3: 'build' });
  assert.deepEqual(state, { tabs: [{ id: '1', label: 'Terminal 1' }, { id: '3', label: 'build' }], active: '3' });
  assert.deepEqual(tabsToServer(state), { tabs: ['1', '3'], active_tab: '3' });
  assert.deepEqual(tabsFromServer({ tabs: [], active_tab: 'x' }), { tabs: [{ id: '1', label: 'Terminal 1' }], active: '1' });
  assert.equal(tabsFromServer({ tabs: ['2'], active_tab: 'nope' }).active, '2');
});

test('new, close, rename', () => {
  let state = tabsFromServer({ tabs: ['1', '3'], active_tab: '1' });
  assert.equal(nextTabId(state), '4');
  state = addTab(state);
  assert.equal(state.active, '4');
  state = closeTab(state, '4');
  assert.equal(state.active, '3', 'closing the active tab activates its neighbour');
  state = closeTab(closeTab(state, '1'), '3');
  assert.deepEqual(state.tabs.map((t) => t.id), ['4'], 'the last close leaves a fresh tab');
  assert.equal(renameTab(state, '4', '  server ').tabs[0].label, 'server');
  assert.equal(renameTab(state, '4', '   ').tabs[0].label, 'Terminal 4');
});

test('the tree from /list-files', () => {
  const tree = buildTree(['a.txt', 'src/', 'src/main.py', 'src/lib/', 'zeta/']);
  assert.deepEqual(sortedChildren(tree).map((n) => n.path), ['src/', 'zeta/', 'a.txt']);
  const src = tree.children.get('src');
  assert.deepEqual(sortedChildren(src).map((n) => [n.path, n.folder]), [['src/lib/', true], ['src/main.py', false]]);
});

test('folders, moves and languages', () => {
  assert.equal(folderOf('src/main.py'), 'src/');
  assert.equal(folderOf('src/'), 'src/');
  assert.equal(folderOf('a.txt'), '');
  assert.equal(moveTarget('a.txt', 'src/'), 'src/a.txt');
  assert.equal(moveTarget('src/', 'src/lib/'), null, 'not into itself');
  assert.equal(moveTarget('src/a.txt', 'src/'), null, 'already there');
  assert.equal(moveTarget('src/lib/', ''), 'lib');
  assert.equal(languageFor('x.PY'), 'python');
  assert.equal(languageFor('Makefile'), null);
});

test('the progress table: a column per assignment, scores or the run state, the total', () => {
  const progress = {
    assignments: [{ id: 'a1', name: 'Add two' }, { id: 'a2', name: 'Loops' }],
    students: [
      { email: 'ann@example.com', total: 66.65, assignments: { a1: { status: 'done', score: 100 }, a2: { status: 'done', score: 33.3 } } },
      { email: 'bob@example.com', total: 0, assignments: { a1: { status: 'not run', score: null }, a2: { status: 'timeout', score: null } } },
    ],
  };
  assert.deepEqual(progressTable(progress), {
    header: ['Student', 'Add two', 'Loops', 'Total'],
    rows: [['ann@example.com', '100 %', '33.3 %', '66.7 %'], ['bob@example.com', 'not run', 'timeout', '0 %']],
  });
  assert.deepEqual(progressTable({}), { header: ['Student', 'Total'], rows: [] });
  assert.equal(scoreText(null), '–');
});

test('a run in one line, and due dates', () => {
  assert.equal(runSummary(null), 'not run yet');
  assert.equal(runSummary({ status: 'done', score: 33.3, passed: 1, failed: 2 }), '33.3 %: 1 passed, 2 failed');
  assert.equal(runSummary({ status: 'timeout', score: 0 }), 'timeout: 0 %');
  assert.equal(dueText(null), 'no due date');
  assert.match(dueText(1767268800, 'en-GB'), /^due \d+ \w+ 2026/);
});
