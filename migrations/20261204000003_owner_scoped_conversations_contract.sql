-- Step 3 of 3, contract: the new keys take over and the global conversation id goes.
-- A conversation is (tenant, user, id); a message is (conversation, seq), its id unique within
-- its conversation; an owner's feed is (owner, feed_seq).

ALTER TABLE conversations
    ALTER COLUMN owner_id SET NOT NULL,
    ALTER COLUMN last_created_at SET NOT NULL;

ALTER TABLE messages
    DROP CONSTRAINT messages_pkey,
    DROP CONSTRAINT messages_conversation_id_fkey,
    DROP CONSTRAINT messages_id_key,
    ALTER COLUMN conversation_pk SET NOT NULL,
    ALTER COLUMN owner_id SET NOT NULL,
    ALTER COLUMN feed_seq SET NOT NULL;
ALTER TABLE messages DROP COLUMN conversation_id;

ALTER TABLE conversations DROP CONSTRAINT conversations_pkey;
ALTER TABLE conversations ADD PRIMARY KEY (pk);
ALTER TABLE conversations
    ADD CONSTRAINT conversations_tenant_user_id UNIQUE (tenant_id, user_id, id);

ALTER TABLE messages
    ADD PRIMARY KEY (conversation_pk, seq),
    ADD CONSTRAINT messages_conversation_pk_fkey
        FOREIGN KEY (conversation_pk) REFERENCES conversations (pk) ON DELETE CASCADE,
    ADD CONSTRAINT messages_id_in_conversation UNIQUE (conversation_pk, id);
CREATE UNIQUE INDEX messages_feed ON messages (owner_id, feed_seq);
