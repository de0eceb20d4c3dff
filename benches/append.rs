//! Does appending cost the same at message 10 and at message 10,000? Run with
//! `cargo bench --bench append`. Appends alternate between a short and a long conversation so
//! that both see the same disk weather; the result is the ratio of their medians.

use std::time::{Duration, Instant};

use maestra::domain::{ConversationId, NewMessage, Role, SurfaceId, UserId};
use maestra::store::{ConversationStore, FileStore, Owner};

const LONG: usize = 10_000;
const SHORT: usize = 10;
const ROUNDS: usize = 300;

fn message(i: usize) -> NewMessage {
    NewMessage {
        id: None,
        role: if i.is_multiple_of(2) {
            Role::User
        } else {
            Role::Assistant
        },
        surface_id: SurfaceId::parse("bench").expect("valid surface"),
        content: format!(
            "message {i}: a line of ordinary length, like a short question or answer."
        ),
        model: None,
        usage: None,
        api_key_id: None,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into()))?;
    let owner = Owner {
        tenant: "bench".into(),
        user_id: UserId::parse("bench")?,
    };
    let short = ConversationId::parse("conv_short")?;
    let long = ConversationId::parse("conv_long")?;

    eprintln!("filling a {LONG}-message conversation (one journal flush each)...");
    {
        let store = FileStore::open(
            dir.path().join("conversations"),
            &dir.path().join("journal"),
            20,
        )?;
        for i in 0..LONG {
            store.append(&owner, &long, message(i)).await?;
        }
        for i in 0..SHORT {
            store.append(&owner, &short, message(i)).await?;
        }
    }

    // A fresh store, as after a restart; the first append of each loads its file.
    let store = FileStore::open(
        dir.path().join("conversations"),
        &dir.path().join("journal"),
        20,
    )?;
    store.append(&owner, &long, message(0)).await?;
    store.append(&owner, &short, message(0)).await?;

    let (mut at_short, mut at_long) = (Vec::new(), Vec::new());
    for i in 0..ROUNDS {
        for (conversation, samples) in [(&short, &mut at_short), (&long, &mut at_long)] {
            let started = Instant::now();
            store.append(&owner, conversation, message(i)).await?;
            samples.push(started.elapsed());
        }
    }
    at_short.sort();
    at_long.sort();
    let (short_p50, long_p50) = (percentile(&at_short, 0.5), percentile(&at_long, 0.5));
    println!("append latency over {ROUNDS} appends each (includes fsync)");
    println!(
        "  at ~{SHORT} messages:     p50 {:>8.3} ms   p99 {:>8.3} ms",
        short_p50.as_secs_f64() * 1e3,
        percentile(&at_short, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "  at ~{LONG} messages: p50 {:>8.3} ms   p99 {:>8.3} ms",
        long_p50.as_secs_f64() * 1e3,
        percentile(&at_long, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "  ratio p50 long/short: {:.2}x (target: within 2x)",
        long_p50.as_secs_f64() / short_p50.as_secs_f64()
    );
    Ok(())
}
