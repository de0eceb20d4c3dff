//! Local mode's cost ledger: one JSON line per answered request in `<data>/maestra_metrics.jsonl`,
//! so that `jq '.cost_usd'` over the file sums what the requests cost.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::domain::{ConversationId, UserId};

#[derive(Debug, Serialize)]
pub struct UsageRecord<'a> {
    pub ts: DateTime<Utc>,
    pub request_id: &'a str,
    /// `None` (JSON null) for the legacy advisor's one-off questions.
    pub conversation_id: Option<&'a ConversationId>,
    pub user_id: &'a UserId,
    pub surface_id: &'a str,
    pub model: &'a str,
    pub latency_ms: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
}

pub struct UsageLog {
    file: Mutex<File>,
}

impl UsageLog {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self {
            file: Mutex::new(file),
        })
    }

    /// Appends one line. A ledger write that fails is logged, never fails the request: the
    /// reply is already stored and the user should get it.
    pub fn record(&self, record: &UsageRecord<'_>) {
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a usage record");
                return;
            }
        };
        line.push(b'\n');
        // One write call per line on an O_APPEND file: lines never interleave.
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let before = file.metadata().map(|m| m.len());
        if let Err(e) = file.write_all(&line) {
            tracing::error!(error = %e, "cannot append to the usage ledger");
            // A full disk may have taken part of the line: cut it off, so that every line
            // stays whole (`jq` and `maestra usage` read them).
            if let Ok(before) = before {
                let _ = file.set_len(before);
            }
        }
    }
}
