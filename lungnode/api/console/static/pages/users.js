// Users (admin): list, add, change role, disable or enable.
import * as api from "../api.js";
import { h, table, when, errorText, say } from "../ui.js";

const ROLES = ["viewer", "radiologist", "admin", "sender"];

export default function users(root, { user: me }) {
  let alive = true;
  const list = h("div", { id: "users" }, "Loading…");
  const form = h(
    "form",
    { class: "inline", id: "add-user", "aria-labelledby": "h-add" },
    h("label", {}, "User name", h("input", { name: "username", id: "new-username", required: true, maxlength: 64, autocomplete: "off" })),
    h("label", {}, "Password (8 or more)", h("input", { name: "password", id: "new-password", type: "password", required: true, minlength: 8, autocomplete: "new-password" })),
    h("label", {}, "E-mail (optional)", h("input", { name: "email", id: "new-email", type: "email" })),
    h("label", {}, "Role", h("select", { name: "role", id: "new-role" }, ROLES.map((role) => h("option", { value: role }, role)))),
    h("button", { type: "submit" }, "Add user"),
  );
  root.append(h("h1", {}, "Users"), list, h("h2", { id: "h-add" }, "Add a user"), form);

  async function change(id, body, what) {
    try {
      await api.patch(`/users/${id}`, body);
      say(what);
    } catch (error) {
      say(errorText(error), true);
    }
    load();
  }

  async function load() {
    let answer;
    try {
      answer = await api.get("/users");
    } catch (error) {
      list.replaceChildren(h("p", { class: "error" }, errorText(error)));
      return;
    }
    if (!alive) return;
    const rows = answer.items.map((u) => {
      const select = h("select", { id: `role-${u.id}`, "aria-label": `Role of ${u.username}` }, ROLES.map((role) => h("option", { value: role, selected: role === u.role }, role)));
      return h(
        "tr",
        { "data-user": u.username },
        h("td", {}, u.username),
        h("td", {}, u.email || "–"),
        h("td", {}, select, " ", h("button", { type: "button", class: "secondary", "aria-label": `Save the role of ${u.username}`, onclick: () => change(u.id, { role: select.value }, `${u.username} is now ${select.value}.`) }, "Save role")),
        h("td", { class: u.active ? "ok" : "bad" }, u.active ? "active" : "disabled"),
        h("td", {}, when(u.created_at)),
        h("td", {}, u.id === me.id ? "(you)" : h("button", { type: "button", class: "secondary", "data-toggle": u.username, onclick: () => change(u.id, { active: !u.active }, `${u.username} ${u.active ? "disabled" : "enabled"}.`) }, u.active ? "Disable" : "Enable")),
      );
    });
    list.replaceChildren(table(`${answer.items.length} user(s)`, ["user name", "e-mail", "role", "state", "created", "action"], rows, { id: "users-table" }));
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = Object.fromEntries(new FormData(form));
    if (!data.email) delete data.email;
    try {
      await api.post("/users", data);
      say(`${data.username} added.`);
      form.reset();
    } catch (error) {
      say(errorText(error), true);
    }
    load();
  });
  load();
  return () => {
    alive = false;
  };
}
