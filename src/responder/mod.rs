//! Who writes Maestra's replies. The offline responder works with zero configuration; any
//! OpenAI-compatible chat-completions server (OpenAI, OpenRouter, Ollama, vLLM, llama.cpp,
//! LM Studio) plugs in behind the same trait.

mod offline;
mod openai;
pub mod pricing;
mod sse;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::config::LlmSettings;
use crate::domain::{ConversationId, Message, Usage};

pub use offline::OfflineResponder;
pub use openai::OpenAiResponder;
#[cfg(fuzzing)]
pub use sse::SseParser;

/// What the model sees: the conversation's recent history, oldest first, ending with the
/// user's new message, whichever surfaces wrote it.
pub struct Prompt<'a> {
    /// `None` for a one-off question that belongs to no conversation (the legacy advisor).
    pub conversation_id: Option<&'a ConversationId>,
    pub history: &'a [Message],
}

impl Prompt<'_> {
    /// How many messages the conversation holds, the new one included (seqs count from 1).
    pub fn conversation_len(&self) -> i64 {
        self.history.last().map_or(0, |m| m.seq)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub text: String,
    pub model: String,
    pub usage: Usage,
}

#[derive(Debug, thiserror::Error)]
pub enum ResponderError {
    /// The provider answered with an error or something unreadable.
    #[error("the model provider failed: {0}")]
    Provider(String),
    /// The provider did not answer in time.
    #[error("the model provider did not answer in time")]
    Timeout,
}

impl ResponderError {
    /// A short, bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ResponderError::Provider(_) => "provider",
            ResponderError::Timeout => "timeout",
        }
    }
}

/// Where a streaming reply's text goes, piece by piece, as the model writes it. Sending never
/// blocks nor fails: if the client went away the pieces are dropped, and the reply goes on to
/// be stored whole. Unbounded is safe: a reply's size is bounded by the model's output.
#[derive(Clone)]
pub struct Deltas(mpsc::UnboundedSender<String>);

impl Deltas {
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<String>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (Self(sender), receiver)
    }

    pub fn send(&self, piece: &str) {
        if !piece.is_empty() {
            let _ = self.0.send(piece.to_owned());
        }
    }
}

#[async_trait]
pub trait Responder: Send + Sync + 'static {
    async fn reply(&self, prompt: Prompt<'_>) -> Result<Reply, ResponderError>;

    /// Like `reply`, sending the text to `deltas` as it is written; returns the whole reply.
    /// By default the whole text is one piece.
    async fn reply_streaming(
        &self,
        prompt: Prompt<'_>,
        deltas: &Deltas,
    ) -> Result<Reply, ResponderError> {
        let reply = self.reply(prompt).await?;
        deltas.send(&reply.text);
        Ok(reply)
    }
}

tokio::task_local! {
    static PROVIDER_WAIT: Arc<AtomicU64>;
}

/// How long the current request has waited for the model provider, whatever the outcome: the
/// HTTP layer starts one per request (for `X-Maestra-Overhead-Ms`), the turn's task carries
/// it on, and every responder call adds its time.
#[derive(Clone, Default)]
pub struct ProviderClock(Arc<AtomicU64>);

impl ProviderClock {
    /// Runs `future` with this clock as the current one. (Not an `async fn`, which would hold
    /// `future` twice.)
    pub fn scope<F: Future>(self, future: F) -> impl Future<Output = F::Output> {
        PROVIDER_WAIT.scope(self.0, future)
    }

    /// The current request's clock, or a new one that nobody reads.
    pub fn current() -> Self {
        PROVIDER_WAIT
            .try_with(|wait| Self(Arc::clone(wait)))
            .unwrap_or_default()
    }

    pub fn waited(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }

    fn add(&self, waited: Duration) {
        let nanos = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        self.0.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// Adds each call's time to the current request's `ProviderClock`.
struct Clocked(Arc<dyn Responder>);

#[async_trait]
impl Responder for Clocked {
    async fn reply(&self, prompt: Prompt<'_>) -> Result<Reply, ResponderError> {
        let started = Instant::now();
        let reply = self.0.reply(prompt).await;
        ProviderClock::current().add(started.elapsed());
        reply
    }

    async fn reply_streaming(
        &self,
        prompt: Prompt<'_>,
        deltas: &Deltas,
    ) -> Result<Reply, ResponderError> {
        let started = Instant::now();
        let reply = self.0.reply_streaming(prompt, deltas).await;
        ProviderClock::current().add(started.elapsed());
        reply
    }
}

/// The responder the settings ask for: the OpenAI-compatible provider when a base URL is set,
/// else the offline one; timed for the request's `ProviderClock`.
pub fn from_settings(settings: &LlmSettings) -> anyhow::Result<Arc<dyn Responder>> {
    Ok(Arc::new(Clocked(chosen(settings)?)))
}

fn chosen(settings: &LlmSettings) -> anyhow::Result<Arc<dyn Responder>> {
    match &settings.provider {
        Some(provider) => {
            tracing::info!(
                llm.model = %provider.model,
                llm.base_url = %provider.base_url,
                "replies come from an OpenAI-compatible provider"
            );
            Ok(Arc::new(OpenAiResponder::new(provider)?))
        }
        None => {
            tracing::info!("no model provider configured: the offline responder answers");
            Ok(Arc::new(OfflineResponder))
        }
    }
}
