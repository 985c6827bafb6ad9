// The REST API client. Tokens live in this module's memory only: never in
// cookies, localStorage or sessionStorage, so a reload asks to log in again and
// no cookie can authenticate a forged cross-site request.

const BASE = "/api/v1";
let tokens = null; // {access, refresh}
let onLoggedOut = () => {};

export class ApiError extends Error {
  constructor(status, body) {
    const message = body && body.error ? body.error.message : `HTTP ${status}`;
    super(message);
    this.status = status;
    this.body = body;
  }
}

export function whenLoggedOut(callback) {
  onLoggedOut = callback;
}

export async function login(username, password) {
  const response = await fetch(`${BASE}/auth/login`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ username, password }),
  });
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, body);
  tokens = { access: body.access_token, refresh: body.refresh_token };
  return get("/auth/me");
}

export function logout() {
  // The API has no server-side session to end: forgetting the tokens is the log-out.
  tokens = null;
  onLoggedOut();
}

async function refreshAccess() {
  if (!tokens || !tokens.refresh) return false;
  const response = await fetch(`${BASE}/auth/refresh`, {
    method: "POST",
    headers: { Authorization: `Bearer ${tokens.refresh}` },
  });
  if (!response.ok) return false;
  const body = await response.json();
  tokens.access = body.access_token;
  return true;
}

// A request with the bearer token; one refresh and retry on 401.
export async function request(path, options = {}) {
  if (!tokens) throw new ApiError(401, null);
  const url = path.startsWith("/api/") ? path : `${BASE}${path}`;
  const send = () =>
    fetch(url, {
      ...options,
      headers: { ...(options.headers || {}), Authorization: `Bearer ${tokens.access}` },
    });
  let response = await send();
  if (response.status === 401 && (await refreshAccess())) response = await send();
  if (response.status === 401) {
    logout();
    throw new ApiError(401, null);
  }
  return response;
}

async function json(response) {
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

export async function get(path) {
  return json(await request(path));
}

export async function post(path, payload) {
  const options = { method: "POST" };
  if (payload instanceof FormData) options.body = payload;
  else if (payload !== undefined) {
    options.body = JSON.stringify(payload);
    options.headers = { "Content-Type": "application/json" };
  }
  return json(await request(path, options));
}

export async function patch(path, payload) {
  return json(
    await request(path, {
      method: "PATCH",
      body: JSON.stringify(payload),
      headers: { "Content-Type": "application/json" },
    }),
  );
}

// A protected file (heatmap PNG, PDF report) as an object URL; the caller revokes it.
export async function blobUrl(path) {
  const response = await request(path);
  if (!response.ok) throw new ApiError(response.status, null);
  return URL.createObjectURL(await response.blob());
}

// /health needs no token and answers 503 with its checks when one fails.
export async function health() {
  const response = await fetch(`${BASE}/health`);
  return response.json();
}
