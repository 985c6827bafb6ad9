// Deliveries (admin): pending and dead letters with their last status and error;
// retry one, or every dead letter.
import * as api from "../api.js";
import { h, table, when, errorText, stateClass, sopClassName, say } from "../ui.js";

const hex = (status) => (status === null ? "–" : `0x${status.toString(16).toUpperCase().padStart(4, "0")}`);

export default function deliveries(root) {
  let alive = true;
  const pending = h("div", { id: "pending" }, "Loading…");
  const dead = h("div", { id: "dead" }, "Loading…");
  const retryAll = h("button", { type: "button", id: "retry-all" }, "Retry all dead letters");
  const refresh = h("button", { type: "button", class: "secondary", onclick: () => load() }, "Refresh");
  root.append(
    h("h1", {}, "Deliveries"),
    h("section", { "aria-labelledby": "h-dead" }, h("h2", { id: "h-dead" }, "Dead letters"), h("p", {}, retryAll, " ", refresh), dead),
    h("section", { "aria-labelledby": "h-pending" }, h("h2", { id: "h-pending" }, "Pending"), pending),
  );

  function rows(items, withRetry) {
    return items.map((d) =>
      h(
        "tr",
        { "data-delivery": d.id },
        h("td", {}, d.id),
        h("td", {}, `job ${d.job_id}`),
        h("td", {}, sopClassName(d.sop_class_uid)),
        h("td", {}, d.destination),
        h("td", { class: stateClass(d.state) }, d.state),
        h("td", {}, d.attempts),
        h("td", {}, hex(d.last_status)),
        h("td", {}, d.last_error || ""),
        h("td", {}, when(withRetry ? d.updated_at : d.next_attempt_at)),
        withRetry
          ? h("td", {}, h("button", { type: "button", class: "secondary", "data-retry": d.id, "aria-label": `Retry delivery ${d.id}`, onclick: () => retry([d.id]) }, "Retry"))
          : null,
      ),
    );
  }

  const columns = ["id", "job", "object", "destination", "state", "attempts", "last status", "last error"];

  async function load() {
    try {
      const [deadPage, pendingPage] = await Promise.all([
        api.get("/deliveries?state=dead&per_page=100"),
        api.get("/deliveries?state=pending&per_page=100"),
      ]);
      if (!alive) return;
      dead.replaceChildren(table(`${deadPage.total} dead letter(s)`, [...columns, "updated", "action"], rows(deadPage.items, true), { id: "dead-table" }));
      pending.replaceChildren(table(`${pendingPage.total} pending`, [...columns, "next attempt"], rows(pendingPage.items, false), { id: "pending-table" }));
      retryAll.disabled = deadPage.total === 0;
    } catch (error) {
      dead.replaceChildren(h("p", { class: "error" }, errorText(error)));
    }
  }

  async function retry(ids) {
    let done = 0;
    for (const id of ids) {
      try {
        await api.post(`/deliveries/${id}/retry`);
        done += 1;
      } catch (error) {
        say(`Delivery ${id}: ${errorText(error)}`, true);
      }
    }
    say(`${done} deliver${done === 1 ? "y" : "ies"} queued again.`);
    await load();
  }

  retryAll.addEventListener("click", async () => {
    retryAll.disabled = true;
    // Page by page: each retried letter leaves the dead list, so page 1 again.
    const ids = [];
    for (let page = 1; ; page += 1) {
      const answer = await api.get(`/deliveries?state=dead&per_page=100&page=${page}`);
      ids.push(...answer.items.map((d) => d.id));
      if (page >= answer.pages) break;
    }
    await retry(ids);
  });
  load();
  return () => {
    alive = false;
  };
}
