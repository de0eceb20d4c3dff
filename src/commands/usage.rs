//! `maestra usage`: requests, tokens and cost per day and model, from the local ledger.

use crate::usage_report;

pub fn run(opts: &usage_report::Opts) -> anyhow::Result<()> {
    let (settings, _telemetry) = super::quiet_settings()?;
    usage_report::run(opts, &settings.data_dir)
}
