-- Conversation ids become scoped by their owner (tenant, user): two users' `conv_demo` are two
-- conversations, and nothing answers differently because someone else uses an id.
-- Step 1 of 3, expand: the new table and columns, beside the old ones.

-- Who owns conversations: a user within a tenant. `feed_head` numbers the changes to the
-- owner's conversations (a message stored, a conversation deleted) 1, 2, 3, ... in commit
-- order, since bumping it locks the row: sync reads an owner's changes after one it has seen.
CREATE TABLE owners (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants (id),
    user_id     TEXT NOT NULL,
    feed_head   BIGINT NOT NULL DEFAULT 0,
    UNIQUE (tenant_id, user_id)
);

ALTER TABLE conversations
    ADD COLUMN pk BIGINT GENERATED ALWAYS AS IDENTITY,
    ADD COLUMN owner_id BIGINT REFERENCES owners (id),
    -- The newest message's time: the conversation's clock (each new message is stamped after).
    ADD COLUMN last_created_at TIMESTAMPTZ;

ALTER TABLE messages
    ADD COLUMN conversation_pk BIGINT,
    ADD COLUMN owner_id BIGINT,
    -- Its number in the owner's feed.
    ADD COLUMN feed_seq BIGINT,
    -- Where it was written when it came through sync (a local install's id); NULL: here.
    ADD COLUMN origin TEXT;

-- Deleted conversations, remembered for good (no content): sync tells local installs, and a
-- copy pushed later by an install that had not heard of the deletion cannot bring it back.
CREATE TABLE conversation_deletions (
    owner_id         BIGINT NOT NULL REFERENCES owners (id),
    conversation_id  TEXT NOT NULL,
    -- Messages stamped up to this instant are erased; later ones (the id used again) stay.
    deleted_at       TIMESTAMPTZ NOT NULL,
    feed_seq         BIGINT NOT NULL,
    -- The local install that deleted it; NULL: deleted here.
    origin           TEXT,
    PRIMARY KEY (owner_id, conversation_id)
);
CREATE UNIQUE INDEX conversation_deletions_feed ON conversation_deletions (owner_id, feed_seq);
