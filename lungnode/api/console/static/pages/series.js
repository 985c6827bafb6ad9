// Series and jobs (admin): received series with their completion, analysis jobs with
// their stage timings, a failed job's reason and retry.
import * as api from "../api.js";
import { h, table, when, errorText, stateClass, say } from "../ui.js";

function timings(details) {
  const stages = (details && details.timings_s) || {};
  const text = Object.entries(stages).map(([stage, seconds]) => `${stage} ${Number(seconds).toFixed(2)} s`);
  return text.length ? text.join(", ") : "–";
}

export default function series(root) {
  let alive = true;
  const seriesBox = h("div", { id: "series" }, "Loading…");
  const jobsBox = h("div", { id: "jobs" }, "Loading…");
  root.append(
    h("h1", {}, "Series and jobs"),
    h("p", {}, h("button", { type: "button", class: "secondary", onclick: () => load() }, "Refresh")),
    h("section", { "aria-labelledby": "h-series" }, h("h2", { id: "h-series" }, "Received series (newest 50)"), seriesBox),
    h("section", { "aria-labelledby": "h-jobs" }, h("h2", { id: "h-jobs" }, "Analysis jobs (newest 50)"), jobsBox),
  );

  async function retry(id) {
    try {
      await api.post(`/jobs/${id}/retry`);
      say(`Job ${id} queued again.`);
    } catch (error) {
      say(`Job ${id}: ${errorText(error)}`, true);
    }
    load();
  }

  async function load() {
    try {
      const [seriesPage, jobsPage] = await Promise.all([api.get("/series?per_page=50"), api.get("/jobs?per_page=50")]);
      if (!alive) return;
      seriesBox.replaceChildren(
        table(`${seriesPage.total} series`, ["id", "series", "from", "state", "instances", "declared", "completion rule", "reason", "last received"],
          seriesPage.items.map((s) =>
            h("tr", { "data-series": s.series_instance_uid },
              h("td", {}, s.id), h("td", { class: "uid" }, s.series_instance_uid), h("td", {}, s.calling_ae || "–"),
              h("td", { class: stateClass(s.state) }, s.state), h("td", {}, s.instance_count), h("td", {}, s.declared_count ?? "–"),
              h("td", {}, s.completion_rule || "–"), h("td", {}, s.completion_reason || ""), h("td", {}, when(s.last_received_at)))),
          { id: "series-table" }),
      );
      jobsBox.replaceChildren(
        table(`${jobsPage.total} job(s)`, ["id", "series", "version", "state", "attempts", "stage timings", "error or reason", "finished", "action"],
          jobsPage.items.map((j) =>
            h("tr", { "data-job": j.id },
              h("td", {}, j.id), h("td", {}, j.series_id), h("td", {}, j.version),
              h("td", { class: stateClass(j.state) }, j.state), h("td", {}, j.attempts), h("td", {}, timings(j.details)),
              h("td", {}, j.reason || j.last_error || (j.details && j.details.not_analysed_reason) || ""),
              h("td", {}, when(j.finished_at)),
              h("td", {}, j.state === "failed" ? h("button", { type: "button", class: "secondary", "aria-label": `Retry job ${j.id}`, onclick: () => retry(j.id) }, "Retry") : ""))),
          { id: "jobs-table" }),
      );
    } catch (error) {
      seriesBox.replaceChildren(h("p", { class: "error" }, errorText(error)));
    }
  }
  load();
  return () => {
    alive = false;
  };
}
