//! One conversation turn: store the user's message, get a reply from the responder with the
//! conversation's recent history, store the reply, record its cost.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use tracing::Instrument;

use crate::domain::{
    ConversationId, Message, MessageText, NewMessage, SurfaceId, TurnOutcome, Usage, UserId,
    conversation_order,
};
use crate::idempotency::{Begin, DerivedIds, IdempotencyKey, IdempotencyStore};
use crate::metrics::Metrics;
use crate::responder::{Deltas, Prompt, Reply, Responder, ResponderError};
use crate::store::{ConversationStore, Owner, Priced, StoreError};
use crate::usage_log::UsageRecord;

/// The surface recorded in the ledger for the legacy advisor's one-off questions.
pub const ADVISOR_SURFACE: &str = "advisor";
/// What the history window holds at most when no budget is set.
const DEFAULT_HISTORY_CHARS: usize = 32_000;

pub struct Turn {
    pub owner: Owner,
    pub surface_id: SurfaceId,
    /// `None` starts a new conversation.
    pub conversation_id: Option<ConversationId>,
    pub message: MessageText,
    pub request_id: String,
    /// Cloud mode: the API key making the request.
    pub api_key_id: Option<String>,
    /// The client's `Idempotency-Key`, if it sent one.
    pub idempotency: Option<IdempotencyKey>,
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
    /// The reply could not be stored (the user's message, `seq`, is).
    #[error(
        "the reply could not be stored: {source}; your message was stored (conversation {conversation_id}, seq {seq})"
    )]
    ReplyNotStored {
        source: StoreError,
        conversation_id: ConversationId,
        seq: i64,
    },
    /// The `Idempotency-Key` belongs to another request, or to one still running.
    #[error("{0}")]
    IdempotencyConflict(String),
}

/// A one-off question from the legacy advisor: answered, never stored.
pub struct Question {
    /// Whose cost it is (metrics by tenant).
    pub tenant: String,
    pub user_id: UserId,
    /// The question, with the client's context (if any) before it.
    pub text: MessageText,
    pub request_id: String,
}

#[derive(Debug, Clone)]
pub struct Answer {
    pub answer: String,
    pub model: String,
    pub usage: Usage,
    pub created_at: DateTime<Utc>,
    pub provider_ms: f64,
}

pub struct ConversationService {
    store: Arc<dyn ConversationStore>,
    responder: Arc<dyn Responder>,
    history_messages: usize,
    history_chars: usize,
    metrics: Arc<Metrics>,
    idempotency: Arc<dyn IdempotencyStore>,
}

impl ConversationService {
    pub fn new(
        store: Arc<dyn ConversationStore>,
        responder: Arc<dyn Responder>,
        history_messages: usize,
        metrics: Arc<Metrics>,
        idempotency: Arc<dyn IdempotencyStore>,
    ) -> Self {
        Self {
            store,
            responder,
            history_messages,
            history_chars: DEFAULT_HISTORY_CHARS,
            metrics,
            idempotency,
        }
    }

    /// Caps the history the model sees at `chars` characters (the newest message always goes).
    pub fn with_history_chars(mut self, chars: usize) -> Self {
        self.history_chars = chars.max(1);
        self
    }

    pub fn store(&self) -> &dyn ConversationStore {
        self.store.as_ref()
    }

    #[tracing::instrument(name = "conversation.turn", skip_all, fields(conversation.id))]
    pub async fn turn(&self, turn: Turn) -> Result<TurnOutcome, TurnError> {
        self.run(turn, None).await
    }

    /// A turn whose reply text also goes to `deltas` as the model writes it.
    #[tracing::instrument(name = "conversation.turn", skip_all, fields(conversation.id))]
    pub async fn turn_streaming(
        &self,
        turn: Turn,
        deltas: Deltas,
    ) -> Result<TurnOutcome, TurnError> {
        self.run(turn, Some(deltas)).await
    }

    /// A turn with an `Idempotency-Key` runs at most once to the end: a repeat gets the first
    /// answer, and a retry after a failure continues where the failed one stopped.
    async fn run(&self, turn: Turn, deltas: Option<Deltas>) -> Result<TurnOutcome, TurnError> {
        let Some(key) = turn.idempotency.clone() else {
            return self.run_once(turn, deltas, None).await;
        };
        let tenant = turn.owner.tenant.clone();
        let resume = match self.idempotency.begin(&tenant, &key).await? {
            Begin::Fresh => None,
            Begin::Resume {
                conversation_id,
                user_seq,
            } => Some((conversation_id, user_seq)),
            Begin::Replay(outcome) => {
                if let Some(deltas) = &deltas {
                    deltas.send(&outcome.reply);
                }
                return Ok(TurnOutcome {
                    provider_ms: 0.0,
                    ..*outcome
                });
            }
            Begin::InProgress => {
                return Err(TurnError::IdempotencyConflict(
                    "a request with this Idempotency-Key is still in progress; retry later"
                        .to_owned(),
                ));
            }
            Begin::Conflict => {
                return Err(TurnError::IdempotencyConflict(
                    "this Idempotency-Key was used with another request body".to_owned(),
                ));
            }
        };
        let result = self.run_once(turn, deltas, Some((&key, resume))).await;
        let recorded = match &result {
            Ok(outcome) => self.idempotency.complete(&tenant, &key, outcome).await,
            Err(_) => self.idempotency.release(&tenant, &key).await,
        };
        if let Err(e) = recorded {
            // The answer stands; only a later repeat of this key cannot be recognised.
            tracing::error!(error = %e, "cannot record the idempotency key's outcome");
        }
        result
    }

    /// The turn itself. With an idempotency key, its messages get the ids the key derives
    /// (the same on every server), and it records when the user's message is stored; when
    /// resuming, that message is already stored (conversation, seq) and only the reply is
    /// still to come. A reply already stored under the derived id (answered elsewhere, and
    /// synced here) is the answer: the model is not asked again.
    async fn run_once(
        &self,
        turn: Turn,
        deltas: Option<Deltas>,
        idempotency: Option<(&IdempotencyKey, Option<(ConversationId, i64)>)>,
    ) -> Result<TurnOutcome, TurnError> {
        let started = Instant::now();
        let (key, resume) = idempotency.map_or((None, None), |(k, r)| (Some(k), r));
        let ids = key.map(IdempotencyKey::derived_ids);
        let (conversation_id, user_seq, mut history) = match resume {
            Some((conversation_id, user_seq)) => {
                // Its record may have lost the outcome in a crash while the reply was stored.
                if let Some(reply) = self
                    .reply_stored_before(&turn.owner, &conversation_id, ids.as_ref())
                    .await?
                {
                    return Ok(answered_before(
                        conversation_id,
                        turn.surface_id,
                        reply,
                        deltas,
                    ));
                }
                let history = self
                    .store
                    .recent(&turn.owner, &conversation_id, self.history_messages)
                    .await?;
                (conversation_id, user_seq, history)
            }
            None => {
                let conversation_id = match (turn.conversation_id, &ids) {
                    (Some(id), _) => id,
                    (None, Some(ids)) => ids.conversation_id.clone(),
                    (None, None) => ConversationId::generate(),
                };
                let user_message = NewMessage::from_user(turn.surface_id.clone(), turn.message)
                    .with_id(ids.as_ref().map(|ids| ids.user_message.clone()))
                    .written_by(turn.api_key_id.clone());
                let (stored, history) = self
                    .store
                    .append_question(
                        &turn.owner,
                        &conversation_id,
                        user_message,
                        self.history_messages,
                    )
                    .await?;
                if stored.existed
                    && let Some(reply) = self
                        .reply_stored_before(&turn.owner, &conversation_id, ids.as_ref())
                        .await?
                {
                    return Ok(answered_before(
                        conversation_id,
                        turn.surface_id,
                        reply,
                        deltas,
                    ));
                }
                if let Some(key) = key {
                    self.idempotency
                        .user_stored(
                            &turn.owner.tenant,
                            key,
                            &conversation_id,
                            stored.message.seq,
                        )
                        .await?;
                }
                (conversation_id, stored.message.seq, history)
            }
        };
        tracing::Span::current().record("conversation.id", conversation_id.as_str());

        conversation_order(&mut history);
        keep_within(&mut history, self.history_chars);

        let prompt = Prompt {
            conversation_id: Some(&conversation_id),
            history: &history,
        };
        let (reply, provider_ms) = self
            .reply(prompt, deltas.as_ref(), &turn.owner.tenant)
            .await;
        let reply = reply.map_err(|source| TurnError::Responder {
            source,
            conversation_id: conversation_id.clone(),
            seq: user_seq,
        })?;

        let assistant = NewMessage::from_assistant(
            turn.surface_id.clone(),
            reply.text,
            reply.model,
            reply.usage,
        )
        .with_id(ids.map(|ids| ids.reply))
        .written_by(turn.api_key_id.clone());
        let priced = Priced {
            request_id: turn.request_id.clone(),
            user_id: turn.owner.user_id.clone(),
            surface_id: turn.surface_id.as_str().to_owned(),
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        };
        let stored = self
            .store
            .append_reply(&turn.owner, &conversation_id, assistant, priced)
            .await
            .map_err(|source| TurnError::ReplyNotStored {
                source,
                conversation_id: conversation_id.clone(),
                seq: user_seq,
            })?;
        if stored.existed {
            // Synced here while the model was answering: that copy is the turn's reply.
            return Ok(TurnOutcome::of_stored_reply(
                conversation_id,
                turn.surface_id,
                stored.message,
            ));
        }
        let answer = stored.message;
        let model = answer.model.clone().unwrap_or_default();

        Ok(TurnOutcome {
            reply: answer.content,
            conversation_id,
            message_id: answer.id,
            seq: answer.seq,
            surface_id: turn.surface_id,
            model,
            usage: reply.usage,
            created_at: answer.created_at,
            provider_ms,
        })
    }

    /// The reply a keyed turn already has under the id its key derives (stored here by an
    /// earlier attempt, or synced from the other side).
    async fn reply_stored_before(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        ids: Option<&DerivedIds>,
    ) -> Result<Option<Message>, StoreError> {
        match ids {
            Some(ids) => self.store.find(owner, conversation, &ids.reply).await,
            None => Ok(None),
        }
    }

    /// Answers a one-off question; nothing is stored but its line in the cost ledger.
    #[tracing::instrument(name = "advisor.ask", skip_all)]
    pub async fn ask(&self, question: Question) -> Result<Answer, ResponderError> {
        let started = Instant::now();
        let surface_id = SurfaceId::parse(ADVISOR_SURFACE)
            .map_err(|e| ResponderError::Provider(format!("internal: {e}")))?;
        let history =
            [NewMessage::from_user(surface_id, question.text).into_message(1, Utc::now())];
        let prompt = Prompt {
            conversation_id: None,
            history: &history,
        };
        let (reply, provider_ms) = self.reply(prompt, None, &question.tenant).await;
        let reply = reply?;
        let created_at = Utc::now();
        let recorded = self
            .store
            .record_cost(&UsageRecord {
                ts: created_at,
                request_id: &question.request_id,
                conversation_id: None,
                user_id: &question.user_id,
                surface_id: ADVISOR_SURFACE,
                model: &reply.model,
                latency_ms: started.elapsed().as_secs_f64() * 1000.0,
                prompt_tokens: reply.usage.prompt_tokens,
                completion_tokens: reply.usage.completion_tokens,
                cost_usd: reply.usage.cost_usd,
            })
            .await;
        if let Err(e) = recorded {
            // Nothing else of the question is kept: its answer still reaches the user.
            tracing::error!(error = %e, "cannot append to the usage ledger");
        }
        Ok(Answer {
            answer: reply.text,
            model: reply.model,
            usage: reply.usage,
            created_at,
            provider_ms,
        })
    }

    /// The responder's reply and how long it took, in milliseconds; measured for `tenant`.
    async fn reply(
        &self,
        prompt: Prompt<'_>,
        deltas: Option<&Deltas>,
        tenant: &str,
    ) -> (Result<Reply, ResponderError>, f64) {
        let started = Instant::now();
        let span = tracing::info_span!("provider.reply");
        let reply = match deltas {
            Some(deltas) => {
                self.responder
                    .reply_streaming(prompt, deltas)
                    .instrument(span)
                    .await
            }
            None => self.responder.reply(prompt).instrument(span).await,
        };
        let elapsed = started.elapsed();
        match &reply {
            Ok(reply) => {
                self.metrics
                    .provider_duration
                    .with_label_values(&[&reply.model])
                    .observe(elapsed.as_secs_f64());
                self.metrics.record_usage(
                    &reply.model,
                    tenant,
                    reply.usage.prompt_tokens,
                    reply.usage.completion_tokens,
                    reply.usage.cost_usd,
                );
            }
            Err(e) => self
                .metrics
                .provider_errors
                .with_label_values(&[e.kind()])
                .inc(),
        }
        (reply, elapsed.as_secs_f64() * 1000.0)
    }
}

/// The outcome of a turn whose reply was stored before: sent to `deltas` whole.
fn answered_before(
    conversation_id: ConversationId,
    surface_id: SurfaceId,
    reply: Message,
    deltas: Option<Deltas>,
) -> TurnOutcome {
    if let Some(deltas) = &deltas {
        deltas.send(&reply.content);
    }
    TurnOutcome::of_stored_reply(conversation_id, surface_id, reply)
}

/// Drops the oldest messages until the history fits in `budget` characters; the newest
/// message (the user's new one) always stays, whatever its size.
fn keep_within(history: &mut Vec<Message>, budget: usize) {
    let mut total = 0;
    let mut first_kept = history.len();
    for (i, message) in history.iter().enumerate().rev() {
        total += message.content.chars().count();
        if total > budget && first_kept < history.len() {
            break;
        }
        first_kept = i;
    }
    history.drain(..first_kept);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Role;

    fn history(lengths: &[usize]) -> Vec<Message> {
        lengths
            .iter()
            .enumerate()
            .map(|(i, len)| Message {
                id: format!("msg_{i}"),
                seq: i as i64 + 1,
                role: Role::User,
                surface_id: SurfaceId::parse("cli").unwrap(),
                content: "é".repeat(*len),
                created_at: Utc::now(),
                model: None,
                usage: None,
                origin: None,
            })
            .collect()
    }

    fn seqs(history: &[Message]) -> Vec<i64> {
        history.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn the_oldest_messages_go_first_when_the_history_is_over_budget() {
        let mut h = history(&[40, 30, 20, 10]);
        keep_within(&mut h, 60);
        assert_eq!(seqs(&h), [2, 3, 4]);
    }

    #[test]
    fn a_history_within_budget_is_kept_whole() {
        let mut h = history(&[10, 10, 10]);
        keep_within(&mut h, 30);
        assert_eq!(seqs(&h), [1, 2, 3]);
    }

    #[test]
    fn the_newest_message_is_kept_even_when_it_alone_is_over_budget() {
        let mut h = history(&[5, 500]);
        keep_within(&mut h, 100);
        assert_eq!(seqs(&h), [2]);
    }
}
