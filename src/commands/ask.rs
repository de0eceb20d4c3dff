//! `maestra ask "…"`: one message from a terminal, local backend first, cloud fallback. The
//! reply goes to stdout; which backend answered, and in which conversation, to stderr.

use std::io::Write;

use anyhow::Context;
use clap::Args;

use super::one_shot_runtime;
use crate::client::memory::LastConversations;
use crate::client::{AskRequest, ClientSettings, MaestraClient};

#[derive(Debug, Args)]
pub struct AskArgs {
    /// The message to send.
    message: String,
    /// Continue this conversation (default: the last one of this surface and user).
    #[arg(long, value_name = "ID")]
    conversation: Option<String>,
    /// Start a new conversation instead of continuing the last one.
    #[arg(long, conflicts_with = "conversation")]
    new: bool,
    /// Send as this user (default: $MAESTRA_USER_ID, else the OS user name).
    #[arg(long, value_name = "U")]
    user: Option<String>,
    /// The surface the message comes from.
    #[arg(long, value_name = "S", default_value = "cli")]
    surface: String,
    /// Print the full response object, with "backend", as JSON.
    #[arg(long)]
    json: bool,
    /// Print the reply piece by piece as the server writes it (when it streams).
    #[arg(long)]
    stream: bool,
}

pub fn run(args: AskArgs) -> anyhow::Result<()> {
    let _telemetry = super::client_logs()?;
    let settings = ClientSettings::from_env()?;
    let user = settings.user_or_default(args.user.as_deref())?;
    let client = MaestraClient::new(&settings)?;
    let mut memory = LastConversations::load(settings.data_dir()?);
    let conversation = match (&args.conversation, args.new) {
        (Some(id), _) => Some(id.clone()),
        (None, true) => None,
        (None, false) => memory.get(&args.surface, &user).map(str::to_owned),
    };
    let request = AskRequest {
        user_id: &user,
        surface_id: &args.surface,
        conversation_id: conversation.as_deref(),
        message: &args.message,
    };
    // One key for this ask: a fallback attempt carries the same one.
    let key = uuid::Uuid::new_v4().to_string();

    let print_pieces = args.stream && !args.json;
    let mut printed = String::new();
    let mut print = |piece: &str| {
        if print_pieces {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
            printed.push_str(piece);
        }
    };
    let on_text: Option<&mut (dyn FnMut(&str) + Send)> =
        if args.stream { Some(&mut print) } else { None };
    let asked = one_shot_runtime()?.block_on(client.ask(&request, &key, on_text));
    if !printed.is_empty() && !printed.ends_with('\n') {
        println!();
    }
    let reply = asked?;

    if args.json {
        println!("{}", serde_json::to_string_pretty(&reply.body)?);
    } else {
        if !print_pieces {
            println!("{}", reply.text);
        }
        eprintln!(
            "[answered by {} · conversation {}]",
            reply.backend, reply.conversation_id
        );
    }
    memory
        .remember(&args.surface, &user, &reply.conversation_id)
        .with_context(|| {
            format!(
                "the reply arrived, but conversation {} could not be remembered for next time",
                reply.conversation_id
            )
        })?;
    Ok(())
}
