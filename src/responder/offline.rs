//! The built-in responder used when no model provider is configured: honest about being offline,
//! and useful enough to show the conversation really is shared across surfaces.

use std::collections::BTreeSet;

use async_trait::async_trait;

use super::{Deltas, Prompt, Reply, Responder, ResponderError};
use crate::domain::{Role, Usage};

pub const OFFLINE_MODEL: &str = "maestra-offline";

/// How much of the user's message the reply quotes back.
const QUOTE_CHARS: usize = 200;

pub struct OfflineResponder;

#[async_trait]
impl Responder for OfflineResponder {
    async fn reply(&self, prompt: Prompt<'_>) -> Result<Reply, ResponderError> {
        let surfaces: BTreeSet<&str> = prompt
            .history
            .iter()
            .map(|m| m.surface_id.as_str())
            .collect();
        let last_user = prompt
            .history
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map_or("", |m| m.content.as_str());
        let quote: String = last_user.chars().take(QUOTE_CHARS).collect();
        let ellipsis = if last_user.chars().count() > QUOTE_CHARS {
            "…"
        } else {
            ""
        };
        let count = prompt.conversation_len();
        let context = match prompt.conversation_id {
            Some(id) => format!(
                "Conversation {id} holds {count} message{} from {} surface{} ({}).",
                if count == 1 { "" } else { "s" },
                surfaces.len(),
                if surfaces.len() == 1 { "" } else { "s" },
                surfaces.into_iter().collect::<Vec<_>>().join(", "),
            ),
            None => "This one-off question belongs to no conversation.".to_owned(),
        };
        let text = format!(
            "Maestra is running offline: no model provider is configured (set MAESTRA_LLM_BASE_URL \
             to get real answers). {context} You said: \"{quote}{ellipsis}\""
        );
        let prompt_chars: usize = prompt.history.iter().map(|m| m.content.len()).sum();
        Ok(Reply {
            usage: Usage {
                prompt_tokens: estimate_tokens(prompt_chars),
                completion_tokens: estimate_tokens(text.len()),
                cost_usd: 0.0,
            },
            text,
            model: OFFLINE_MODEL.to_owned(),
        })
    }

    /// The reply in a few pieces, sentence by sentence, so that streaming clients see deltas.
    async fn reply_streaming(
        &self,
        prompt: Prompt<'_>,
        deltas: &Deltas,
    ) -> Result<Reply, ResponderError> {
        let reply = self.reply(prompt).await?;
        for piece in reply.text.split_inclusive(". ") {
            deltas.send(piece);
        }
        Ok(reply)
    }
}

/// The usual rule of thumb, about four bytes of English per token.
fn estimate_tokens(bytes: usize) -> u64 {
    bytes.div_ceil(4) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ConversationId, Message, SurfaceId};

    fn message(seq: i64, role: Role, surface: &str, content: &str) -> Message {
        Message {
            id: format!("msg_{seq}"),
            seq,
            role,
            surface_id: SurfaceId::parse(surface).unwrap(),
            content: content.to_owned(),
            created_at: chrono::Utc::now(),
            model: None,
            usage: None,
            origin: None,
        }
    }

    #[tokio::test]
    async fn the_offline_reply_says_it_is_offline_and_knows_the_conversation() {
        let id = ConversationId::parse("conv_1").unwrap();
        let history = [
            message(1, Role::User, "windsurf", "first"),
            message(2, Role::Assistant, "windsurf", "answer"),
            message(3, Role::User, "browser_ext", "Hello"),
        ];
        let reply = OfflineResponder
            .reply(Prompt {
                conversation_id: Some(&id),
                history: &history,
            })
            .await
            .unwrap();
        assert!(reply.text.contains("no model provider is configured"));
        assert!(
            reply
                .text
                .contains("3 messages from 2 surfaces (browser_ext, windsurf)")
        );
        assert!(reply.text.contains("\"Hello\""));
        assert_eq!(reply.usage.cost_usd, 0.0);
        assert!(reply.usage.prompt_tokens > 0 && reply.usage.completion_tokens > 0);
    }

    #[tokio::test]
    async fn a_streamed_offline_reply_comes_in_several_pieces_that_make_the_whole() {
        let id = ConversationId::parse("conv_1").unwrap();
        let history = [message(1, Role::User, "cli", "Hello")];
        let (deltas, mut pieces) = Deltas::channel();
        let prompt = Prompt {
            conversation_id: Some(&id),
            history: &history,
        };
        let reply = OfflineResponder
            .reply_streaming(prompt, &deltas)
            .await
            .unwrap();
        drop(deltas);
        let mut received = Vec::new();
        while let Some(piece) = pieces.recv().await {
            received.push(piece);
        }
        assert!(received.len() > 1, "{received:?}");
        assert_eq!(received.concat(), reply.text);
    }
}
