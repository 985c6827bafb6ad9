// Overview: health, queue counts, per-hour and per-class charts, the last 10 results.
// Polls every 5 s while it is open.
import * as api from "../api.js";
import { chart, update } from "../charts.js";
import { h, table, when, percent, errorText } from "../ui.js";

const POLL_MS = 5000;

export default function overview(root) {
  let timer = null;
  let alive = true;
  let hourly = null;
  let classes = null;
  const healthBox = h("div", { id: "health" }, "Loading…");
  const queueBox = h("div", { id: "queues" });
  const hourlyCanvas = h("canvas", { id: "hourly-chart", role: "img", "aria-label": "Instances received and series analysed per hour, last 24 hours" });
  const hourlySummary = h("p", { id: "hourly-summary", class: "muted" });
  const classCanvas = h("canvas", { id: "class-chart", role: "img", "aria-label": "Results by class" });
  const classSummary = h("p", { id: "class-summary", class: "muted" });
  const latest = h("div", { id: "latest" });
  const updated = h("p", { class: "muted", id: "updated" });

  root.append(
    h("h1", {}, "Overview"),
    h(
      "div",
      { class: "grid" },
      h("section", { class: "card", "aria-labelledby": "h-health" }, h("h2", { id: "h-health" }, "Health"), healthBox),
      h("section", { class: "card", "aria-labelledby": "h-queues" }, h("h2", { id: "h-queues" }, "Queues"), queueBox),
    ),
    h(
      "div",
      { class: "grid" },
      h("section", { class: "card", "aria-labelledby": "h-hourly" }, h("h2", { id: "h-hourly" }, "Last 24 hours"), h("div", { class: "chart" }, hourlyCanvas), hourlySummary),
      h("section", { class: "card", "aria-labelledby": "h-classes" }, h("h2", { id: "h-classes" }, "Class distribution"), h("div", { class: "chart" }, classCanvas), classSummary),
    ),
    h("section", { "aria-labelledby": "h-latest" }, h("h2", { id: "h-latest" }, "Last 10 results"), latest),
    updated,
  );

  function showHealth(health) {
    const rows = Object.entries(health.checks || {}).map(([name, check]) =>
      h(
        "tr",
        {},
        h("th", { scope: "row" }, name),
        h("td", { class: check.ok ? "ok" : "bad" }, check.ok ? "ok" : "failing"),
        h("td", {}, check.error || check.state || (check.free_mb !== undefined ? `${check.free_mb} MiB free` : "")),
      ),
    );
    healthBox.replaceChildren(
      h("p", { class: health.status === "ok" ? "ok" : "bad", id: "health-status" }, `Status: ${health.status}`),
      table("Checks", ["check", "state", "detail"], rows),
    );
  }

  function showQueues(queue) {
    const list = (title, counts) =>
      h(
        "div",
        {},
        h("h3", {}, title),
        h("dl", { class: "counts" }, Object.entries(counts).map(([state, n]) => h("div", { "data-queue": `${title.toLowerCase()}-${state}` }, h("dt", {}, state), h("dd", {}, n)))),
      );
    queueBox.replaceChildren(list("Jobs", queue.jobs || {}), list("Deliveries", queue.deliveries || {}));
  }

  function showHourly(hours) {
    const labels = hours.map((row) => row.hour.slice(11, 16));
    const received = hours.map((row) => row.instances_received);
    const analysed = hours.map((row) => row.series_analysed);
    if (!hourly) {
      hourly = chart(hourlyCanvas, "bar", labels, [
        { label: "instances received", data: received, yAxisID: "y" },
        { label: "series analysed", data: analysed, yAxisID: "y1", type: "line" },
      ], {
        scales: {
          y: { beginAtZero: true, title: { display: true, text: "instances" } },
          y1: { beginAtZero: true, position: "right", grid: { drawOnChartArea: false }, title: { display: true, text: "series" }, ticks: { precision: 0 } },
        },
      });
    } else update(hourly, labels, [received, analysed]);
    const sum = (values) => values.reduce((a, b) => a + b, 0);
    hourlySummary.textContent = `${sum(received)} instances received and ${sum(analysed)} series analysed in the last 24 hours (UTC hours).`;
  }

  function showClasses(distribution) {
    const labels = Object.keys(distribution);
    const values = Object.values(distribution);
    if (!classes) classes = chart(classCanvas, "doughnut", labels, [{ label: "results", data: values }]);
    else update(classes, labels, [values]);
    classSummary.textContent = labels.length ? labels.map((label, i) => `${label}: ${values[i]}`).join(", ") : "No results yet.";
  }

  function showLatest(items) {
    const rows = items.map((item) =>
      h(
        "tr",
        { "data-result": item.id, "data-study": item.study_instance_uid || "" },
        h("td", {}, h("a", { href: `#/results/${item.id}` }, `#${item.id}`)),
        h("td", {}, item.prediction || "not analysed"),
        h("td", {}, percent(item.confidence)),
        h("td", {}, item.source),
        h("td", { class: "uid" }, item.study_instance_uid || "–"),
        h("td", {}, when(item.timestamp)),
      ),
    );
    latest.replaceChildren(table("Newest first", ["result", "verdict", "confidence", "source", "study", "time"], rows, { id: "latest-table" }));
  }

  async function refresh() {
    try {
      const [health, stats, perHour, history] = await Promise.all([
        api.health(),
        api.get("/stats"),
        api.get("/stats/hourly"),
        api.get("/history?per_page=10"),
      ]);
      if (!alive) return;
      showHealth(health);
      showQueues(stats.queue);
      showHourly(perHour.hours);
      showClasses(stats.class_distribution);
      showLatest(history.items);
      updated.textContent = `Updated ${new Date().toLocaleTimeString()}; refreshes every ${POLL_MS / 1000} s.`;
    } catch (error) {
      if (alive) updated.textContent = `Could not refresh: ${errorText(error)}`;
    }
    if (alive) timer = setTimeout(refresh, POLL_MS);
  }
  refresh();

  return () => {
    alive = false;
    clearTimeout(timer);
    if (hourly) hourly.destroy();
    if (classes) classes.destroy();
  };
}
