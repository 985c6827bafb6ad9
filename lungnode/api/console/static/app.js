// The console's shell: log-in, navigation by hash routes, one page at a time.
import * as api from "./api.js";
import { h, errorText } from "./ui.js";
import overview from "./pages/overview.js";
import results from "./pages/results.js";
import result from "./pages/result.js";
import deliveries from "./pages/deliveries.js";
import predict from "./pages/predict.js";
import series from "./pages/series.js";
import users from "./pages/users.js";
import peers from "./pages/peers.js";

const ADMIN = ["admin"];
const PEOPLE = ["admin", "radiologist", "viewer"];
// In the navigation's order; `roles` decides who sees the page at all.
const PAGES = [
  { path: "overview", title: "Overview", roles: PEOPLE, page: overview },
  { path: "results", title: "Results", roles: PEOPLE, page: results },
  { path: "series", title: "Series and jobs", roles: ADMIN, page: series },
  { path: "deliveries", title: "Deliveries", roles: ADMIN, page: deliveries },
  { path: "predict", title: "Predict", roles: ["admin", "radiologist"], page: predict },
  { path: "users", title: "Users", roles: ADMIN, page: users },
  { path: "peers", title: "Peers", roles: ADMIN, page: peers },
];

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
const logoutButton = document.getElementById("logout");
let user = null;
let cleanup = null;

function allowed() {
  return PAGES.filter((entry) => user && entry.roles.includes(user.role));
}

function showLogin(message) {
  user = null;
  stopPage();
  nav.hidden = true;
  nav.replaceChildren();
  logoutButton.hidden = true;
  who.textContent = "";
  document.getElementById("status").replaceChildren();
  const error = h("p", { class: "error", id: "login-error", role: "alert" }, message || "");
  const form = h(
    "form",
    { class: "login", id: "login-form", "aria-labelledby": "login-title" },
    h("h1", { id: "login-title" }, "Log in"),
    h("label", {}, "User name", h("input", { name: "username", id: "username", autocomplete: "username", required: true })),
    h("label", {}, "Password", h("input", { name: "password", id: "password", type: "password", autocomplete: "current-password", required: true })),
    h("button", { type: "submit", id: "login-submit" }, "Log in"),
    error,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    error.textContent = "";
    try {
      user = await api.login(data.get("username"), data.get("password"));
    } catch (failure) {
      error.textContent = failure.status === 401 ? "Wrong user name or password." : errorText(failure);
      return;
    }
    if (!PEOPLE.includes(user.role)) {
      api.logout();
      showLogin(`The role ${user.role} has no console; it may only send studies.`);
      return;
    }
    startShell();
  });
  main.replaceChildren(form);
  form.querySelector("input").focus();
}

function startShell() {
  who.textContent = `${user.username} (${user.role})`;
  logoutButton.hidden = false;
  nav.hidden = false;
  nav.replaceChildren(
    ...allowed().map((entry) => h("a", { href: `#/${entry.path}`, "data-page": entry.path }, entry.title)),
  );
  // A bookmarked page the role may open is kept; anything else starts at the overview.
  const name = location.hash.replace(/^#\/?/, "").split("/")[0];
  if (!allowed().some((entry) => entry.path === name)) location.hash = "#/overview";
  else route();
}

function stopPage() {
  if (cleanup) cleanup();
  cleanup = null;
}

function route() {
  if (!user) return;
  const [name, ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  let entry = allowed().find((page) => page.path === name);
  let page = entry && entry.page;
  if (name === "results" && rest.length) page = result;
  stopPage();
  document.getElementById("status").replaceChildren(); // a message belongs to its page
  for (const link of nav.querySelectorAll("a")) {
    if (link.dataset.page === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (!page) {
    main.replaceChildren(h("h1", {}, "Not available"), h("p", {}, "This page does not exist, or your role may not open it."));
    return;
  }
  const root = h("div", { "data-page": entry.path + (rest.length ? "-detail" : "") });
  main.replaceChildren(root);
  main.focus();
  const context = { user, params: rest };
  const result_ = page(root, context);
  cleanup = typeof result_ === "function" ? result_ : null;
}

window.addEventListener("hashchange", route);
logoutButton.addEventListener("click", () => api.logout());
api.whenLoggedOut(() => {
  history.replaceState(null, "", location.pathname); // the next user starts afresh
  showLogin("You are logged out.");
});
showLogin("");
