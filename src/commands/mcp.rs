//! `maestra mcp`: the conversation-hub MCP server on stdio (see `crate::mcp`).

use super::client_runtime;
use crate::client::ClientSettings;

pub fn run() -> anyhow::Result<()> {
    // stdout is the JSON-RPC channel: logs go to stderr, and nothing else is printed.
    super::client_logs()?;
    crate::telemetry::log_panics();
    let settings = ClientSettings::from_env()?;
    client_runtime()?.block_on(crate::mcp::serve_stdio(&settings))
}
