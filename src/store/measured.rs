//! Any store, timed: each operation gets a span and a latency observation.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use tracing::Instrument;

use super::{Appended, ConversationStore, ConversationSummary, Owner, Priced, StoreError};
use crate::domain::{ConversationId, Message, NewMessage};
use crate::metrics::Metrics;
use crate::usage_log::UsageRecord;

pub struct MeasuredStore {
    inner: Arc<dyn ConversationStore>,
    metrics: Arc<Metrics>,
}

impl MeasuredStore {
    pub fn new(inner: Arc<dyn ConversationStore>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    async fn measure<T>(
        &self,
        operation: &'static str,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let span = tracing::info_span!("store", store.operation = operation);
        let result = work.instrument(span).await;
        self.metrics.observe_store(operation, started.elapsed());
        result
    }
}

#[async_trait]
impl ConversationStore for MeasuredStore {
    async fn append_once(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        message: NewMessage,
    ) -> Result<Appended, StoreError> {
        self.measure(
            "append",
            self.inner.append_once(owner, conversation, message),
        )
        .await
    }

    async fn append_question(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        question: NewMessage,
        limit: usize,
    ) -> Result<(Appended, Vec<Message>), StoreError> {
        // An append that also reads the history back (in one statement where it can).
        self.measure(
            "append",
            self.inner
                .append_question(owner, conversation, question, limit),
        )
        .await
    }

    async fn append_reply(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        reply: NewMessage,
        priced: Priced,
    ) -> Result<Appended, StoreError> {
        self.measure(
            "append",
            self.inner.append_reply(owner, conversation, reply, priced),
        )
        .await
    }

    async fn record_cost(&self, record: &UsageRecord<'_>) -> Result<(), StoreError> {
        self.measure("record_cost", self.inner.record_cost(record))
            .await
    }

    async fn find(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        id: &str,
    ) -> Result<Option<Message>, StoreError> {
        self.measure("find", self.inner.find(owner, conversation, id))
            .await
    }

    async fn recent(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        self.measure("recent", self.inner.recent(owner, conversation, limit))
            .await
    }

    async fn messages(
        &self,
        owner: &Owner,
        conversation: &ConversationId,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        self.measure(
            "messages",
            self.inner.messages(owner, conversation, after_seq, limit),
        )
        .await
    }

    async fn list(
        &self,
        owner: &Owner,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<ConversationSummary>, StoreError> {
        self.measure("list", self.inner.list(owner, offset, limit))
            .await
    }

    async fn delete(&self, owner: &Owner, conversation: &ConversationId) -> Result<(), StoreError> {
        self.measure("delete", self.inner.delete(owner, conversation))
            .await
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.measure("check", self.inner.check()).await
    }
}
