//! `maestra usage`: requests, tokens and cost per day (UTC) and model, read from local mode's
//! ledger `<data>/maestra_metrics.jsonl`. Unreadable lines are skipped and counted. Costs are
//! summed as whole pico-dollars, so the totals are exact.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;

use anyhow::Context;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

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

#[derive(Debug, Default)]
pub struct Summary {
    by_day_and_model: BTreeMap<(NaiveDate, String), Totals>,
    total: Totals,
    /// Lines that were not a readable ledger record.
    pub skipped: usize,
}

#[derive(Serialize)]
struct JsonRow<'a> {
    day: String,
    model: &'a str,
    requests: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost_usd: f64,
}

impl Summary {
    /// Reads a ledger; lines before `since` are left out.
    pub fn read(ledger: impl BufRead, since: Option<NaiveDate>) -> io::Result<Self> {
        let mut summary = Summary::default();
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
                .by_day_and_model
                .entry((day, record.model.clone()))
                .or_default()
                .add(&record);
        }
        let mut total = Totals::default();
        for totals in summary.by_day_and_model.values() {
            total.merge(totals);
        }
        summary.total = total;
        Ok(summary)
    }

    fn rows(&self) -> impl Iterator<Item = JsonRow<'_>> {
        self.by_day_and_model
            .iter()
            .map(|((day, model), t)| JsonRow {
                day: day.to_string(),
                model,
                requests: t.requests,
                prompt_tokens: t.prompt_tokens,
                completion_tokens: t.completion_tokens,
                cost_usd: pico_to_usd(t.cost_pico),
            })
    }

    pub fn write_json(&self, out: &mut impl Write) -> io::Result<()> {
        let t = &self.total;
        let report = serde_json::json!({
            "rows": self.rows().collect::<Vec<_>>(),
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
        let header = [
            "day",
            "model",
            "requests",
            "prompt_tokens",
            "completion_tokens",
            "cost_usd",
        ]
        .map(str::to_owned);
        let t = &self.total;
        let mut lines: Vec<[String; 6]> = vec![header];
        lines.extend(self.rows().map(|r| {
            [
                r.day,
                r.model.to_owned(),
                r.requests.to_string(),
                r.prompt_tokens.to_string(),
                r.completion_tokens.to_string(),
                r.cost_usd.to_string(),
            ]
        }));
        lines.push([
            "total".to_owned(),
            String::new(),
            t.requests.to_string(),
            t.prompt_tokens.to_string(),
            t.completion_tokens.to_string(),
            pico_to_usd(t.cost_pico).to_string(),
        ]);
        let mut widths = [0; 6];
        for line in &lines {
            for (width, cell) in widths.iter_mut().zip(line) {
                *width = (*width).max(cell.chars().count());
            }
        }
        for line in &lines {
            // Text columns to the left, numbers to the right.
            let row = format!(
                "{:<w0$}  {:<w1$}  {:>w2$}  {:>w3$}  {:>w4$}  {:>w5$}",
                line[0],
                line[1],
                line[2],
                line[3],
                line[4],
                line[5],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2],
                w3 = widths[3],
                w4 = widths[4],
                w5 = widths[5],
            );
            writeln!(out, "{}", row.trim_end())?;
        }
        Ok(())
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
            Summary::default()
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
    let mut out = io::stdout().lock();
    let written = if opts.json {
        summary.write_json(&mut out)
    } else {
        summary.write_table(&mut out)
    };
    match written.and_then(|()| out.flush()) {
        // `maestra usage | head` is not a failure.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write the report"),
    }
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
        let mini = &s.by_day_and_model[&(day("2026-11-25"), "gpt-4o-mini".to_owned())];
        assert_eq!(mini.requests, 2);
        assert_eq!((mini.prompt_tokens, mini.completion_tokens), (3000, 300));
        assert_eq!(
            pico_to_usd(mini.cost_pico),
            0.00063,
            "exact, no float drift"
        );
        assert_eq!(s.by_day_and_model.len(), 4);
        assert_eq!(s.total.requests, 5);
        assert_eq!(pico_to_usd(s.total.cost_pico), 0.0006635);
    }

    #[test]
    fn unreadable_lines_are_skipped_and_counted() {
        assert_eq!(summary(None).skipped, 2);
    }

    #[test]
    fn since_leaves_out_earlier_days() {
        let s = summary(Some("2026-11-25"));
        assert_eq!(s.total.requests, 4);
        assert!(
            s.by_day_and_model
                .keys()
                .all(|(d, _)| d.to_string() == "2026-11-25")
        );
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
