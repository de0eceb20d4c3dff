//! One conversation turn: store the user's message, get a reply from the responder with the
//! conversation's recent history, store the reply, record its cost.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use tracing::Instrument;

use crate::domain::{ConversationId, MessageText, NewMessage, SurfaceId, Usage};
use crate::metrics::Metrics;
use crate::responder::{Prompt, Responder, ResponderError};
use crate::store::{ConversationStore, Owner, StoreError};
use crate::usage_log::{UsageLog, UsageRecord};

pub struct Turn {
    pub owner: Owner,
    pub surface_id: SurfaceId,
    /// `None` starts a new conversation.
    pub conversation_id: Option<ConversationId>,
    pub message: MessageText,
    pub request_id: String,
    /// Cloud mode: the API key making the request.
    pub api_key_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct TurnOutcome {
    pub reply: String,
    pub conversation_id: ConversationId,
    pub message_id: String,
    pub seq: i64,
    pub surface_id: SurfaceId,
    pub model: String,
    pub usage: Usage,
    pub created_at: DateTime<Utc>,
    /// How long the responder took; the rest of the request is the backend's own overhead.
    pub provider_time: std::time::Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The responder failed after the user's message was stored as `seq`.
    #[error("{source}; your message was stored (conversation {conversation_id}, seq {seq})")]
    Responder {
        source: ResponderError,
        conversation_id: ConversationId,
        seq: i64,
    },
}

pub struct ConversationService {
    store: Arc<dyn ConversationStore>,
    responder: Arc<dyn Responder>,
    usage_log: Option<UsageLog>,
    history_messages: usize,
    metrics: Arc<Metrics>,
}

impl ConversationService {
    pub fn new(
        store: Arc<dyn ConversationStore>,
        responder: Arc<dyn Responder>,
        usage_log: Option<UsageLog>,
        history_messages: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            responder,
            usage_log,
            history_messages,
            metrics,
        }
    }

    pub fn store(&self) -> &dyn ConversationStore {
        self.store.as_ref()
    }

    #[tracing::instrument(name = "conversation.turn", skip_all, fields(conversation.id))]
    pub async fn turn(&self, turn: Turn) -> Result<TurnOutcome, TurnError> {
        let started = Instant::now();
        let conversation_id = turn
            .conversation_id
            .unwrap_or_else(ConversationId::generate);
        tracing::Span::current().record("conversation.id", conversation_id.as_str());

        let user_message = NewMessage::from_user(turn.surface_id.clone(), turn.message)
            .written_by(turn.api_key_id.clone());
        let stored = self
            .store
            .append(&turn.owner, &conversation_id, user_message)
            .await?;
        let history = self
            .store
            .recent(&turn.owner, &conversation_id, self.history_messages)
            .await?;

        let prompt = Prompt {
            conversation_id: &conversation_id,
            history: &history,
        };
        let provider_started = Instant::now();
        let reply = self
            .responder
            .reply(prompt)
            .instrument(tracing::info_span!("provider.reply"))
            .await
            .map_err(|source| {
                self.metrics
                    .provider_errors
                    .with_label_values(&[source.kind()])
                    .inc();
                TurnError::Responder {
                    source,
                    conversation_id: conversation_id.clone(),
                    seq: stored.seq,
                }
            })?;
        let provider_time = provider_started.elapsed();
        self.metrics
            .provider_duration
            .with_label_values(&[&reply.model])
            .observe(provider_time.as_secs_f64());
        self.metrics.record_usage(
            &reply.model,
            &turn.owner.tenant,
            reply.usage.prompt_tokens,
            reply.usage.completion_tokens,
            reply.usage.cost_usd,
        );

        let assistant = NewMessage::from_assistant(
            turn.surface_id.clone(),
            reply.text,
            reply.model,
            reply.usage,
        )
        .written_by(turn.api_key_id.clone());
        let answer = self
            .store
            .append(&turn.owner, &conversation_id, assistant)
            .await?;
        let model = answer.model.clone().unwrap_or_default();

        if let Some(log) = &self.usage_log {
            log.record(&UsageRecord {
                ts: answer.created_at,
                request_id: &turn.request_id,
                conversation_id: &conversation_id,
                user_id: &turn.owner.user_id,
                surface_id: &turn.surface_id,
                model: &model,
                latency_ms: started.elapsed().as_secs_f64() * 1000.0,
                prompt_tokens: reply.usage.prompt_tokens,
                completion_tokens: reply.usage.completion_tokens,
                cost_usd: reply.usage.cost_usd,
            });
        }

        Ok(TurnOutcome {
            reply: answer.content,
            conversation_id,
            message_id: answer.id,
            seq: answer.seq,
            surface_id: turn.surface_id,
            model,
            usage: reply.usage,
            created_at: answer.created_at,
            provider_time,
        })
    }
}
