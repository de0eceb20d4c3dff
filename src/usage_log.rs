//! Local mode's cost ledger: one JSON line per answered request in `<data>/maestra_metrics.jsonl`,
//! so that `jq '.cost_usd'` over the file sums what the requests cost. The local store writes
//! it, through its journal: a reply's line is durable exactly when the reply is.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::domain::{ConversationId, UserId};

/// The ledger's file, in the data folder.
pub const LEDGER_FILE: &str = "maestra_metrics.jsonl";

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

/// One ledger line, newline included.
pub fn line(record: &UsageRecord<'_>) -> serde_json::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(record)?;
    line.push(b'\n');
    Ok(line)
}
