//! `kes-bench [--quick] [--json FILE] [--only TEXT[;TEXT…]]…`: KES against
//! plain baselines, side by side in one process, so every figure is a
//! same-run ratio. `--only` runs the scenarios whose name contains one of
//! the texts (case-insensitive); texts are separated by `;` (scenario
//! names hold commas), and `--only` may be given more than once.
//!
//! Each scenario alternates rounds of the KES path and of its baseline and
//! keeps the median of each. Load comes from a keep-alive HTTP client in
//! this process, against the real router served on 127.0.0.1:0. Services:
//! PostgreSQL from `KES_TEST_DATABASE_URL`, Kafka from
//! `KES_TEST_KAFKA_BROKERS`; a scenario whose service is absent is reported
//! as skipped, with the reason.

mod alloc;
mod auth;
mod backends;
mod feeds;
mod instances;
mod ladder;
mod lag;
mod load;
mod scenarios;

use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

/// The system's allocator, counting only for the table-memory scenario.
#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

/// Sizes of one run.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// `--quick`.
    pub quick: bool,
    /// Alternating rounds per throughput scenario (each side).
    pub rounds: usize,
    /// Length of one throughput round.
    pub round: Duration,
    /// Requests per sequential (seed loop) round.
    pub sequential: u64,
    /// Aggregates behind the rebuild and memory scenarios.
    pub aggregates: usize,
    /// Alternating rounds of the rebuild scenarios.
    pub rebuild_rounds: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                rounds: 3,
                round: Duration::from_millis(1200),
                sequential: 300,
                aggregates: 5_000,
                rebuild_rounds: 3,
            }
        } else {
            Self {
                quick,
                rounds: 5,
                round: Duration::from_secs(5),
                sequential: 1000,
                aggregates: 100_000,
                rebuild_rounds: 3,
            }
        }
    }

    /// Alternating rounds of a rebuild whose round lasts a fraction of a
    /// second at the quick size (the view and table rebuilds): there a
    /// pause of a few tens of milliseconds, on either side, moves one
    /// round's figure by a fifth, so they run three times the rounds of the
    /// other rebuild scenarios, for a steadier median.
    pub fn short_rebuild_rounds(&self) -> usize {
        self.rebuild_rounds * 3
    }
}

/// Which way a ratio is taken so that higher is better.
#[derive(Debug, Clone, Copy)]
pub enum Better {
    /// Throughput: kes / baseline.
    Higher,
    /// Latency or memory: baseline / kes.
    Lower,
}

/// One line of the report.
#[derive(Debug, Serialize)]
pub struct Outcome {
    scenario: String,
    unit: String,
    kes: Option<f64>,
    baseline: Option<f64>,
    ratio: Option<f64>,
    goal: f64,
    status: String,
    /// How it was measured, and what the baseline was.
    note: String,
}

/// What a scenario measured.
pub struct Measured {
    /// The KES figure (median).
    pub kes: f64,
    /// The baseline figure (median).
    pub baseline: f64,
    /// Method notes.
    pub note: String,
    /// The size it ran at and why, when smaller than its name says (see
    /// [`ladder`]).
    pub smaller: Option<String>,
}

/// Why a scenario produced no figure.
pub enum Missing {
    /// A service it needs is absent.
    Skip(String),
    /// It ran and failed.
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for Missing {
    fn from(e: anyhow::Error) -> Self {
        Self::Failed(e)
    }
}

/// A scenario's declaration.
pub struct Spec {
    /// Name shown in the table.
    pub name: String,
    /// Unit of `kes` and `baseline`.
    pub unit: &'static str,
    /// Orientation.
    pub better: Better,
    /// Minimum ratio.
    pub goal: f64,
}

fn outcome(spec: Spec, result: Result<Measured, Missing>) -> Outcome {
    let (kes, baseline, ratio, status, note) = match result {
        Ok(m) => {
            let ratio = match spec.better {
                Better::Higher => m.kes / m.baseline,
                Better::Lower => m.baseline / m.kes,
            };
            let mut status = if spec.goal <= 0.0 {
                "measured (no goal)".to_owned()
            } else if ratio >= spec.goal {
                "met".to_owned()
            } else {
                "not met".to_owned()
            };
            if let Some(smaller) = &m.smaller {
                status = format!("{status}, {smaller}");
            }
            (Some(m.kes), Some(m.baseline), Some(ratio), status, m.note)
        }
        Err(Missing::Skip(why)) => (None, None, None, format!("skipped: {why}"), String::new()),
        Err(Missing::Failed(e)) => (None, None, None, format!("failed: {e:#}"), String::new()),
    };
    Outcome { scenario: spec.name, unit: spec.unit.to_owned(), kes, baseline, ratio, goal: spec.goal, status, note }
}

/// The median of `values` (which are never empty here).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn figure(v: Option<f64>) -> String {
    match v {
        None => "-".to_owned(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.3}"),
    }
}

fn print_table(outcomes: &[Outcome]) {
    println!();
    println!("| scenario | unit | kes | baseline | ratio | goal | status |");
    println!("|---|---|---|---|---|---|---|");
    for o in outcomes {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            o.scenario,
            o.unit,
            figure(o.kes),
            figure(o.baseline),
            o.ratio.map_or("-".to_owned(), |r| format!("{r:.2}")),
            if o.goal > 0.0 { format!("≥ {}", o.goal) } else { "-".to_owned() },
            o.status
        );
    }
    println!();
    for o in outcomes.iter().filter(|o| !o.note.is_empty()) {
        println!("- {}: {}", o.scenario, o.note);
    }
}

/// The texts of one `--only` value: separated by `;`, since scenario names
/// hold commas; lower case, blanks trimmed.
fn only_texts(value: &str) -> impl Iterator<Item = String> + '_ {
    value.split(';').map(|t| t.trim().to_lowercase()).filter(|t| !t.is_empty())
}

/// Texts from `--only`; empty runs every scenario.
static ONLY: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// Whether the scenario named `name` was selected by `--only`.
pub fn selected(name: &str) -> bool {
    let name = name.to_lowercase();
    ONLY.get().is_none_or(|only| only.is_empty() || only.iter().any(|t| name.contains(t.as_str())))
}

const USAGE: &str = "kes-bench [--quick] [--json FILE] [--only TEXT[;TEXT...]]...";

fn parse_args() -> anyhow::Result<(bool, Option<String>)> {
    let mut quick = false;
    let mut json = None;
    let mut only = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--json" => json = Some(args.next().context("--json needs a file name")?),
            "--only" => {
                let texts = args.next().context("--only needs a text (or several, separated by ';')")?;
                only.extend(only_texts(&texts));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}; usage: {USAGE}"),
        }
    }
    let _ = ONLY.set(only);
    Ok((quick, json))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (quick, json) = parse_args()?;
    let plan = Plan::new(quick);
    let started = std::time::Instant::now();
    let outcomes = scenarios::run_all(plan).await;
    print_table(&outcomes);
    println!("\n{} run in {:.0} s", if plan.quick { "quick" } else { "full" }, started.elapsed().as_secs_f64());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&outcomes)?;
        std::fs::write(&path, text).with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::only_texts;

    #[test]
    fn only_splits_at_semicolons_and_keeps_the_commas_of_scenario_names() {
        let texts: Vec<String> = only_texts("GET by id, 64 clients, Kafka store; table ;;").collect();
        assert_eq!(texts, ["get by id, 64 clients, kafka store", "table"]);
    }
}
