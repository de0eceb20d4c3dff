-- Idempotency-Key records of the core endpoint: what a key's request got done, for 24 hours.
CREATE TABLE idempotency_keys (
    tenant_id        TEXT NOT NULL,
    key              TEXT NOT NULL,
    -- SHA-256 of the request body: the same key with another body is refused.
    fingerprint      TEXT NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Held by a request in progress until then (a crashed request frees it at that time).
    locked_until     TIMESTAMPTZ,
    -- Set once the user's message is stored, so a retry continues instead of storing it again.
    conversation_id  TEXT,
    user_seq         BIGINT,
    -- The response, once there is one.
    outcome          JSONB,
    PRIMARY KEY (tenant_id, key)
);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
