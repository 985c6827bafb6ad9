// Charts through the vendored Chart.js (window.Chart, loaded before the modules).

const PALETTE = ["#0b5cad", "#c2410c", "#116329", "#7c3aed", "#a40e26", "#4a4a4a"];

export function chart(canvas, type, labels, datasets, options = {}) {
  return new window.Chart(canvas, {
    type,
    data: {
      labels,
      datasets: datasets.map((dataset, i) => ({
        backgroundColor: type === "doughnut" ? PALETTE : PALETTE[i % PALETTE.length],
        borderColor: type === "doughnut" ? "#fff" : PALETTE[i % PALETTE.length],
        ...dataset,
      })),
    },
    options: {
      responsive: true,
      maintainAspectRatio: false,
      animation: false,
      ...options,
    },
  });
}

// Replace a chart's data in place (no flicker on polling).
export function update(instance, labels, values) {
  instance.data.labels = labels;
  values.forEach((data, i) => {
    instance.data.datasets[i].data = data;
  });
  instance.update("none");
}
