//! `maestra usage`: requests, tokens and cost per day (UTC) and model, read from local mode's
//! ledger `<data>/maestra_metrics.jsonl`. Unreadable lines are skipped and counted. Costs are
//! summed as whole pico-dollars, so the totals are exact.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;

use anyhow::Context;
use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;

use crate::responder::pricing::{pico_to_usd, usd_to_pico};

pub const LEDGER_FILE: &str = "maestra_metrics.jsonl";

/// Options of `maestra usage`.
#[derive(Debug, Clone, clap::Args)]
pub struct Opts {
    /// Count only requests on or after this day (UTC).
    #[arg(long, value_name = "YYYY-MM-DD")]
    pub since: Option<NaiveDate>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One ledger line, as far as the report needs it.
#[derive(Deserialize)]
struct Line {
    ts: DateTime<Utc>,
    model: String,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost_usd: f64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Totals {
    requests: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost_pico: u128,
}

impl Totals {
    fn add(&mut self, line: &Line) {
        self.requests += 1;
        self.prompt_tokens += line.prompt_tokens;
        self.completion_tokens += line.completion_tokens;
        self.cost_pico += usd_to_pico(line.cost_usd);
    }

    fn merge(&mut self, other: &Totals) {
        self.requests += other.requests;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.cost_pico += other.cost_pico;
    }
}

/// Requests, tokens and cost per group: (day, model) for the local ledger, (day, tenant, key,
/// model) for the cloud's table. Both print through here, so both read the same: a row per
/// group, a total row, costs as exact decimal USD.
#[derive(Debug)]
pub struct Summary {
    /// The names of the grouping columns, in order.
    columns: &'static [&'static str],
    groups: BTreeMap<Vec<String>, Totals>,
    /// Lines that were not a readable ledger record.
    pub skipped: usize,
}

/// The local ledger's grouping.
pub const LOCAL_COLUMNS: &[&str] = &["day", "model"];

impl Summary {
    pub fn new(columns: &'static [&'static str]) -> Self {
        Self {
            columns,
            groups: BTreeMap::new(),
            skipped: 0,
        }
    }

    /// Adds requests to a group (one value per column).
    pub fn add(
        &mut self,
        group: Vec<String>,
        requests: u64,
        prompt_tokens: u64,
        completion_tokens: u64,
        cost_pico: u128,
    ) {
        let totals = self.groups.entry(group).or_default();
        totals.merge(&Totals {
            requests,
            prompt_tokens,
            completion_tokens,
            cost_pico,
        });
    }

    /// Reads a ledger; lines before `since` are left out.
    pub fn read(ledger: impl BufRead, since: Option<NaiveDate>) -> io::Result<Self> {
        let mut summary = Summary::new(LOCAL_COLUMNS);
        for line in ledger.split(b'\n') {
            let line = line?;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let Ok(record) = serde_json::from_slice::<Line>(&line) else {
                summary.skipped += 1;
                continue;
            };
            let day = record.ts.date_naive();
            if since.is_some_and(|since| day < since) {
                continue;
            }
            summary
                .groups
                .entry(vec![day.to_string(), record.model.clone()])
                .or_default()
                .add(&record);
        }
        Ok(summary)
    }

    fn total(&self) -> Totals {
        let mut total = Totals::default();
        for totals in self.groups.values() {
            total.merge(totals);
        }
        total
    }

    fn json_row(&self, group: &[String], t: &Totals) -> serde_json::Value {
        let mut row = serde_json::Map::new();
        for (column, value) in self.columns.iter().zip(group) {
            row.insert((*column).to_owned(), value.clone().into());
        }
        row.insert("requests".to_owned(), t.requests.into());
        row.insert("prompt_tokens".to_owned(), t.prompt_tokens.into());
        row.insert("completion_tokens".to_owned(), t.completion_tokens.into());
        row.insert("cost_usd".to_owned(), pico_to_usd(t.cost_pico).into());
        row.into()
    }

    pub fn write_json(&self, out: &mut impl Write) -> io::Result<()> {
        let t = self.total();
        let rows: Vec<serde_json::Value> = self
            .groups
            .iter()
            .map(|(g, t)| self.json_row(g, t))
            .collect();
        let report = serde_json::json!({
            "rows": rows,
            "total": {
                "requests": t.requests,
                "prompt_tokens": t.prompt_tokens,
                "completion_tokens": t.completion_tokens,
                "cost_usd": pico_to_usd(t.cost_pico),
            },
            "skipped_lines": self.skipped,
        });
        serde_json::to_writer_pretty(&mut *out, &report)?;
        writeln!(out)
    }

    pub fn write_table(&self, out: &mut impl Write) -> io::Result<()> {
        const NUMBERS: [&str; 4] = ["requests", "prompt_tokens", "completion_tokens", "cost_usd"];
        let numbers = |t: &Totals| {
            [
                t.requests.to_string(),
                t.prompt_tokens.to_string(),
                t.completion_tokens.to_string(),
                pico_to_usd(t.cost_pico).to_string(),
            ]
        };
        let header: Vec<String> = self
            .columns
            .iter()
            .chain(&NUMBERS)
            .map(|c| (*c).to_owned())
            .collect();
        let mut lines = vec![header];
        for (group, totals) in &self.groups {
            lines.push(group.iter().cloned().chain(numbers(totals)).collect());
        }
        let mut total_row = vec![String::new(); self.columns.len()];
        total_row[0] = "total".to_owned();
        total_row.extend(numbers(&self.total()));
        lines.push(total_row);

        let mut widths = vec![0; self.columns.len() + NUMBERS.len()];
        for line in &lines {
            for (width, cell) in widths.iter_mut().zip(line) {
                *width = (*width).max(cell.chars().count());
            }
        }
        for line in &lines {
            // Text columns to the left, numbers to the right.
            let cells: Vec<String> = line
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (cell, &width))| {
                    if i < self.columns.len() {
                        format!("{cell:<width$}")
                    } else {
                        format!("{cell:>width$}")
                    }
                })
                .collect();
            writeln!(out, "{}", cells.join("  ").trim_end())?;
        }
        Ok(())
    }

    /// Prints the table or the JSON report to stdout; `| head` is not a failure.
    pub fn print(&self, json: bool) -> anyhow::Result<()> {
        let mut out = io::stdout().lock();
        let written = if json {
            self.write_json(&mut out)
        } else {
            self.write_table(&mut out)
        };
        match written.and_then(|()| out.flush()) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
            other => other.context("cannot write the report"),
        }
    }
}

/// Prints the report for the ledger in `data_dir` to stdout; notes go to stderr.
pub fn run(opts: &Opts, data_dir: &Path) -> anyhow::Result<()> {
    let path = data_dir.join(LEDGER_FILE);
    let summary = match File::open(&path) {
        Ok(file) => Summary::read(BufReader::new(file), opts.since)
            .with_context(|| format!("cannot read {}", path.display()))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            eprintln!(
                "maestra usage: no usage recorded yet ({} does not exist)",
                path.display()
            );
            Summary::new(LOCAL_COLUMNS)
        }
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    if summary.skipped > 0 {
        eprintln!(
            "maestra usage: skipped {} unreadable line{} in {}",
            summary.skipped,
            if summary.skipped == 1 { "" } else { "s" },
            path.display()
        );
    }
    summary.print(opts.json)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEDGER: &str = r#"{"ts":"2026-11-24T23:59:59Z","model":"gpt-4o-mini","prompt_tokens":100,"completion_tokens":10,"cost_usd":0.000021,"conversation_id":"c"}
{"ts":"2026-11-25T08:00:00Z","model":"gpt-4o-mini","prompt_tokens":1000,"completion_tokens":100,"cost_usd":0.00021}
not json at all
{"ts":"2026-11-25T09:00:00Z","model":"gpt-4o-mini","prompt_tokens":2000,"completion_tokens":200,"cost_usd":0.00042}

{"ts":"2026-11-25T09:30:00Z","model":"maestra-offline","prompt_tokens":5,"completion_tokens":50,"cost_usd":0.0}
{"ts":"2026-11-25T10:00:00Z","model":"gpt-4o-mini"}
{"ts":"2026-11-25T10:00:00Z","model":"gpt-4o","prompt_tokens":1,"completion_tokens":1,"cost_usd":0.0000125}"#;

    fn summary(since: Option<&str>) -> Summary {
        let since = since.map(|d| d.parse().unwrap());
        Summary::read(LEDGER.as_bytes(), since).unwrap()
    }

    #[test]
    fn requests_tokens_and_cost_are_summed_per_day_and_model() {
        let s = summary(None);
        let day = |d: &str| d.parse::<NaiveDate>().unwrap();
        let mini = &s.groups[&vec![day("2026-11-25").to_string(), "gpt-4o-mini".to_owned()]];
        assert_eq!(mini.requests, 2);
        assert_eq!((mini.prompt_tokens, mini.completion_tokens), (3000, 300));
        assert_eq!(
            pico_to_usd(mini.cost_pico),
            0.00063,
            "exact, no float drift"
        );
        assert_eq!(s.groups.len(), 4);
        assert_eq!(s.total().requests, 5);
        assert_eq!(pico_to_usd(s.total().cost_pico), 0.0006635);
    }

    #[test]
    fn unreadable_lines_are_skipped_and_counted() {
        assert_eq!(summary(None).skipped, 2);
    }

    #[test]
    fn since_leaves_out_earlier_days() {
        let s = summary(Some("2026-11-25"));
        assert_eq!(s.total().requests, 4);
        assert!(s.groups.keys().all(|g| g[0] == "2026-11-25"));
    }

    #[test]
    fn the_table_has_a_row_per_day_and_model_and_a_total() {
        let mut out = Vec::new();
        summary(None).write_table(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert!(lines[0].starts_with("day"));
        assert!(lines[2].starts_with("2026-11-25  gpt-4o ") && lines[2].ends_with("0.0000125"));
        assert!(
            lines[5].starts_with("total") && lines[5].ends_with("0.0006635"),
            "{text}"
        );
    }

    #[test]
    fn the_json_report_holds_rows_total_and_skipped_lines() {
        let mut out = Vec::new();
        summary(None).write_json(&mut out).unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(report["rows"].as_array().unwrap().len(), 4);
        assert_eq!(report["total"]["requests"], 5);
        assert_eq!(report["total"]["cost_usd"], 0.0006635);
        assert_eq!(report["skipped_lines"], 2);
    }
}
