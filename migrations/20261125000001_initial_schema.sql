-- Cloud mode's tables: tenants, their API keys, conversations, messages, usage.

CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A key is `<id>` + a secret; only the argon2id PHC hash of the whole key is stored.
CREATE TABLE api_keys (
    id                         TEXT PRIMARY KEY,
    tenant_id                  TEXT NOT NULL REFERENCES tenants (id),
    label                      TEXT,
    secret_hash                TEXT NOT NULL,
    -- Per-key quota; NULL means the server's default.
    rate_limit_requests        INTEGER CHECK (rate_limit_requests > 0),
    rate_limit_window_seconds  INTEGER CHECK (rate_limit_window_seconds > 0),
    -- The key ensured from MAESTRA_API_KEY at start (at most one is active).
    bootstrap                  BOOLEAN NOT NULL DEFAULT false,
    created_at                 TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at                 TIMESTAMPTZ,
    -- The key stops working at this instant (in the future during a rotation's grace).
    revoked_at                 TIMESTAMPTZ,
    replaced_by                TEXT REFERENCES api_keys (id),
    last_used_at               TIMESTAMPTZ
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

-- Running servers cache verified keys; tell them when a key's validity changes, however it
-- was changed (an operator's UPDATE in psql included). last_used_at updates are not news.
CREATE FUNCTION notify_api_key_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('maestra_api_keys', COALESCE(NEW.id, OLD.id));
    RETURN NULL;
END
$$;
CREATE TRIGGER api_keys_changed
    AFTER UPDATE OF tenant_id, secret_hash, rate_limit_requests, rate_limit_window_seconds,
                    expires_at, revoked_at
    OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION notify_api_key_change();

-- Conversation ids are global: using another tenant's or user's id answers 404.
CREATE TABLE conversations (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants (id),
    user_id     TEXT NOT NULL,
    -- The seq of its newest message; bumped in the same statement that inserts one.
    last_seq    BIGINT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX conversations_by_user ON conversations (tenant_id, user_id, updated_at DESC, id DESC);

CREATE TABLE messages (
    conversation_id    TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq                BIGINT NOT NULL,
    id                 TEXT NOT NULL UNIQUE,
    role               TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    surface_id         TEXT NOT NULL,
    content            TEXT NOT NULL,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    model              TEXT,
    prompt_tokens      BIGINT,
    completion_tokens  BIGINT,
    cost_usd           DOUBLE PRECISION,
    -- Which key wrote it (NULL for messages written without one).
    api_key_id         TEXT,
    PRIMARY KEY (conversation_id, seq)
);

-- One row per answered request: the accounting outlives the conversation (no message text).
CREATE TABLE usage (
    id                 BIGSERIAL PRIMARY KEY,
    ts                 TIMESTAMPTZ NOT NULL DEFAULT now(),
    tenant_id          TEXT NOT NULL,
    api_key_id         TEXT,
    user_id            TEXT NOT NULL,
    conversation_id    TEXT NOT NULL,
    surface_id         TEXT NOT NULL,
    model              TEXT NOT NULL,
    prompt_tokens      BIGINT NOT NULL,
    completion_tokens  BIGINT NOT NULL,
    cost_usd           DOUBLE PRECISION NOT NULL
);
CREATE INDEX usage_by_day ON usage (ts);
