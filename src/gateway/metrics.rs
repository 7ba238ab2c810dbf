//! The gateway's Prometheus metrics, in the text exposition format. Names and buckets are
//! vLLM's where an equivalent exists (`vllm:…`), so its Grafana dashboards work; the rest
//! are `rbee_…`. Queue depth, running requests, workers and hives are read from the queen
//! at scrape time; the rest are counted here as requests pass.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// vLLM's `vllm:time_to_first_token_seconds` buckets.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's `vllm:time_per_output_token_seconds` buckets.
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's `vllm:e2e_request_latency_seconds` buckets.
const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, value: f64) {
        for (bound, count) in self.bounds.iter().zip(&mut self.counts) {
            if value <= *bound {
                *count += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// What is counted per model.
#[derive(Debug, Clone)]
struct ModelMetrics {
    /// By HTTP status.
    requests: BTreeMap<u16, u64>,
    /// By finish reason (`stop`, `length`, `abort`).
    finished: BTreeMap<&'static str, u64>,
    prompt_tokens: u64,
    generation_tokens: u64,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
}

impl Default for ModelMetrics {
    fn default() -> Self {
        ModelMetrics {
            requests: BTreeMap::new(),
            finished: BTreeMap::new(),
            prompt_tokens: 0,
            generation_tokens: 0,
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
        }
    }
}

/// Picks one of a model's histograms.
type HistogramOf = fn(&ModelMetrics) -> &Histogram;

/// The counters.
#[derive(Default)]
pub struct Metrics {
    models: Mutex<BTreeMap<String, ModelMetrics>>,
}

/// What the queen says at scrape time.
#[derive(Default)]
pub struct ClusterGauges {
    /// Requests waiting per model.
    pub waiting: Vec<(String, usize)>,
    /// Requests on workers per model.
    pub running: Vec<(String, usize)>,
    /// Workers per state.
    pub workers: BTreeMap<String, usize>,
    /// Hives per state.
    pub hives: BTreeMap<String, usize>,
}

/// Prometheus label value escaping.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The `model_name` label of requests for a model the cluster does not know.
pub const UNKNOWN_MODEL: &str = "(unknown)";

/// The metrics label of a request for `model`: its name only when the cluster knows it.
pub fn label_of(model: &str, known: bool) -> &str {
    if known { model } else { UNKNOWN_MODEL }
}

impl Metrics {
    fn with(&self, model: &str, f: impl FnOnce(&mut ModelMetrics)) {
        let mut models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        f(models.entry(model.to_string()).or_default());
    }

    /// A request ended with this HTTP status.
    pub fn request(&self, model: &str, status: u16) {
        self.with(model, |m| *m.requests.entry(status).or_default() += 1);
    }

    pub fn first_token(&self, model: &str, secs: f64) {
        self.with(model, |m| m.ttft.observe(secs));
    }

    pub fn inter_token(&self, model: &str, secs: f64) {
        self.with(model, |m| m.itl.observe(secs));
    }

    /// A generation ended: its reason, token counts and end-to-end time.
    pub fn finished(
        &self,
        model: &str,
        reason: &'static str,
        prompt: usize,
        generated: usize,
        secs: f64,
    ) {
        self.with(model, |m| {
            *m.finished.entry(reason).or_default() += 1;
            m.prompt_tokens += prompt as u64;
            m.generation_tokens += generated as u64;
            m.e2e.observe(secs);
        });
    }

    /// The text exposition.
    pub fn render(&self, gauges: &ClusterGauges) -> String {
        let models = self
            .models
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut out = String::new();
        let header = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        header(
            &mut out,
            "rbee_requests_total",
            "counter",
            "HTTP inference requests by model and status.",
        );
        for (model, m) in &models {
            for (status, n) in &m.requests {
                let _ = writeln!(
                    out,
                    "rbee_requests_total{{model_name=\"{}\",status=\"{status}\"}} {n}",
                    label(model)
                );
            }
        }
        header(
            &mut out,
            "vllm:request_success_total",
            "counter",
            "Finished requests by finish reason.",
        );
        for (model, m) in &models {
            for (reason, n) in &m.finished {
                let _ = writeln!(
                    out,
                    "vllm:request_success_total{{model_name=\"{}\",finished_reason=\"{reason}\"}} {n}",
                    label(model)
                );
            }
        }
        header(
            &mut out,
            "vllm:prompt_tokens_total",
            "counter",
            "Prefill tokens processed.",
        );
        for (model, m) in &models {
            let _ = writeln!(
                out,
                "vllm:prompt_tokens_total{{model_name=\"{}\"}} {}",
                label(model),
                m.prompt_tokens
            );
        }
        header(
            &mut out,
            "vllm:generation_tokens_total",
            "counter",
            "Tokens generated.",
        );
        for (model, m) in &models {
            let _ = writeln!(
                out,
                "vllm:generation_tokens_total{{model_name=\"{}\"}} {}",
                label(model),
                m.generation_tokens
            );
        }
        let histograms: [(&str, &str, HistogramOf); 3] = [
            (
                "vllm:time_to_first_token_seconds",
                "Time to first token.",
                |m| &m.ttft,
            ),
            (
                "vllm:time_per_output_token_seconds",
                "Time between output tokens.",
                |m| &m.itl,
            ),
            (
                "vllm:e2e_request_latency_seconds",
                "End-to-end request latency.",
                |m| &m.e2e,
            ),
        ];
        for (name, help, of) in histograms {
            header(&mut out, name, "histogram", help);
            for (model, m) in &models {
                of(m).render(&mut out, name, &format!("model_name=\"{}\"", label(model)));
            }
        }
        header(
            &mut out,
            "vllm:num_requests_waiting",
            "gauge",
            "Requests waiting in the queen's queue.",
        );
        for (model, n) in &gauges.waiting {
            let _ = writeln!(
                out,
                "vllm:num_requests_waiting{{model_name=\"{}\"}} {n}",
                label(model)
            );
        }
        header(
            &mut out,
            "vllm:num_requests_running",
            "gauge",
            "Requests running on workers.",
        );
        for (model, n) in &gauges.running {
            let _ = writeln!(
                out,
                "vllm:num_requests_running{{model_name=\"{}\"}} {n}",
                label(model)
            );
        }
        header(&mut out, "rbee_workers", "gauge", "Workers by state.");
        for (state, n) in &gauges.workers {
            let _ = writeln!(out, "rbee_workers{{state=\"{}\"}} {n}", label(state));
        }
        header(&mut out, "rbee_hives", "gauge", "Hives by state.");
        for (state, n) in &gauges.hives {
            let _ = writeln!(out, "rbee_hives{{state=\"{}\"}} {n}", label(state));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labels_escaped() {
        let metrics = Metrics::default();
        metrics.first_token("m\"x", 0.003);
        metrics.first_token("m\"x", 0.5);
        metrics.request("m\"x", 200);
        let text = metrics.render(&ClusterGauges::default());
        assert!(
            text.contains(
                "vllm:time_to_first_token_seconds_bucket{model_name=\"m\\\"x\",le=\"0.005\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains(
            "vllm:time_to_first_token_seconds_bucket{model_name=\"m\\\"x\",le=\"0.5\"} 2"
        ));
        assert!(text.contains("vllm:time_to_first_token_seconds_count{model_name=\"m\\\"x\"} 2"));
        assert!(text.contains("rbee_requests_total{model_name=\"m\\\"x\",status=\"200\"} 1"));
    }
}
