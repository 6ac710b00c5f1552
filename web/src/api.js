// The server's HTTP API, same origin, cookie sent by the browser.

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error) message = body.error;
  } catch { /* not JSON: keep the status line */ }
  return new ApiError(response.status, message);
}

export async function request(method, path, body, { json = true } = {}) {
  const options = { method, credentials: 'same-origin', headers: {} };
  if (body !== undefined) {
    if (typeof body === 'string' || body instanceof Blob) {
      options.body = body;
    } else {
      options.body = JSON.stringify(body);
      options.headers['Content-Type'] = 'application/json';
    }
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new ApiError(0, 'the server cannot be reached');
  }
  if (!response.ok) throw await failure(response);
  return json ? response.json() : response;
}

/** A workspace path as a URL path: each component encoded. */
export function filePath(path) {
  return path.split('/').map(encodeURIComponent).join('/');
}

export const api = {
  me: () => request('GET', '/auth/me'),
  logout: () => request('POST', '/auth/logout'),
  tabs: () => request('GET', '/tabs'),
  saveTabs: (body) => request('POST', '/tabs', body),
  closeTab: (tabId) => request('POST', '/terminal/close-tab', { tabId }),
  listFiles: () => request('GET', '/list-files'),
  create: (path) => request('POST', `/file/${filePath(path)}`),
  remove: (path) => request('DELETE', `/file/${filePath(path)}`),
  move: (source, destination) => request('POST', '/move', { source, destination }),
  save: (path, text) => request('PUT', `/file/${filePath(path)}`, text),
  read: (path) => request('GET', `/file/${filePath(path)}`, undefined, { json: false }),
  classrooms: () => request('GET', '/classrooms'),
  createClassroom: (name) => request('POST', '/classrooms', { name }),
  join: (code) => request('POST', '/classrooms/join', { code }),
  newAccessCode: (id) => request('POST', `/classrooms/${id}/access-code`),
  assignments: (id) => request('GET', `/classrooms/${id}/assignments`),
  createAssignment: (id, body) => request('POST', `/classrooms/${id}/assignments`, body),
  publish: (id, aid, dueAt = null) => request('POST', `/classrooms/${id}/assignments/${aid}/publish`, { due_at: dueAt }),
  runTests: (id, aid, body = {}) => request('POST', `/classrooms/${id}/assignments/${aid}/run`, body),
  results: (id, aid) => request('GET', `/classrooms/${id}/assignments/${aid}/results`),
  restore: (id, aid) => request('POST', `/classrooms/${id}/assignments/${aid}/restore`, {}),
  progress: (id) => request('GET', `/classrooms/${id}/progress`),
  studentTabs: (id, userId) => request('GET', `/classrooms/${id}/students/${encodeURIComponent(userId)}/tabs`),
};

/**
 * Upload files to /upload-folder, each under `folder` + its relative name, reporting
 * progress (0..1). XMLHttpRequest, because fetch cannot report upload progress.
 */
export function upload(entries, folder, onProgress) {
  const form = new FormData();
  for (const { file, name } of entries) form.append('files', file, folder + name);
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', '/upload-folder');
    xhr.responseType = 'json';
    xhr.upload.onprogress = (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    };
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) resolve(xhr.response);
      else reject(new ApiError(xhr.status, xhr.response?.error || `upload failed (${xhr.status})`));
    };
    xhr.onerror = () => reject(new ApiError(0, 'the upload was cut off'));
    xhr.send(form);
  });
}
