//! `maestra migrate`: applies `migrations/` to DATABASE_URL (`serve` in cloud mode does too).

use crate::db;

pub fn run() -> anyhow::Result<()> {
    let (settings, _telemetry) = super::quiet_settings()?;
    let url = settings
        .replicas
        .direct_url(settings.require_database_url()?)
        .clone();
    super::one_shot_runtime()?.block_on(async {
        let pool = db::connect(&url, 1).await?;
        db::migrate(&pool).await?;
        println!(
            "database is up to date ({} migrations)",
            db::MIGRATOR.iter().count()
        );
        Ok(())
    })
}
