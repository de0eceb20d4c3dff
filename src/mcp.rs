//! `maestra mcp`: the conversation-hub MCP server on stdio, for IDEs (registered as in the
//! guide's `mcp_config.json`). Its tools reach the backends through the same client as
//! `maestra ask` — local first, cloud fallback — and every failure is a tool error the IDE can
//! show (`isError: true`), never a crash. stdout carries JSON-RPC only; logs go to stderr.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rmcp::handler::server::common::FromContextPart;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock,
    ProgressNotificationParam, ProgressToken, RequestMetaObject,
};
use rmcp::service::RequestContext;
use rmcp::{
    ErrorData, Peer, RoleServer, ServerHandler, ServiceExt, tool, tool_handler, tool_router,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::client::{AskRequest, ClientError, ClientSettings, MaestraClient};

/// How often a long call tells the IDE it is still working, so that it does not time out.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// rmcp's text for arguments that do not fit the tool's schema (it turns errors starting so
/// into tool errors); replaced by a clearer one in `call_tool`.
const RMCP_ARGUMENT_ERROR: &str = "failed to deserialize parameters:";

/// A tool's arguments, like rmcp's `Parameters` (the `#[tool]` macro finds the input schema
/// by this name), but a bad argument names its field: "message: invalid type: integer…".
pub struct Parameters<P>(pub P);

impl<P: JsonSchema> JsonSchema for Parameters<P> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        P::schema_name()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        P::json_schema(generator)
    }
}

impl<S, P: DeserializeOwned> FromContextPart<ToolCallContext<'_, S>> for Parameters<P> {
    fn from_context_part(context: &mut ToolCallContext<'_, S>) -> Result<Self, ErrorData> {
        let arguments = serde_json::Value::Object(context.arguments.take().unwrap_or_default());
        serde_path_to_error::deserialize(arguments)
            .map(Parameters)
            .map_err(|e| {
                let path = e.path().to_string();
                let reason = if path == "." {
                    e.inner().to_string()
                } else {
                    format!("{path}: {}", e.inner())
                };
                ErrorData::invalid_params(format!("{RMCP_ARGUMENT_ERROR} {reason}"), None)
            })
    }
}

fn windsurf() -> String {
    "windsurf".to_owned()
}

// Optional arguments are declared with their plain type (`"type": "integer"`), not as
// `["integer", "null"]`: some clients (MCP Inspector 0.15) cannot send a value for a union
// type. Omitting an argument is how a client leaves it out; `null` is still accepted.

#[derive(Debug, Deserialize, JsonSchema)]
pub struct AskParams {
    /// The message for Maestra.
    pub message: String,
    /// The conversation to continue: the `conversation_id` of an earlier result. Omit it to
    /// start a new conversation.
    #[serde(default)]
    #[schemars(with = "String")]
    pub conversation_id: Option<String>,
    /// Whose conversation it is. Default: MAESTRA_USER_ID, else the OS user name.
    #[serde(default)]
    #[schemars(with = "String")]
    pub user_id: Option<String>,
    /// The surface the message comes from.
    #[serde(default = "windsurf")]
    pub surface_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct HistoryParams {
    /// The conversation to read.
    pub conversation_id: String,
    /// Whose conversation it is. Default: MAESTRA_USER_ID, else the OS user name.
    #[serde(default)]
    #[schemars(with = "String")]
    pub user_id: Option<String>,
    /// Only messages after this sequence number (for the next page: `next_after_seq`).
    #[serde(default)]
    #[schemars(with = "i64")]
    pub after_seq: Option<i64>,
    /// At most this many messages (1-1000; the server's default is 100).
    #[serde(default)]
    #[schemars(with = "u32")]
    pub limit: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct LegacyAskParams {
    /// The question for the legacy advisor.
    pub question: String,
    /// Background the advisor should take into account.
    #[serde(default)]
    #[schemars(with = "String")]
    pub context: Option<String>,
}

#[derive(Clone)]
pub struct ConversationHub {
    client: Arc<MaestraClient>,
    default_user: Option<String>,
    tool_router: ToolRouter<Self>,
}

/// Serves the tools on stdin/stdout until the IDE closes the connection.
pub async fn serve_stdio(settings: &ClientSettings) -> anyhow::Result<()> {
    let hub = ConversationHub::new(settings)?;
    let running = hub
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| anyhow::anyhow!("the MCP session could not start: {e}"))?;
    running
        .waiting()
        .await
        .map_err(|e| anyhow::anyhow!("the MCP session failed: {e}"))?;
    Ok(())
}

impl ConversationHub {
    pub fn new(settings: &ClientSettings) -> anyhow::Result<Self> {
        Ok(Self {
            client: Arc::new(MaestraClient::new(settings)?),
            default_user: settings.default_user.clone(),
            tool_router: Self::tool_router(),
        })
    }

    fn user(&self, given: Option<String>) -> Result<String, CallToolResult> {
        given
            .filter(|u| !u.trim().is_empty())
            .or_else(|| self.default_user.clone())
            .ok_or_else(|| {
                tool_error(
                    "user_id: not given, and neither MAESTRA_USER_ID nor the OS user name is set"
                        .to_owned(),
                )
            })
    }
}

#[tool_router]
impl ConversationHub {
    #[tool(
        description = "Ask Maestra, the conversation hub shared by the IDE, the browser extension and the CLI. Returns the reply, its conversation_id (pass it back to continue the conversation) and which backend answered (local or cloud)."
    )]
    async fn maestra_ask(
        &self,
        Parameters(params): Parameters<AskParams>,
        meta: RequestMetaObject,
        peer: Peer<RoleServer>,
    ) -> CallToolResult {
        let user = match self.user(params.user_id) {
            Ok(user) => user,
            Err(error) => return error,
        };
        let request = AskRequest {
            user_id: &user,
            surface_id: &params.surface_id,
            conversation_id: params.conversation_id.as_deref(),
            message: &params.message,
        };
        // One key for the logical ask: the fallback attempt carries the same one.
        let key = uuid::Uuid::new_v4().to_string();
        let asked = with_progress(
            meta.get_progress_token(),
            &peer,
            "Maestra is replying",
            self.client.ask(&request, &key, None),
        )
        .await;
        match asked {
            Ok(reply) => CallToolResult::structured(reply.body),
            Err(e) => client_error(&e),
        }
    }

    #[tool(
        description = "Health of the local and the cloud Maestra backends, side by side: URL, status, version, mode and latency of each."
    )]
    async fn maestra_health(&self) -> CallToolResult {
        // The same object as `maestra health --json`.
        match serde_json::to_value(self.client.health().await) {
            Ok(value) => CallToolResult::structured(value),
            Err(e) => tool_error(format!("cannot describe the health report: {e}")),
        }
    }

    #[tool(
        description = "Ask the legacy Maestra advisor a one-off question (optionally with context). Not part of any conversation."
    )]
    async fn maestra_legacy_ask(
        &self,
        Parameters(params): Parameters<LegacyAskParams>,
        meta: RequestMetaObject,
        peer: Peer<RoleServer>,
    ) -> CallToolResult {
        let key = uuid::Uuid::new_v4().to_string();
        let asked = with_progress(
            meta.get_progress_token(),
            &peer,
            "the advisor is answering",
            self.client.advisor(
                &params.question,
                params.context.as_deref(),
                self.default_user.as_deref(),
                &key,
            ),
        )
        .await;
        match asked {
            Ok(answer) => CallToolResult::structured(answer.body),
            Err(e @ ClientError::Rejected { status: 404, .. }) => tool_error(format!(
                "the legacy advisor (POST /api/maestra/advisor/ask) is not available on this backend: {e}"
            )),
            Err(e) => client_error(&e),
        }
    }

    #[tool(
        description = "Read a conversation's messages in order, whichever surface (IDE, browser, CLI) wrote them. Returns a page of messages and next_after_seq when more remain."
    )]
    async fn maestra_history(
        &self,
        Parameters(params): Parameters<HistoryParams>,
    ) -> CallToolResult {
        let user = match self.user(params.user_id) {
            Ok(user) => user,
            Err(error) => return error,
        };
        let read = self
            .client
            .history(
                &params.conversation_id,
                &user,
                params.after_seq,
                params.limit,
            )
            .await;
        match read {
            Ok(answer) => CallToolResult::structured(answer.body),
            Err(e) => client_error(&e),
        }
    }
}

#[tool_handler(
    name = "maestra",
    instructions = "Maestra's conversation hub: maestra_ask sends a message (pass conversation_id back to continue a conversation), maestra_history reads one, maestra_health checks the backends, maestra_legacy_ask asks the legacy advisor."
)]
impl ServerHandler for ConversationHub {
    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let tool = request.name.to_string();
        let call = ToolCallContext::new(self, request, context);
        let mut response = self.tool_router.call(call).await?;
        // rmcp already makes bad arguments a tool error; make its text say which tool and why.
        if let CallToolResponse::Complete(result) = &mut response {
            for block in &mut result.content {
                if let Some(text) = block.as_text().map(|t| t.text.clone())
                    && let Some(reason) = text.strip_prefix(RMCP_ARGUMENT_ERROR)
                {
                    *block = ContentBlock::text(format!(
                        "invalid arguments for {tool}: {}; see the tool's input schema",
                        reason.trim()
                    ));
                }
            }
        }
        Ok(response)
    }
}

/// Runs `work`, telling the IDE every few seconds that it is still going when the IDE asked
/// for progress (a progress token in the request).
async fn with_progress<F: Future>(
    token: Option<ProgressToken>,
    peer: &Peer<RoleServer>,
    what: &str,
    work: F,
) -> F::Output {
    let Some(token) = token else {
        return work.await;
    };
    let started = Instant::now();
    // Sent before the work starts, so that it reaches the IDE before the answer does.
    notify(peer, &token, 0, what, started).await;
    let heartbeat = async {
        let mut step = 1u32;
        loop {
            tokio::time::sleep(PROGRESS_INTERVAL).await;
            notify(peer, &token, step, what, started).await;
            step = step.saturating_add(1);
        }
    };
    // `biased`: once the answer is there, no further notification starts.
    tokio::select! {
        biased;
        output = work => output,
        never = heartbeat => never,
    }
}

async fn notify(
    peer: &Peer<RoleServer>,
    token: &ProgressToken,
    step: u32,
    what: &str,
    started: Instant,
) {
    let note = ProgressNotificationParam::new(token.clone(), f64::from(step))
        .with_message(format!("{what} ({} s)", started.elapsed().as_secs()));
    if let Err(e) = peer.notify_progress(note).await {
        tracing::debug!(error = %e, "progress notification not sent");
    }
}

fn tool_error(message: String) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message)])
}

fn client_error(error: &ClientError) -> CallToolResult {
    tool_error(error.to_string())
}
